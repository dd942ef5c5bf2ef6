"""The pretrained families as vitlab models: preset parameter counts against the peers', what each switch
computes, fine-tuning surgery (new head, resized position grid, the distillation head and CLIP's projection
dropped), attention maps over the patch grid (registers left out, the attention pool's read-out), save/load,
FLOPs and ONNX export of a model of each family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomise

from vitlab import ConfigError, ViTConfig, VisionTransformer, create_model
from vitlab.explain.maps import compute_attention_maps
from vitlab.explain.rollout import attention_rollout, fuse_heads, rollout_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ViTConfig:
    base = dict(image_size=16, patch_size=4, hidden_dim=24, depth=2, num_heads=3, mlp_dim=48, num_classes=5)
    return ViTConfig(**{**base, **kw})


FAMILIES = {
    "deit-distilled": dict(distillation_token=True, distillation_head=True),
    "deit3": dict(pos_embed_patches_only=True, layer_scale=1e-6),
    "dinov2-registers": dict(register_tokens=4, pos_embed_patches_only=True, layer_scale=1e-5, num_classes=0),
    "clip": dict(norm_before_blocks=True, patch_embed_bias=False, mlp_activation="quick_gelu", projection_dim=12,
                 num_classes=0, norm_eps=1e-5),
    "siglip": dict(class_token=False, pool="map", mlp_activation="gelu_tanh", num_classes=0),
}
X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def count_on_meta(name: str) -> int:
    with torch.device("meta"):
        return create_model(name).num_parameters()


# Measured with timm 1.0.31 in the peer environment (benchmarks/peer_parity.py's): sum of p.numel() over
# timm.create_model(name, pretrained=False).parameters(), at the checkpoints' image size and classes (DINOv2: 518 px,
# no head; SigLIP: no head). CLIP: vit_*_clip_quickgelu_224(num_classes=P) less its head bias (P), which equals
# transformers' CLIPVisionModelWithProjection of the OpenAI configs (both measured).
@pytest.mark.parametrize("name, timm_name, expected", [
    ("deit-ti16-distilled", "deit_tiny_distilled_patch16_224", 5_910_800),
    ("deit-s16-distilled", "deit_small_distilled_patch16_224", 22_436_432),
    ("deit-b16-distilled", "deit_base_distilled_patch16_224", 87_338_192),
    ("deit3-s16", "deit3_small_patch16_224", 22_059_496),
    ("deit3-b16", "deit3_base_patch16_224", 86_585_320),
    ("dinov2-s14", "vit_small_patch14_dinov2", 22_056_192),
    ("dinov2-b14", "vit_base_patch14_dinov2", 86_579_712),
    ("dinov2-l14", "vit_large_patch14_dinov2", 304_367_616),
    ("dinov2-s14-reg4", "vit_small_patch14_reg4_dinov2", 22_057_344),
    ("dinov2-b14-reg4", "vit_base_patch14_reg4_dinov2", 86_582_016),
    ("dinov2-l14-reg4", "vit_large_patch14_reg4_dinov2", 304_370_688),
    ("clip-b32", "vit_base_patch32_clip_quickgelu_224", 87_849_216),
    ("clip-b16", "vit_base_patch16_clip_quickgelu_224", 86_192_640),
    ("clip-l14", "vit_large_patch14_clip_quickgelu_224", 303_966_208),
    ("siglip-b16", "vit_base_patch16_siglip_224", 92_884_224),
    ("siglip-so400m14", "vit_so400m_patch14_siglip_224", 427_680_704),
])
def test_family_presets_have_the_peers_parameter_counts(name, timm_name, expected):
    assert count_on_meta(name) == expected, timm_name


def test_distillation_head_averages_the_two_heads_as_deit_infers():
    m = randomise(VisionTransformer(tiny(**FAMILIES["deit-distilled"])))
    tokens = m.forward_features(X)  # (B, 2 + 16, D): class, distillation, patches
    assert tokens.shape == (3, 18, 24) and m.pos_embed.shape == (1, 18, 24)
    expected = (m.head(tokens[:, 0]) + m.head_dist(tokens[:, 1])) / 2
    torch.testing.assert_close(m(X), expected)
    features = randomise(VisionTransformer(tiny(**FAMILIES["deit-distilled"], num_classes=0)))
    tokens = features.forward_features(X)
    torch.testing.assert_close(features(X), (tokens[:, 0] + tokens[:, 1]) / 2)  # timm's pre-logits


def test_fine_tuning_drops_the_distillation_head_and_keeps_the_token():
    m = randomise(VisionTransformer(tiny(**FAMILIES["deit-distilled"])))
    dist = m.dist_token.detach().clone()
    m.reset_classifier(2, labels=["a", "b"])
    assert m.head_dist is None and "head_dist.weight" not in m.state_dict()
    assert m.config.distillation_token and not m.config.distillation_head
    assert torch.equal(m.dist_token, dist)
    tokens = m.forward_features(X)
    torch.testing.assert_close(m(X), m.head(tokens[:, 0]))  # the class token alone, as DeiTForImageClassification
    again = VisionTransformer.from_state_dict(m.config, m.state_dict(), source="test")
    torch.testing.assert_close(again(X), m.eval()(X))


def test_fine_tuning_drops_clips_projection_unless_asked_to_keep_it():
    m = randomise(VisionTransformer(tiny(**FAMILIES["clip"])))
    m.reset_classifier(4, keep_projection=True)
    assert m.config.projection_dim == 12 and m.head.weight.shape == (4, 12)  # the head reads the embedding
    m.reset_classifier(4)
    assert m.config.projection_dim is None and isinstance(m.projection, torch.nn.Identity)
    assert m.head.weight.shape == (4, 24) and "projection.weight" not in m.state_dict()
    tokens = m.forward_features(X)
    torch.testing.assert_close(m(X), m.head(tokens[:, 0]))  # the pooled class token, as timm's CLIP fine-tunes


def test_registers_are_hidden_states_but_never_pooled():
    cfg = tiny(register_tokens=3, pool="mean")
    m = randomise(VisionTransformer(cfg))
    out = m(X, return_hidden_states=True, return_attentions=True)
    assert cfg.num_prefix_tokens == 4 and out.hidden_states[0].shape == (3, 4 + 16, 24)
    assert out.attentions[0].shape == (3, 3, 20, 20)
    tokens = m.forward_features(X)
    torch.testing.assert_close(m.pool(tokens), tokens[:, 4:].mean(1))  # patches only
    with torch.no_grad():  # a register changes the output only through attention, never as a pooled token
        m.reg_token.mul_(2)
    assert not torch.allclose(m(X), out.logits)


def test_positions_for_the_patches_only_keep_their_prefix_free():
    m = randomise(VisionTransformer(tiny(**FAMILIES["dinov2-registers"])))
    assert m.pos_embed.shape == (1, 16, 24)
    x = m.patch_embed(X)
    expected = torch.cat((m.cls_token.expand(3, -1, -1), m.reg_token.expand(3, -1, -1), x + m.pos_embed), dim=1)
    torch.testing.assert_close(m.embed(X), expected)
    s = VisionTransformer(tiny(pos_embed="sincos", pos_embed_patches_only=True, register_tokens=2))
    assert s.pos_embed.shape == (1, 16, 24) and s(X).shape == (3, 5)


@pytest.mark.parametrize("antialias", [False, True])
def test_position_grid_resizes_for_fine_tuning_as_its_family_does(antialias):
    from vitlab.models.position import resize_grid_embedding

    m = randomise(VisionTransformer(tiny(**FAMILIES["dinov2-registers"], pos_resize_antialias=antialias)))
    grid = m.pos_embed.detach().reshape(1, 4, 4, 24).permute(0, 3, 1, 2)
    m.resize_image_size(24)  # 4x4 -> 6x6 patches; the class and register tokens have no positions to keep
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=antialias)
    torch.testing.assert_close(m.pos_embed, ref.permute(0, 2, 3, 1).reshape(1, 36, 24))
    assert m(torch.randn(1, 3, 24, 24)).shape == (1, 24)
    # the kernels differ even when enlarging: antialias matters for parity with the peers
    pos = torch.randn(1, 1 + 16, 8)
    assert not torch.allclose(resize_grid_embedding(pos, (4, 4), (6, 6), 1),
                              resize_grid_embedding(pos, (4, 4), (6, 6), 1, antialias=True))


def test_mlp_activations():
    from vitlab.models.block import activation_layer

    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(activation_layer("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    torch.testing.assert_close(activation_layer("gelu_tanh")(x), F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(activation_layer("gelu")(x), F.gelu(x))
    m = VisionTransformer(tiny(mlp_activation="quick_gelu", pool="map", class_token=False))
    assert type(m.blocks[0].mlp.act).__name__ == "QuickGELU" and type(m.attn_pool.mlp.act).__name__ == "QuickGELU"


def test_attention_pool_fused_and_explicit_paths_agree():
    m = randomise(VisionTransformer(tiny(**FAMILIES["siglip"])))
    out = m(X, return_attentions=True)
    m.set_attention_impl("sdpa")
    torch.testing.assert_close(m(X), out.logits, atol=1e-5, rtol=1e-5)
    m.set_attention_impl("explicit")
    assert m.attn_pool.impl == "explicit"
    torch.testing.assert_close(m(X), out.logits, atol=1e-5, rtol=1e-5)
    assert out.pool_attention.shape == (3, 3, 1, 16)
    torch.testing.assert_close(out.pool_attention.sum(-1), torch.ones(3, 3, 1))
    # by hand: the probe's softmax attention over the final-norm patch tokens, output projection, residual MLP
    p, tokens = m.attn_pool, m.forward_features(X)
    q = p.q(p.latent).reshape(1, 3, 8).transpose(0, 1)  # (H, 1, hd)
    k, v = p.kv(tokens).reshape(3, 16, 2, 3, 8).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    probs = (q * 8**-0.5 @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(probs, out.pool_attention)
    pooled = p.proj((probs @ v).transpose(1, 2).reshape(3, 1, 24))
    torch.testing.assert_close(out.logits, (pooled + p.mlp(p.norm(pooled)))[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_image_counts_each_family(family):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(**FAMILIES[family])
    m = VisionTransformer(cfg).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(X[:1], return_attentions=True)  # explicit path: plain matmuls
    assert counter.get_total_flops() == cfg.flops_per_image()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(tmp_path, family):
    m = randomise(VisionTransformer(tiny(**FAMILIES[family], pos_resize_antialias=True)))
    m.save_pretrained(tmp_path / family)
    again = VisionTransformer.from_pretrained(tmp_path / family).eval()
    assert again.config == m.config
    assert torch.equal(again(X), m(X))


@pytest.mark.parametrize("kw, pattern", [
    (dict(register_tokens=-1), r"register_tokens=-1 must be a non-negative integer"),
    (dict(distillation_token=True, class_token=False, pool="mean"), r"distillation_token=True needs class_token=True"),
    (dict(distillation_head=True), r"distillation_head=True needs distillation_token=True"),
    (dict(distillation_token=True, distillation_head=True, pool="mean"), r"distillation_head=True needs pool='cls'"),
    (dict(mlp_activation="relu"), r"mlp_activation='relu' is not one of gelu, gelu_tanh, quick_gelu"),
    (dict(projection_dim=0), r"projection_dim=0 must be a positive integer or null"),
    (dict(projection_dim=8, representation_dim=8), r"projection_dim and representation_dim are both"),
    (dict(pool="attention"), r"pool='attention' is not one of cls, mean, map"),
])
def test_family_fields_are_validated(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(**kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rollout", "last"])
def test_attention_maps_are_a_patch_grid_for_every_family(family, method):
    m = randomise(VisionTransformer(tiny(**{**FAMILIES[family], "num_classes": 5})))
    maps = compute_attention_maps(m, X, method=method)
    assert maps.maps.shape == (3, 4, 4) and maps.head_maps.shape == (3, 3, 4, 4)  # registers are not in the grid
    torch.testing.assert_close(maps.maps.sum((-2, -1)), torch.ones(3))
    assert (maps.maps >= 0).all()


def test_attention_pool_rollout_weighs_the_patch_rows_by_the_probe():
    m = randomise(VisionTransformer(tiny(**FAMILIES["siglip"], register_tokens=2)))
    out = m(X, return_attentions=True)
    maps = attention_rollout(out.attentions, pool="map", num_prefix_tokens=2, grid_size=(4, 4),
                             pool_attention=out.pool_attention)
    rolled = rollout_matrix(out.attentions)  # (B, 18, 18); the probe reads tokens 2.. (the patches)
    row = (fuse_heads(out.pool_attention)[:, 0, None] @ rolled[:, 2:, :])[:, 0, 2:]  # patch columns
    torch.testing.assert_close(maps, (row / row.sum(-1, keepdim=True)).reshape(3, 4, 4))
    with pytest.raises(ConfigError, match=r"pool='map' needs pool_attention \(B, H, 1, 16\)"):
        attention_rollout(out.attentions, pool="map", num_prefix_tokens=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tuning_surgery_trains_every_family(family):
    # What prepare_finetune does, on the model: a new head for 2 classes, the grid resized from 16 to 24 px.
    torch.manual_seed(3)
    m = VisionTransformer(tiny(**FAMILIES[family])).train()
    m.resize_image_size(24)
    m.reset_classifier(2)
    assert m.config.grid_size == (6, 6) and m.head.out_features == 2 and m.head_dist is None
    assert m.pos_embed.shape[1] == m.config.num_pos_prefix_tokens + 36
    x, y = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # every weight learns
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_of_every_family_matches_pytorch(tmp_path, family):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from vitlab.interop import export_onnx

    m = randomise(VisionTransformer(tiny(**FAMILIES[family])))
    path = export_onnx(m, tmp_path / f"{family}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        (out,) = session.run(["logits"], {"pixel_values": x.numpy()})
        with torch.no_grad():
            ref = m(x).numpy()
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4
