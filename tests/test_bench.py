"""vitlab.bench, the attention kernel choice and benchmarks/compare_peers.py: values, never timings."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab.bench import LiveTensorBytes, benchmark, make_step, matmul_peak, time_alternating
from vitlab.cli import main
from vitlab.config import TrainConfig, ViTConfig
from vitlab.errors import ConfigError
from vitlab.models import VisionTransformer, create_model, get_config
from vitlab.training.step import make_train_step

TINY = dict(image_size=16, patch_size=4, num_classes=5, hidden_dim=32, depth=2, num_heads=4, mlp_dim=64)


def counted_forward_flops(config: ViTConfig, impl: str) -> int:
    model = VisionTransformer(config).eval()
    model.set_attention_impl(impl)
    x = torch.randn(3, config.in_channels, *config.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 3


@pytest.mark.parametrize("changes", [
    {},
    dict(patch_embed="linear", pool="mean", class_token=False),
    dict(representation_dim=24, image_size=(16, 24), patch_size=(4, 8), in_channels=1),
    dict(patch_embed="conv_stem", image_size=(16, 24), in_channels=1),
    dict(patch_embed="conv_stem", image_size=28, patch_size=4, hidden_dim=96, num_heads=4),  # 28 -> 14 -> 7
    dict(patch_embed="conv_stem", image_size=28, patch_size=4, hidden_dim=96, num_heads=4, stem_extra_convs=2),
])
def test_flops_per_image_equals_flop_counter(changes):
    # The explicit path: FlopCounterMode has no formula for PyTorch's CPU flash-attention kernel.
    config = ViTConfig(**{**TINY, **changes})
    assert config.flops_per_image() == counted_forward_flops(config, "explicit")


def test_flops_per_image_hand_count():
    c = ViTConfig(**TINY)  # 16 patches of 4*4*3 inputs, 17 tokens, D=32, MLP 64, 2 blocks, 5 classes
    n, d = 17, 32
    block = n * d * 96 + 2 * n * n * d + n * d * d + 2 * n * d * 64
    assert c.flops_per_image() == 2 * (16 * 48 * d + 2 * block + d * 5)
    # ViT-B/16: the usual 17.6 GFLOPs (2 x 8.8 GMACs) per 224 px image
    assert get_config("vit-b16").flops_per_image() == pytest.approx(35.15e9, rel=1e-3)


@pytest.mark.device
@pytest.mark.parametrize("autocast", [False, True])
def test_attention_paths_agree(autocast, device):
    """SDPA, the fast explicit path and the probabilities path give the same outputs and gradients."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**TINY)).to(device).train()
    x = torch.randn(4, 3, 16, 16, device=device)
    outs, grads = {}, {}
    for impl in ("sdpa", "explicit", "probs"):
        model.zero_grad(set_to_none=True)
        model.set_attention_impl("explicit" if impl == "probs" else impl)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, return_attentions=True).logits if impl == "probs" else model(x)
        out.float().square().sum().backward()
        outs[impl] = out.float()
        grads[impl] = model.blocks[0].attn.qkv.weight.grad.clone()
    tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    grad_tol = tol if autocast else dict(atol=1e-6, rtol=1e-4) if device.type == "cpu" else dict(atol=1e-5, rtol=1e-3)
    for impl in ("explicit", "probs"):
        torch.testing.assert_close(outs[impl], outs["sdpa"], **tol)
        torch.testing.assert_close(grads[impl], grads["sdpa"], **grad_tol)
    with pytest.raises(ValueError, match="impl"):
        model.set_attention_impl("flash")


def test_auto_attention_choice():
    from vitlab.models.attention import use_sdpa

    x = torch.zeros(1, 2, 8)
    assert use_sdpa("auto", x, 4)
    assert not use_sdpa("auto", x.bfloat16(), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_sdpa("auto", x, 4)
        assert use_sdpa("sdpa", x, 4)
    assert not use_sdpa("explicit", x, 4)
    assert use_sdpa("auto", torch.zeros(1, 2, 8, device="meta"), 4)  # any non-CPU device: fused kernels


def test_live_tensor_bytes_counts_allocations_not_views():
    base = torch.zeros(1000)
    with LiveTensorBytes() as t:
        a = torch.ones(1000)  # 4000 bytes
        b = a.view(10, 100).t()  # a view: nothing new
        a.add_(1)  # in place: nothing new
        c = base + 1  # 4000 more
        assert t.live == 8000
        del a, b, c
        assert t.live == 0
        d = torch.empty(500, dtype=torch.float64)  # 4000
    assert t.peak == 8000 and t.live == 4000 and d.numel() == 500


def test_benchmark_times_the_training_step_that_fit_runs():
    """benchmark() runs warm-up + timed + memory steps of the TrainStep that fit() runs (the default TrainConfig:
    normalisation, label smoothing, clipping, the schedule) on its batch: doing the same by hand leaves the same
    weights, bit for bit, and the figures are counted from those steps."""
    model = VisionTransformer(ViTConfig(**TINY))
    by_hand = copy.deepcopy(model).train()
    r = benchmark(model, batch=4, mode="train", precision="fp32", repeats=2, warmup=2, steps_per_repeat=3,
                  peak_flops=1e12, seed=0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 5, (4,), generator=gen)
    step = make_train_step(by_hand, TrainConfig(), device=torch.device("cpu"), precision="fp32",
                           steps_per_epoch=1000, num_classes=5, image_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    for _ in range(2 + 2 * 3 + 1):  # warm-up, timed (repeats x steps), the peak-memory step
        step([(images, labels)], gen)
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.head.weight, VisionTransformer(ViTConfig(**TINY)).head.weight)
    assert (r["repeats"], r["steps_per_repeat"], r["num_parameters"]) == (2, 3, model.num_parameters())
    assert r["flops_per_image"] == 3 * ViTConfig(**TINY).flops_per_image()
    # resident: fp32 params + grads + two AdamW moments; the step's activations come on top
    assert r["peak_memory_bytes"] > 4 * 4 * model.num_parameters()


def test_benchmark_infer_bf16_and_errors():
    r = benchmark("vit-digits-p2", batch=2, mode="infer", precision="bf16", repeats=1, warmup=1, steps_per_repeat=1,
                  measure_peak=False, measure_memory=False)
    assert r["flops_per_image"] == create_model("vit-digits-p2").config.flops_per_image()
    assert r["utilisation"] is None and r["peak_memory_bytes"] is None and r["precision"] == "bf16"
    with pytest.raises(ConfigError, match="mode"):
        benchmark("vit-digits-p2", mode="eval")
    with pytest.raises(ConfigError, match="precision"):
        benchmark("vit-digits-p2", precision="int8")


def test_gradient_checkpointing_cuts_step_memory():
    cfg = ViTConfig(**{**TINY, "depth": 6})
    with_ckpt = benchmark(cfg, batch=16, repeats=1, warmup=1, steps_per_repeat=1, measure_peak=False,
                          gradient_checkpointing=True)["peak_memory_bytes"]
    without = benchmark(cfg, batch=16, repeats=1, warmup=1, steps_per_repeat=1,
                        measure_peak=False)["peak_memory_bytes"]
    assert with_ckpt < 0.6 * without


def test_matmul_peak_and_alternating():
    assert matmul_peak("cpu", "fp32", size=64, repeats=1) > 0
    model = VisionTransformer(ViTConfig(**TINY))
    step = make_step(model, mode="train", precision="fp32", device=torch.device("cpu"), image_size=(16, 16),
                     channels=3, num_classes=5)
    before = model.head.weight.detach().clone()
    batch = (torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1]))
    times = time_alternating({"a": step, "b": step}, {"a": batch, "b": batch}, repeats=2, warmup=0)
    assert [len(v) for v in times.values()] == [2, 2]
    assert not torch.equal(before, model.head.weight)  # the optimizer really stepped
    assert all(p.grad is None for p in model.parameters())  # set to None, not zero-filled


def test_cli_bench_json(capsys):
    assert main(["bench", "--model", "vit-digits-p2", "--batch", "2", "--repeats", "1", "--warmup", "1",
                 "--precision", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "vit-digits-p2" and out["batch"] == 2 and out["mode"] == "train"
    assert out["utilisation"] > 0
    assert main(["bench", "--model", "no-such-model"]) == 2


def test_compare_peers_builds_equal_models():
    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_peers.py"
    spec = importlib.util.spec_from_file_location("compare_peers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vit, hf, _ = module.build_pair(ViTConfig(**TINY))
    x = torch.randn(2, 3, 16, 16)
    vit.eval(), hf.eval()
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in hf.parameters())
    torch.testing.assert_close(vit(x), hf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_compiles_as_one_graph(autocast):
    """torch.compile takes the whole forward (explicit bf16 attention and checkpointing included): no breaks."""
    import torch._dynamo

    model = VisionTransformer(ViTConfig(**TINY)).train()
    model.set_gradient_checkpointing(autocast)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_benchmark_with_on_device_augmentation():
    r = benchmark(ViTConfig(**TINY), batch=4, precision="fp32", repeats=1, warmup=1, steps_per_repeat=1,
                  measure_peak=False, measure_memory=False, augment=True)
    assert r["augment"] is True and r["images_per_s"] > 0


def test_a_onednn_isa_cap_without_bf16_makes_auto_precision_fp32(monkeypatch):
    """`ONEDNN_MAX_CPU_ISA=AVX2` makes a bf16 CPU behave as one without bf16 (the stand-in for AVX2 machines in
    benchmarks/): `auto` must then pick fp32, as it does on such a machine."""
    from vitlab import _device

    monkeypatch.setattr(_device, "_cpuinfo", lambda: "flags\t: avx2 avx512_bf16\n")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert _device.default_precision("cpu") == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert _device.default_precision("cpu") == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert _device.default_precision("cpu") == "bf16"
