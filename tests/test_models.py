"""The model: exact parameter counts, equivalent code paths, variants, validation, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise

import vitlab
from vitlab import ConfigError, ViTConfig, VisionTransformer, create_model
from vitlab.errors import CheckpointError
from vitlab.models.patch_embed import shifted_patches
from vitlab.models.position import resize_grid_embedding, sincos_2d


def tiny(**kw) -> ViTConfig:
    base = dict(image_size=16, patch_size=4, in_channels=3, num_classes=5, hidden_dim=24, depth=2, num_heads=3,
                mlp_dim=48)
    base.update(kw)
    return ViTConfig(**base)


def count_on_meta(name: str) -> int:
    with torch.device("meta"):
        return create_model(name).num_parameters()


# The paper's and DeiT's counts agree with timm's vit_*_224 models; the showcase count is the showcase notebook's.
@pytest.mark.parametrize("name,expected", [
    ("vit-b16", 86_567_656),
    ("vit-b32", 88_224_232),
    ("vit-l16", 304_326_632),
    ("vit-l32", 306_535_400),
    ("vit-h14", 632_045_800),
    ("vit-ti16", 5_717_416),
    ("vit-s16", 22_050_664),
    ("vit-cifar-showcase-p8", 847_626),
])
def test_parameter_counts(name, expected):
    assert count_on_meta(name) == expected


def test_seed_presets_have_the_published_shapes():
    c = vitlab.get_config("vit-cifar-tiny-p4")
    assert (c.image_size, c.patch_size, c.hidden_dim, c.depth, c.num_heads, c.mlp_dim, c.num_classes) == \
        ((32, 32), (4, 4), 48, 4, 4, 192, 10)
    c = vitlab.get_config("vit-mnist-notebook-p16")
    assert (c.in_channels, c.hidden_dim, c.num_heads, c.depth, c.mlp_dim, c.pos_embed) == (1, 9, 3, 3, 36, "sincos")
    c = vitlab.get_config("vit-tiny-4h-p16")
    assert (c.hidden_dim, c.mlp_dim, c.num_heads, c.depth) == (192, 768, 4, 12)
    c = vitlab.get_config("vit-small-12h-p16")
    assert (c.hidden_dim, c.mlp_dim, c.num_heads, c.depth) == (384, 1536, 12, 12)
    # Every preset builds and runs a forward pass of the right shape (small ones on CPU).
    for name in ("vit-cifar-tiny-p4", "vit-cifar-showcase-p8", "vit-mnist-notebook-p16", "vit-digits-p2"):
        m = create_model(name).eval()
        c = m.config
        x = torch.randn(2, c.in_channels, *c.image_size)
        assert m(x).shape == (2, c.num_classes)


def test_create_model_overrides_and_unknown_name():
    m = create_model("vit-cifar-tiny-p4", num_classes=100, drop_path=0.1)
    assert m.head.out_features == 100
    assert m.blocks[-1].drop_path.p == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="unknown model 'vit-b17'.*vitlab models"):
        create_model("vit-b17")
    with pytest.raises(ConfigError, match="unknown ViTConfig field 'hidden'"):
        create_model("vit-b16", hidden=3)


def test_conv_and_unfold_linear_patchify_are_equal():
    torch.manual_seed(0)
    conv = VisionTransformer(tiny(patch_embed="conv", image_size=(16, 24))).eval()
    lin = VisionTransformer(tiny(patch_embed="linear", image_size=(16, 24))).eval()
    state = conv.state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(24, -1)
    lin.load_state_dict(state)
    x = torch.randn(3, 3, 16, 24)
    torch.testing.assert_close(lin.patch_embed(x), conv.patch_embed(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin(x), conv(x), rtol=1e-5, atol=1e-6)


def reference_conv_stem(state: dict, x: torch.Tensor, layers: int, training: bool, extra: int = 0) -> torch.Tensor:
    """Xiao et al.'s stem written out with torch.nn.functional: (3x3 stride-2 conv, BatchNorm, ReLU) x layers,
    then ``extra`` stride-1 ones, then a 1x1 conv; tokens in row-major order."""
    import torch.nn.functional as F

    for i in range(layers + extra):
        x = F.conv2d(x, state[f"patch_embed.stem.{3 * i}.weight"], stride=2 if i < layers else 1, padding=1)
        bn = f"patch_embed.stem.{3 * i + 1}."
        if training:  # the batch's statistics, biased variance
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = state[bn + "running_mean"], state[bn + "running_var"]
        x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
        x = torch.relu(x * state[bn + "weight"][:, None, None] + state[bn + "bias"][:, None, None])
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"])
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("size,patch,channels,extra", [(16, 4, [24, 24], 0), ((28, 20), 4, [24, 24], 0),
                                                      (32, 8, [24] * 3, 0), ((28, 20), 4, [24] * 4, 2)])
def test_conv_stem_matches_a_functional_reference(size, patch, channels, extra):
    torch.manual_seed(0)
    m = VisionTransformer(tiny(patch_embed="conv_stem", image_size=size, patch_size=patch, stem_extra_convs=extra))
    with torch.no_grad():  # non-trivial BatchNorm affine and running statistics
        for mod in m.patch_embed.stem:
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5), mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.1, 0.1), mod.running_var.uniform_(0.5, 2.0)
    convs = [mod for mod in m.patch_embed.stem if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == channels  # 64, 128, ... capped at hidden_dim=24
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 3, *m.config.image_size)
    m.eval()
    out = m.patch_embed(x)
    assert out.shape == (3, m.config.num_patches, 24)
    layers = len(convs) - extra
    torch.testing.assert_close(out, reference_conv_stem(state, x, layers, training=False, extra=extra),
                               rtol=1e-5, atol=1e-5)
    m.train()
    torch.testing.assert_close(m.patch_embed(x), reference_conv_stem(state, x, layers, training=True, extra=extra),
                               rtol=1e-4, atol=1e-4)
    assert not torch.equal(m.patch_embed.stem[1].running_mean, state["patch_embed.stem.1.running_mean"])
    assert m(x).shape == (3, 5)


def test_conv_stem_runs_in_nhwc_and_leaves_the_weights_and_optimizer_state_contiguous():
    torch.manual_seed(0)
    m = VisionTransformer(tiny(patch_embed="conv_stem", image_size=16, patch_size=4, stem_extra_convs=1))
    seen = []
    for conv in (mod for mod in m.patch_embed.stem if isinstance(mod, torch.nn.Conv2d)):
        conv.register_forward_pre_hook(lambda mod, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    x = torch.randn(3, 3, 16, 16)  # NCHW, as the data pipeline makes it
    tokens = m.patch_embed(x)
    assert seen == [True, True, True] and tokens.is_contiguous()
    m.patch_embed.channels_last = False  # the NCHW path: the same tokens
    seen.clear()
    torch.testing.assert_close(m.patch_embed(x), tokens, rtol=1e-5, atol=1e-5)
    assert seen == [False, False, False]
    m.patch_embed.channels_last = True
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2])).backward()
    opt.step()
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in m.parameters())
    assert all(t.is_contiguous() for st in opt.state.values() for t in st.values())
    assert all(t.is_contiguous() for t in m.state_dict().values())  # safetensors saves only contiguous tensors


def test_conv_stem_parameter_count_and_channels():
    m = create_model("vit-cifar-c4")
    assert [c.out_channels for c in m.patch_embed.stem if isinstance(c, torch.nn.Conv2d)] == [64, 128]
    stem = 3 * 9 * 64 + 2 * 64 + 64 * 9 * 128 + 2 * 128 + 128 * 128 + 128  # convs, BatchNorm affine, 1x1 + bias
    assert m.num_parameters() - stem == create_model("vit-cifar-p4").num_parameters() - (3 * 16 * 128 + 128)


@pytest.mark.parametrize("name,base,channels,depth_cut", [("vit-cifar-hybrid", "vit-cifar-c4", 128, 2),
                                                          ("vit-mnist-hybrid", "vit-mnist-c4", 96, 1)])
def test_hybrid_presets_add_stride_one_convs(name, base, channels, depth_cut):
    m, b = create_model(name), create_model(base)
    convs = [c for c in m.patch_embed.stem if isinstance(c, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1), (1, 1)]
    assert convs[-1].out_channels == channels
    d, mlp = b.config.hidden_dim, b.config.mlp_dim
    block = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 4 * d  # qkv, proj, MLP (weights + biases), 2 LayerNorms
    extra = 2 * (9 * channels * channels + 2 * channels)  # two 3x3 convs (no bias) + BatchNorm affine
    assert m.num_parameters() == b.num_parameters() + extra - depth_cut * block
    assert m.config.grid_size == b.config.grid_size


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, pool="mean"), dict(pos_embed="sincos"),
                                dict(layer_scale=0.1, qkv_bias=False), dict(locality_attention=True)])
@pytest.mark.device
def test_fused_and_explicit_attention_agree(kw, device):
    torch.manual_seed(0)
    m = VisionTransformer(tiny(**kw)).to(device).eval()
    x = torch.randn(4, 3, 16, 16, device=device)
    fused = m(x)
    out = m(x, return_attentions=True, return_hidden_states=True)
    torch.testing.assert_close(out.logits, fused, rtol=1e-5, atol=1e-6)
    n = 16 + (0 if kw.get("class_token") is False else 1)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (4, 3, n, n)
    for a in out.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(4, 3, n, device=device))
        assert (a >= 0).all()
        assert (a.diagonal(dim1=-2, dim2=-1) == 0).all() == bool(kw.get("locality_attention"))
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (4, n, 24)
    # The last hidden state, normed and pooled, gives the logits.
    torch.testing.assert_close(m.forward_head(m.norm(out.hidden_states[-1])), fused, rtol=1e-5, atol=1e-6)


def test_one_channel_and_non_square_images():
    m = VisionTransformer(tiny(in_channels=1, image_size=(20, 12), patch_size=(4, 3))).eval()
    assert m.config.grid_size == (5, 4)
    assert m(torch.randn(2, 1, 20, 12)).shape == (2, 5)
    assert m.pos_embed.shape == (1, 21, 24)


def test_variants_switch_the_right_modules():
    m = VisionTransformer(tiny(qkv_bias=False, final_norm=False, layer_scale=1e-4, representation_dim=7))
    names = dict(m.named_parameters())
    assert "blocks.0.attn.qkv.bias" not in names and "blocks.0.attn.qkv.weight" in names
    assert "norm.weight" not in names
    assert torch.equal(names["blocks.1.ls2.gamma"], torch.full((24,), 1e-4))
    assert names["pre_logits.0.weight"].shape == (7, 24) and names["head.weight"].shape == (5, 7)
    m = VisionTransformer(tiny(pos_embed="sincos"))
    assert "pos_embed" not in dict(m.named_parameters()) and "pos_embed" not in m.state_dict()
    m = VisionTransformer(tiny(norm_eps=1e-12))
    assert m.blocks[0].norm1.eps == 1e-12 and m.norm.eps == 1e-12


def test_drop_path_schedule_is_linear_and_off_in_eval():
    m = VisionTransformer(tiny(depth=5, drop_path=0.2))
    assert [b.drop_path.p for b in m.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    x = torch.randn(8, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


def test_dropout_is_active_only_in_training():
    m = VisionTransformer(tiny(dropout=0.5, attention_dropout=0.5))
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x, return_attentions=True).logits, rtol=1e-5, atol=1e-6)
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_truncated_normal_init():
    torch.manual_seed(0)
    m = create_model("vit-ti16")
    w = m.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.04 + 1e-7  # cut at 2 std
    assert 0.85 * 0.02 < w.std() < 0.02  # a normal truncated at 2 std has std 0.88 * sigma
    assert torch.all(m.blocks[0].mlp.fc1.bias == 0)
    assert torch.all(m.blocks[0].norm1.weight == 1)
    assert 0.01 < m.pos_embed.std() < 0.02


def test_sincos_2d_values():
    pe = sincos_2d((2, 3), 8)
    assert pe.shape == (6, 8)
    # position (row 1, col 2) is index 5; frequencies 1 and 1/10000 for dim/4 = 2
    x, y = 2.0, 1.0
    expected = torch.tensor([torch.sin(torch.tensor(x)), torch.sin(torch.tensor(x / 1e4)),
                             torch.cos(torch.tensor(x)), torch.cos(torch.tensor(x / 1e4)),
                             torch.sin(torch.tensor(y)), torch.sin(torch.tensor(y / 1e4)),
                             torch.cos(torch.tensor(y)), torch.cos(torch.tensor(y / 1e4))])
    torch.testing.assert_close(pe[5], expected)
    assert sincos_2d((2, 2), 9).shape == (4, 9)  # dims that are not a multiple of 4 work


def test_pos_embed_resize_keeps_class_token_and_matches_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 4 * 4, 8)
    out = resize_grid_embedding(pos, (4, 4), (6, 8), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 48, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 48, 8))
    assert resize_grid_embedding(pos, (4, 4), (4, 4), 1) is pos


def test_resize_image_size_for_fine_tuning():
    torch.manual_seed(0)
    m = VisionTransformer(tiny()).eval()
    x = torch.randn(2, 3, 24, 32)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        m(x)
    on_the_fly = m(x, interpolate_pos_encoding=True)
    m.resize_image_size((24, 32))
    assert m.config.image_size == (24, 32) and m.pos_embed.shape == (1, 1 + 6 * 8, 24)
    assert isinstance(m.pos_embed, torch.nn.Parameter)
    torch.testing.assert_close(m(x), on_the_fly)
    s = VisionTransformer(tiny(pos_embed="sincos"))
    s.resize_image_size(32)
    torch.testing.assert_close(s.pos_embed[0, 1:], sincos_2d((8, 8), 24))


def test_reset_classifier():
    m = VisionTransformer(tiny(labels=list("abcde")))
    m.reset_classifier(3, labels=["x", "y", "z"])
    assert m.head.out_features == 3 and m.config.num_classes == 3 and m.config.labels == ["x", "y", "z"]
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize("kw,pattern", [
    (dict(hidden_dim=100, num_heads=3), r"hidden_dim=100 is not divisible by num_heads=3"),
    (dict(image_size=30, patch_size=4), r"image_size=\(30, 30\) is not divisible by patch_size=\(4, 4\)"),
    (dict(pool="cls", class_token=False), r"pool='cls' needs class_token=True"),
    (dict(pool="max"), r"pool='max' is not one of cls, mean"),
    (dict(patch_embed="mlp"), r"patch_embed='mlp'"),
    (dict(patch_embed="conv_stem", patch_size=3, image_size=18), r"patch_embed='conv_stem' needs a square power-of-2"),
    (dict(patch_embed="conv_stem", patch_size=(4, 2)), r"needs a square power-of-2 patch .*got patch_size=\(4, 2\)"),
    (dict(stem_extra_convs=1), r"stem_extra_convs=1 needs patch_embed='conv_stem' \(got 'conv'\)"),
    (dict(patch_embed="conv_stem", stem_extra_convs=-1), r"stem_extra_convs=-1 must be a non-negative integer"),
    (dict(drop_path=1.5), r"drop_path=1.5 must be a probability"),
    (dict(depth=0), r"depth=0 must be a positive integer"),
    (dict(labels=["a", "b"]), r"labels has 2 names but num_classes=5"),
    (dict(image_size="big"), r"image_size='big' must be an integer or a pair"),
    (dict(locality_attention="yes"), r"locality_attention='yes' must be true or false"),
])
def test_config_validation_names_the_field(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(**kw)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = VisionTransformer(tiny(image_size=(16, 20), labels=list("abcde"), layer_scale=0.5)).eval()
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VisionTransformer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == m.config
    x = torch.randn(2, 3, 16, 20)
    assert torch.equal(loaded(x), m(x))


@pytest.mark.parametrize("extra", [0, 1])
def test_save_and_load_keeps_the_conv_stem_batchnorm_statistics(tmp_path, extra):
    torch.manual_seed(0)
    m = VisionTransformer(tiny(patch_embed="conv_stem", stem_extra_convs=extra))
    m(torch.randn(8, 3, 16, 16))  # training mode: updates the running statistics
    m.eval().save_pretrained(tmp_path / "ckpt")
    loaded = VisionTransformer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.stem_extra_convs == extra
    for i in (1, len(m.patch_embed.stem) - 2):  # the first and the last BatchNorm
        assert torch.equal(loaded.patch_embed.stem[i].running_var, m.patch_embed.stem[i].running_var)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), m(x))


def test_load_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(CheckpointError, match="nope: not found"):
        VisionTransformer.from_pretrained(tmp_path / "nope")
    VisionTransformer(tiny()).save_pretrained(tmp_path / "a")
    # A checkpoint of another shape: the first mis-shaped key is named.
    VisionTransformer(tiny(num_classes=7)).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model.safetensors: key 'head.weight' has shape \(7, 24\)"):
        VisionTransformer.from_pretrained(tmp_path / "b")
    # A truncated weights file.
    data = (tmp_path / "a" / "model.safetensors").read_bytes()
    (tmp_path / "a" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        VisionTransformer.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        VisionTransformer.from_pretrained(tmp_path / "a")


def test_flops_per_image_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for cfg in (tiny(), tiny(class_token=False, pool="mean", representation_dim=6), tiny(patch_embed="linear"),
                tiny(patch_embed="shifted")):
        m = VisionTransformer(cfg).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(torch.randn(1, 3, 16, 16), return_attentions=True)  # explicit path: plain matmuls
        assert counter.get_total_flops() == cfg.flops_per_image()


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, pool="mean"), dict(register_tokens=2),
                                dict(pool="map", class_token=False), dict(patch_embed="conv_stem")])
def test_patch_dropout_keeps_prefix_tokens_and_a_random_subset_of_patches(kw):
    torch.manual_seed(0)
    m = VisionTransformer(tiny(patch_dropout=0.5, **kw)).train()
    plain = VisionTransformer(m.config.replace(patch_dropout=0.0)).train()  # the same weights, every patch
    plain.load_state_dict(m.state_dict())
    x = torch.randn(3, 3, 16, 16)
    full = plain.embed(x)
    assert full.shape[1] == m.config.num_prefix_tokens + 16
    kept = m.embed(x)
    prefix = m.config.num_prefix_tokens
    assert kept.shape == (3, prefix + 8, 24)
    torch.testing.assert_close(kept[:, :prefix], full[:, :prefix])
    for b in range(3):  # each kept token is one of the image's own patch tokens, in order, none twice
        match = (kept[b, prefix:, None] == full[b, None, prefix:]).all(-1).float().argmax(-1)
        assert torch.equal(kept[b, prefix:], full[b, prefix:][match]) and torch.equal(match, match.sort().values)
        assert match.unique().numel() == 8
    assert not torch.equal(kept[0, prefix:], kept[1, prefix:])  # images draw their own subsets
    m(x).sum().backward()  # the whole model trains on the subset
    assert m.patch_embed.proj.weight.grad is not None
    plain.load_state_dict(m.state_dict())  # (BatchNorm statistics moved in the training forwards)
    assert torch.equal(m.eval()(x), plain.eval()(x))  # in evaluation, the same model as without patch dropout


def test_patch_dropout_must_be_a_probability():
    with pytest.raises(ConfigError, match="patch_dropout"):
        tiny(patch_dropout=1.0)


@pytest.mark.parametrize("style,filters,expected_set", [("conv_stem", 64, 54), ("conv", 24, 24)])
def test_whitening_makes_the_first_convolutions_outputs_uncorrelated(style, filters, expected_set):
    import torch.nn.functional as F

    torch.manual_seed(0)
    hidden = 64 if style == "conv_stem" else 24  # conv_stem: 64 first filters over 3x3x3 = 27-pixel patches
    m = VisionTransformer(tiny(patch_embed=style, hidden_dim=hidden, num_heads=4, patch_size=4 if style ==
                               "conv_stem" else 2))
    conv = m.patch_embed.stem[0] if style == "conv_stem" else m.patch_embed.proj
    assert conv.out_channels == filters
    before = conv.weight.detach().clone()
    # correlated pixels and channels, as in photos: smooth random images with a shared component
    base = F.avg_pool2d(torch.randn(300, 1, 20, 20), 5, stride=1)
    images = base.expand(-1, 3, -1, -1) + 0.3 * F.avg_pool2d(torch.randn(300, 3, 20, 20), 5, stride=1)
    assert m.patch_embed.whiten_(images) == (expected_set, filters)
    k, dim = expected_set, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    patches = F.unfold(images, conv.kernel_size, stride=conv.stride).transpose(1, 2).reshape(-1, dim).double()
    cov = patches.T @ patches / len(patches)  # the reference, written apart: eigenvalues of the patch covariance
    values = torch.linalg.eigvalsh(cov).flip(0)[:(k + 1) // 2]
    out = patches @ conv.weight[:k].reshape(k, dim).double().T  # the layer's outputs (without bias) on the patches
    got = out.T @ out / len(out)
    expected = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):  # filter 2j is eigenvector j, 2j + 1 its negative
        for jj in range(k):
            if i // 2 == jj // 2:
                expected[i, jj] = (1 if i == jj else -1) * values[i // 2] / (values[i // 2] + 5e-4)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(conv.weight[k:], before[k:])  # the filters beyond 2 x 27 keep their initialisation
    with pytest.raises(ConfigError, match="whiten_stem needs a convolutional patch embedding"):
        VisionTransformer(tiny(patch_embed="linear")).patch_embed.whiten_(images)


def _sl_vit_attention(x, qkv, proj, scale, heads):
    """SL-ViT's locality self-attention as its authors' code computes it (aanna0701/SPT_LSA_ViT, models/vit.py:
    ``dots = q k^T * scale[h]``, the diagonal set to -987654321, softmax, ``@ v``), with vitlab's qkv layout."""
    b, n, d = x.shape
    q, k, v = qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * scale.view(1, heads, 1, 1)
    eye = torch.nonzero(torch.eye(n) == 1)
    dots[:, :, eye[:, 0], eye[:, 1]] = -987654321
    out = torch.einsum("bhij,bhjd->bhid", dots.softmax(dim=-1), v)
    return proj(out.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_locality_attention_is_sl_vits(impl):
    from vitlab.models.attention import Attention

    torch.manual_seed(0)
    attn = Attention(dim=24, num_heads=3, locality=True).eval()
    attn.impl = impl
    assert torch.equal(attn.temperature, torch.full((3,), 8 ** -0.5))  # initialised to 1/sqrt(head_dim)
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.1, 0.5, 2.0]))  # learned: each head its own
    x = torch.randn(2, 17, 24)
    expected = _sl_vit_attention(x, attn.qkv, attn.proj, attn.temperature, 3)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
    plain = Attention(dim=24, num_heads=3)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "temperature"})
    assert (plain(x) - expected).abs().max() > 1e-2  # the check can fail: plain attention differs
    y, probs = attn(x, return_attention=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert probs.diagonal(dim1=-2, dim2=-1).abs().max() == 0
    attn(x).sum().backward()
    assert attn.temperature.grad is not None and attn.temperature.grad.abs().min() > 0  # it is learned


def test_locality_attention_temperatures_take_no_weight_decay_and_block_export():
    from vitlab.interop.timm import timm_unsupported
    from vitlab.training.optim import param_groups

    m = VisionTransformer(tiny(locality_attention=True))
    assert m.num_parameters() == VisionTransformer(tiny()).num_parameters() + 2 * 3  # one per head per block
    no_decay = [n for g in param_groups(m, weight_decay=0.05) if g["weight_decay"] == 0 for n in g["names"]]
    assert "blocks.0.attn.temperature" in no_decay and "blocks.1.attn.temperature" in no_decay
    assert "locality_attention" in timm_unsupported(m.config)


def _sl_vit_shifted_patches(x, patch):
    """SL-ViT's shifted patch tokenization as its authors' code computes it (aanna0701/SPT_LSA_ViT, utils/SPT.py):
    pad by half a patch, the 4 diagonal crops ``x_pad[:, :, :-2s, :-2s]`` ... concatenated after the image, then
    ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')`` (here through unfold, whose features are (c, p1, p2))."""
    s = patch // 2
    x_pad = torch.nn.functional.pad(x, (s, s, s, s))
    x_lu, x_ru = x_pad[:, :, :-s * 2, :-s * 2], x_pad[:, :, :-s * 2, s * 2:]
    x_lb, x_rb = x_pad[:, :, s * 2:, :-s * 2], x_pad[:, :, s * 2:, s * 2:]
    x_cat = torch.cat([x, x_lu, x_ru, x_lb, x_rb], dim=1)
    b, c5 = x_cat.shape[:2]
    cols = torch.nn.functional.unfold(x_cat, patch, stride=patch)  # (B, 5C*p*p, N), channel-major
    return cols.reshape(b, c5, patch * patch, -1).permute(0, 3, 2, 1).reshape(b, cols.shape[-1], -1)


@pytest.mark.parametrize("size,patch", [(16, 4), ((8, 12), 2)])
def test_shifted_patch_tokenization_is_sl_vits(size, patch):
    torch.manual_seed(0)
    m = randomise(VisionTransformer(tiny(patch_embed="shifted", image_size=size, patch_size=patch))).eval()
    x = torch.randn(2, 3, *m.config.image_size)
    pe = m.patch_embed
    assert pe.proj.in_features == 5 * 3 * patch * patch and pe.norm.eps == 1e-5
    expected = pe.proj(torch.nn.functional.layer_norm(_sl_vit_shifted_patches(x, patch), (pe.proj.in_features,),
                                                      pe.norm.weight, pe.norm.bias))
    torch.testing.assert_close(pe(x), expected, rtol=1e-5, atol=1e-6)
    cols = shifted_patches(x, (patch, patch))
    assert torch.equal(cols, _sl_vit_shifted_patches(x, patch))
    # a token sees its neighbours: token (1, 1)'s first pixel holds, after the image's 3 channels, the pixel half a
    # patch up and left of it (the left-up copy), and zeros at the frame's corner (token (0, 0))
    h = patch // 2
    assert torch.equal(cols[0, 1 + m.config.grid_size[1], 3:6], x[0, :, patch - h, patch - h])
    assert torch.equal(cols[0, 0, 3:6], torch.zeros(3)) and not torch.equal(cols[0, 0, :3], torch.zeros(3))
    assert m(x).shape == (2, 5)
