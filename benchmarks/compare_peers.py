"""vitlab side by side with Hugging Face's ViT (and timm's where it imports), in one process.

For each case (model, batch) and mode (train: the training step ``vitlab train`` runs, with the default
TrainConfig: on-device normalisation, forward, label-smoothed loss, backward, gradient clipping, fused AdamW,
the schedule; infer: a forward batch), the same architecture is built in vitlab and in
``transformers.ViTForImageClassification`` (attention implementation "sdpa") with the same weights, batch,
threads and the same step around it, and the contenders' steps are interleaved repeat by repeat so they see
the same machine load. Two comparisons come out of one loop:

- like-for-like: vitlab in fp32 against Hugging Face in fp32;
- defaults: vitlab at the settings ``vitlab train`` uses by default (bf16 autocast where the CPU has native
  bf16 matmul) against Hugging Face's defaults (fp32).

The ratio is the median over repeats of (peer step time / vitlab step time): > 1 means vitlab is faster.
Utilisation is achieved FLOP/s over the matmul peak measured at the start in the same precision.
Then the peak memory of one ViT-B/16 training step (vitlab, vitlab with activation checkpointing, Hugging
Face) at the same batch.

    PYTHONPATH=src python benchmarks/compare_peers.py            # the full table (~5 min on a quiet 2-core CPU)
    PYTHONPATH=src python benchmarks/compare_peers.py --quick    # CIFAR tiny model only, 3 repeats
    PYTHONPATH=src python benchmarks/compare_peers.py --json     # one JSON document
    PYTHONPATH=src python benchmarks/compare_peers.py --memory-only --memory-batch 32   # ViT-B/16 memory only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

from vitlab.bench import (LiveTensorBytes, _device_name, _state_bytes, _tensor_bytes,
                          default_precision, make_step, matmul_peak, time_alternating, TRAIN_FLOPS_FACTOR)
from vitlab.interop.hf import convert_hf_state_dict
from vitlab.models import create_model, load_state_dict_strict

CASES = [("vit-cifar-tiny-p4", 256), ("vit-ti16", 32), ("vit-s16", 16)]
# The recipe presets (mnist, cifar10-cpu) have a convolutional stem that neither peer builds: their rows are
# vitlab's alone (its throughput and utilisation; the peer columns empty).
RECIPE_CASES = [("vit-mnist-hybrid", 128), ("vit-cifar-hybrid", 128)]


def peers_can_build(cfg) -> bool:
    return cfg.patch_embed == "conv" and not cfg.stem_extra_convs


def hf_model(cfg):
    """A ``transformers`` ViT classifier with vitlab config ``cfg``'s architecture (SDPA attention)."""
    import transformers

    hf_cfg = transformers.ViTConfig(
        hidden_size=cfg.hidden_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.norm_eps, image_size=cfg.image_size[0],
        patch_size=cfg.patch_size[0], num_channels=cfg.in_channels, qkv_bias=cfg.qkv_bias,
        num_labels=cfg.num_classes)
    return transformers.ViTForImageClassification._from_config(hf_cfg, attn_implementation="sdpa")


def timm_model(cfg):
    """timm's VisionTransformer of the same shape, or None when timm does not import."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return None
    return TimmViT(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels,
                   num_classes=cfg.num_classes, embed_dim=cfg.hidden_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                   mlp_ratio=cfg.mlp_dim / cfg.hidden_dim, qkv_bias=cfg.qkv_bias)


def hf_to_vitlab(state: dict, cfg) -> dict:
    """HF ViT weights -> vitlab names: transformers 5's in-memory names (``vit.layers.N.attention.q_proj``)
    here, the older / on-disk names through :func:`vitlab.interop.hf.convert_hf_state_dict`."""
    if not any(k.startswith("vit.layers.") for k in state):
        return convert_hf_state_dict(state, cfg)
    sd = {k.removeprefix("vit."): v for k, v in state.items()}
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(cfg.depth):
        a, b = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + "attn.qkv." + kind] = torch.cat([sd[f"{a}attention.{n}_proj.{kind}"] for n in "qkv"])
            out[b + "attn.proj." + kind] = sd[f"{a}attention.o_proj.{kind}"]
            out[b + "norm1." + kind] = sd[a + "layernorm_before." + kind]
            out[b + "norm2." + kind] = sd[a + "layernorm_after." + kind]
            out[b + "mlp.fc1." + kind] = sd[a + "mlp.fc1." + kind]
            out[b + "mlp.fc2." + kind] = sd[a + "mlp.fc2." + kind]
    return out


def build_pair(preset):
    """(vitlab model, HF model, timm model or None) of a preset name or ViTConfig, with HF's initial weights;
    (vitlab model, None, None) for a preset that the peers cannot build."""
    torch.manual_seed(0)
    vit = create_model(preset)
    if not peers_can_build(vit.config):
        return vit, None, None
    hf = hf_model(vit.config)
    load_state_dict_strict(vit, hf_to_vitlab(hf.state_dict(), vit.config), "hf")
    tm = timm_model(vit.config)
    if tm is not None:
        tm.load_state_dict(vit.state_dict(), strict=False)
    return vit, hf, tm


def run_case(preset: str, batch: int, mode: str, fast_precision: str, peaks: dict, repeats: int) -> list[dict]:
    """Alternate vitlab fp32, vitlab at its defaults, HF (and timm) for one case and mode; two table rows."""
    dev = torch.device("cpu")
    vit, hf, tm = build_pair(preset)
    cfg = vit.config
    contenders = {"vitlab_fp32": (vit, "fp32"), "vitlab_default": (copy.deepcopy(vit), fast_precision)}
    if hf is not None:
        contenders["hf"] = (hf, "fp32")
    if tm is not None:
        contenders["timm"] = (tm, "fp32")
    steps = {}
    for name, (model, precision) in contenders.items():
        model.train(mode == "train")
        steps[name] = make_step(model, mode=mode, precision=precision, device=dev, image_size=cfg.image_size,
                                channels=cfg.in_channels, num_classes=cfg.num_classes)
    gen = torch.Generator().manual_seed(0)
    if mode == "train":  # uint8, as the loader gives them: the training step normalises on the device
        images = torch.randint(0, 256, (batch, cfg.in_channels, *cfg.image_size), generator=gen, dtype=torch.uint8)
    else:
        images = torch.randn(batch, cfg.in_channels, *cfg.image_size, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    times = time_alternating(steps, {name: (images, labels) for name in steps}, repeats=repeats, device=dev)
    flops = cfg.flops_per_image() * (TRAIN_FLOPS_FACTOR if mode == "train" else 1)

    def ips(name):
        return batch / statistics.median(times[name])

    def ratio(peer, ours):
        return statistics.median(p / o for p, o in zip(times[peer], times[ours]))

    def util(name, precision):
        return flops * ips(name) / peaks[precision]

    rows = []
    for setting, ours in (("like-for-like", "vitlab_fp32"), ("defaults", "vitlab_default")):
        precision = contenders[ours][1]
        row = dict(model=preset, batch=batch, mode=mode, setting=setting, vitlab_precision=precision,
                   peer_precision="fp32", vitlab_images_per_s=ips(ours), vitlab_utilisation=util(ours, precision),
                   vitlab_fp32_utilisation=util(ours, "fp32"), repeats=repeats)
        if "hf" in times:
            row.update(hf_images_per_s=ips("hf"), ratio_vs_hf=ratio("hf", ours), hf_utilisation=util("hf", "fp32"))
        if "timm" in times:
            row.update(timm_images_per_s=ips("timm"), ratio_vs_timm=ratio("timm", ours))
        rows.append(row)
    return rows


def step_memory(model, precision: str, batch: int, checkpointing: bool = False) -> tuple[int, int]:
    """(peak, resident) live tensor bytes of one training step after a warm-up step; resident = parameters,
    gradients, AdamW state and the batch, held before the step starts; peak - resident = activations etc."""
    dev = torch.device("cpu")
    model.train()
    if checkpointing:
        model.set_gradient_checkpointing(True)
    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, tuple) else (cfg.image_size,) * 2
    chans = getattr(cfg, "in_channels", None) or cfg.num_channels
    classes = getattr(cfg, "num_labels", None) or cfg.num_classes
    step = make_step(model, mode="train", precision=precision, device=dev, image_size=size, channels=chans,
                     num_classes=classes)
    images = torch.randint(0, 256, (batch, chans, *size), dtype=torch.uint8)
    labels = torch.randint(0, classes, (batch,))
    step(images, labels)  # creates the optimizer state, which then counts as resident
    base = _state_bytes(model, step.train_step.optimizer) + _tensor_bytes([images, labels])
    with LiveTensorBytes() as tracker:
        step(images, labels)
    return base + tracker.peak, base


def run_memory(preset: str, batch: int, fast_precision: str) -> dict:
    vit, hf, _ = build_pair(preset)
    out = dict(model=preset, batch=batch, method="peak live tensor bytes of one training step (dispatch-mode "
                                                   "tracker), parameters, gradients and AdamW state included")
    runs = {"vitlab_fp32": (vit, "fp32", False), "vitlab_fp32_checkpointing": (vit, "fp32", True)}
    if fast_precision != "fp32":
        runs[f"vitlab_{fast_precision}"] = (vit, fast_precision, False)
    runs["hf_fp32"] = (hf, "fp32", False)
    out["peak_bytes"], out["resident_bytes"] = {}, {}
    for key, (model, precision, ckpt) in runs.items():
        model = model if model is hf else copy.deepcopy(model)
        out["peak_bytes"][key], out["resident_bytes"][key] = step_memory(model, precision, batch, ckpt)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the CIFAR tiny model, 3 repeats, no memory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--models", default=None, help="comma-separated presets (default: the three cases and "
                                                         "the recipe presets)")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--memory-model", default="vit-b16")
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--save", default=None, help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cases = [] if args.memory_only else CASES[:1] if args.quick else CASES + RECIPE_CASES
    if args.models:
        wanted = args.models.split(",")
        batches = dict(CASES + RECIPE_CASES)
        cases = [(m, batches.get(m, 32)) for m in wanted]
    repeats = 3 if args.quick else args.repeats
    fast = default_precision("cpu")
    t_start = time.time()
    peaks = {p: matmul_peak("cpu", p) for p in sorted({"fp32", fast})}
    rows = []
    for preset, batch in cases:
        for mode in args.modes.split(","):
            rows.extend(run_case(preset, batch, mode, fast, peaks, repeats))
            if not args.json:
                print(f"  done {preset} {mode} ({time.time() - t_start:.0f} s)", file=sys.stderr)
    # peaks again at the end: a drifting machine load shows up as a gap between the two
    peaks_end = {p: matmul_peak("cpu", p) for p in peaks}
    # The device's peak is the best it showed: a busy machine at either end only lowers one measurement.
    best = {p: max(peaks[p], peaks_end[p]) for p in peaks}
    for r in rows:
        r["vitlab_utilisation"] *= peaks[r["vitlab_precision"]] / best[r["vitlab_precision"]]
        r["vitlab_fp32_utilisation"] *= peaks["fp32"] / best["fp32"]
        if "hf_utilisation" in r:
            r["hf_utilisation"] *= peaks["fp32"] / best["fp32"]
    memory = None
    if not (args.quick or args.no_memory):
        memory = run_memory(args.memory_model, args.memory_batch, fast)
    import transformers

    doc = dict(command="python benchmarks/compare_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               machine=_device_name(torch.device("cpu")), platform=platform.platform(), threads=torch.get_num_threads(),
               torch=torch.__version__, transformers=transformers.__version__, vitlab_default_precision=fast,
               matmul_peak_flops=peaks, matmul_peak_flops_end=peaks_end, rows=rows, memory=memory,
               seconds=time.time() - t_start)
    if args.save:
        from vitlab._files import write_json

        write_json(args.save, doc)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"machine: {doc['machine']}, {doc['threads']} threads, torch {doc['torch']}, "
          f"transformers {doc['transformers']}")
    print("matmul peak (GFLOP/s, start/end; utilisation uses the larger): " + ", ".join(
        f"{p} {peaks[p] / 1e9:.0f}/{peaks_end[p] / 1e9:.0f}" for p in peaks))
    timm = any("timm_images_per_s" in r for r in rows)
    head = (f"{'model':<19}{'batch':>6} {'mode':<6}{'setting':<15}{'vitlab':>8}{'img/s':>9}{'HF img/s':>10}"
            f"{'x HF':>7}{'util':>7}{'HF util':>8}" + (f"{'timm':>9}{'x timm':>8}" if timm else ""))
    if rows:
        print(head)
        print("-" * len(head))
    def cell(row, key, width, form):  # a peer's figure, or "-" where the peer cannot build the model
        return f"{format(row[key], form):>{width}}" if key in row else f"{'-':>{width}}"

    for r in rows:
        hf_util = f"{100 * r['hf_utilisation']:>7.0f}%" if "hf_utilisation" in r else f"{'-':>8}"
        line = (f"{r['model']:<19}{r['batch']:>6} {r['mode']:<6}{r['setting']:<15}{r['vitlab_precision']:>8}"
                f"{r['vitlab_images_per_s']:>9.1f}{cell(r, 'hf_images_per_s', 10, '.1f')}"
                f"{cell(r, 'ratio_vs_hf', 7, '.2f')}{100 * r['vitlab_utilisation']:>6.0f}%{hf_util}")
        if timm:
            line += f"{cell(r, 'timm_images_per_s', 9, '.1f')}{cell(r, 'ratio_vs_timm', 8, '.2f')}"
        print(line)
    if memory:
        print(f"\npeak memory of one {memory['model']} training step, batch {memory['batch']} ({memory['method']}):")
        print(f"  {'':<28}{'peak':>9}{'resident':>10}{'in the step':>17}")
        for key, peak in memory["peak_bytes"].items():
            resident = memory["resident_bytes"][key]
            print(f"  {key:<28}{peak / 2**20:>5.0f} MiB{resident / 2**20:>6.0f} MiB{(peak - resident) / 2**20:>13.0f} MiB")
    print(f"({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
