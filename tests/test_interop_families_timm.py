"""timm files of today's pretrained families: DeiT distilled, DeiT III (positions for the patches only, layer
scale), registers (DINOv2), the attention-pool head without a class token (SigLIP), CLIP's image tower (pre-norm,
no patch bias, QuickGELU). timm cannot be installed here, so :class:`TimmFamilyViT` re-implements timm's
``VisionTransformer._pos_embed``, ``VisionTransformerDistilled.forward_head`` and ``AttentionPoolLatent`` with
timm's module names on top of the small timm-structured blocks of ``test_interop_timm``; its state dict is the
file. Every parameter is random, so a swapped or dropped tensor changes the outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise
from safetensors.torch import save_file
from test_interop_timm import TimmBlock, TimmPatchEmbed
from torch import nn

from vitlab import CheckpointError, ConfigError
from vitlab.interop import detect_format, load_pretrained
from vitlab.interop.timm import to_timm_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


class TimmQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class TimmAttentionPoolLatent(nn.Module):
    """timm.layers.AttentionPoolLatent (latent_len 1, no qk-norm, pool 'token'), its non-fused path."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmBlock(dim, heads, mlp, True, False).mlp

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        self.last_attention = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = self.proj((self.last_attention @ v).transpose(1, 2).reshape(B, 1, C))
        return (x + self.mlp(self.norm(x)))[:, 0]


class TimmFamilyViT(nn.Module):
    """timm's VisionTransformer (and VisionTransformerDistilled) with the switches of the new families."""

    def __init__(self, *, img=32, patch=8, dim=24, depth=2, heads=3, mlp=48, num_classes=5, class_token=True,
                 distilled=False, reg_tokens=0, no_embed_class=False, global_pool="token", pre_norm=False,
                 init_values=None, quick_gelu=False, eps=1e-6):
        super().__init__()
        self.global_pool, self.distilled, self.no_embed_class = global_pool, distilled, no_embed_class
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.patch_embed = TimmPatchEmbed(patch, dim)
        if pre_norm:  # timm: bias=not pre_norm
            self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim)) if reg_tokens else None
        embed_len = (img // patch) ** 2 + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, dim))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, mlp, True, init_values is not None) for _ in range(depth)])
        for blk in self.blocks:
            blk.norm1.eps = blk.norm2.eps = eps
            if quick_gelu:
                blk.mlp.act = TimmQuickGELU()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn_pool = TimmAttentionPoolLatent(dim, heads, mlp) if global_pool == "map" else None
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def _pos_embed(self, x):
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, getattr(self, "dist_token", None),
                                                        self.reg_token) if t is not None]
        if self.no_embed_class:  # deit-3: add, then concat
            return torch.cat(to_cat + [x + self.pos_embed], dim=1)
        return torch.cat(to_cat + [x], dim=1) + self.pos_embed

    def forward_features(self, x):
        return self.norm(self.blocks(self.norm_pre(self._pos_embed(self.patch_embed(x)))))

    def forward(self, x):
        x = self.forward_features(x)
        if self.distilled:  # VisionTransformerDistilled.forward_head at inference: the mean of the two heads
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        if self.attn_pool is not None:
            return self.head(self.attn_pool(x[:, self.num_prefix_tokens:]))
        return self.head(x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1))


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

FAMILIES = {
    "deit-distilled": dict(distilled=True),
    "deit-distilled-no-head": dict(distilled=True, num_classes=0),
    "deit3": dict(no_embed_class=True, init_values=1e-6),
    "registers": dict(reg_tokens=4),
    "dinov2-registers": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, num_classes=0),
    "siglip-map": dict(class_token=False, global_pool="map", num_classes=0),
    "map-with-class-token": dict(global_pool="map"),
    "clip-quickgelu": dict(pre_norm=True, quick_gelu=True, eps=1e-5),
}
EXPECTED = {
    "deit-distilled": dict(distillation_token=True, distillation_head=True, num_classes=5),
    "deit-distilled-no-head": dict(distillation_token=True, distillation_head=True, num_classes=0),
    "deit3": dict(pos_embed_patches_only=True, layer_scale=1e-5),
    "registers": dict(register_tokens=4, pos_embed_patches_only=False),
    "dinov2-registers": dict(register_tokens=4, pos_embed_patches_only=True, num_classes=0),
    "siglip-map": dict(class_token=False, pool="map"),
    "map-with-class-token": dict(class_token=True, pool="map"),
    "clip-quickgelu": dict(norm_before_blocks=True, patch_embed_bias=False, norm_eps=1e-5,
                           mlp_activation="quick_gelu"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_family_file_gives_the_outputs_of_its_model(tmp_path, family, suffix):
    peer = randomise(TimmFamilyViT(**FAMILIES[family]), seed=len(family))
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in peer.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    assert detect_format(path) == "timm"
    overrides = dict(mlp_activation="quick_gelu") if family == "clip-quickgelu" else {}  # a timm file cannot say
    model = load_pretrained(path, num_heads=3, **overrides)
    c = model.config
    assert c.image_size == (32, 32) and c.pos_resize_antialias  # timm resizes grids with antialias=True
    for field, value in EXPECTED[family].items():
        assert getattr(c, field) == value, field
    with torch.no_grad():
        torch.testing.assert_close(model(X), peer(X), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(X), peer.forward_features(X), atol=1e-5, rtol=0)
    # and back: vitlab -> timm names loads strictly into timm's module with equal outputs
    back = TimmFamilyViT(**FAMILIES[family]).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(X), peer(X), atol=1e-5, rtol=0)


def test_attention_pool_probabilities_are_timms(tmp_path):
    peer = randomise(TimmFamilyViT(**FAMILIES["siglip-map"]), seed=3)
    save_file(peer.state_dict(), tmp_path / "siglip.safetensors")
    model = load_pretrained(tmp_path / "siglip.safetensors", num_heads=3)
    with torch.no_grad():
        out = model(X, return_attentions=True)
        peer(X)
    assert out.pool_attention.shape == (3, 3, 1, 16)
    torch.testing.assert_close(out.pool_attention, peer.attn_pool.last_attention, atol=1e-6, rtol=0)


def test_the_image_size_settles_what_the_positions_cannot(tmp_path):
    # 5 prefix tokens and a 3x3 grid without their positions (9) could be a 2x2 grid with them (4 + 5).
    peer = randomise(TimmFamilyViT(img=24, reg_tokens=4, no_embed_class=True), seed=5)
    save_file(peer.state_dict(), tmp_path / "reg.safetensors")
    assert load_pretrained(tmp_path / "reg.safetensors", num_heads=3).config.image_size == (16, 16)
    model = load_pretrained(tmp_path / "reg.safetensors", num_heads=3, image_size=24)
    assert model.config.pos_embed_patches_only
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match=r"pos_embed holds 9 positions but image_size=\(32, 32\) gives 16 "
                                              r"patches \(5 tokens before them\)"):
        load_pretrained(tmp_path / "reg.safetensors", num_heads=3, image_size=32)


def _timm_keys(**extra):
    state = randomise(TimmFamilyViT()).state_dict()
    return {**state, **extra}


@pytest.mark.parametrize("extra, pattern", [
    ({"blocks.0.attn.relative_position_bias_table": torch.zeros(732, 3)},
     r"a BEiT checkpoint \(key 'blocks.0.attn.relative_position_bias_table': relative position bias\), which "
     r"vitlab cannot express"),
    ({"blocks.0.attn.q_bias": torch.zeros(24), "blocks.0.attn.v_bias": torch.zeros(24)},
     r"an EVA / BEiT checkpoint \(key 'blocks.0.attn.q_bias'"),
    ({"blocks.0.gamma_1": torch.zeros(24)}, r"an EVA-style \(DINOv3, ViT-RoPE\) checkpoint \(key 'blocks.0.gamma_1'"),
    ({"blocks.0.attn.q_norm.weight": torch.zeros(8)}, r"a qk-norm ViT checkpoint \(key 'blocks.0.attn.q_norm.weight'"),
    ({"blocks.0.mlp.fc1.weight": torch.zeros(96, 24), "blocks.0.mlp.fc1.bias": torch.zeros(96)},
     r"a SwiGLU-MLP checkpoint such as DINOv2 giant's \(key 'blocks.0.mlp.fc1.weight' has 96 rows, twice the 48"),
])
def test_families_vitlab_cannot_express_are_refused_by_the_key_that_shows_them(tmp_path, extra, pattern):
    path = tmp_path / "other.safetensors"
    save_file(_timm_keys(**extra), path)
    with pytest.raises(CheckpointError, match=pattern) as refused:
        load_pretrained(path, num_heads=3)
    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)
    if "SwiGLU" not in pattern:  # a key gives it away: detection, which reads only the names, refuses it too
        with pytest.raises(CheckpointError, match=pattern):
            detect_format(path)


def test_exports_timm_cannot_hold_are_refused():
    from vitlab import ViTConfig, VisionTransformer

    base = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=1, num_heads=3, mlp_dim=48, num_classes=5)
    fine_tuned_deit = VisionTransformer(base.replace(distillation_token=True))  # its head_dist was dropped
    with pytest.raises(ConfigError, match="a distillation token without its head .* has no timm vision_transformer "
                                          "equivalent"):
        to_timm_state_dict(fine_tuned_deit)


def test_clip_projection_is_written_as_timms_head(tmp_path):
    from vitlab import ViTConfig, VisionTransformer

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=1, num_heads=3, mlp_dim=48, num_classes=0,
                    norm_before_blocks=True, patch_embed_bias=False, projection_dim=10, norm_eps=1e-5)
    model = randomise(VisionTransformer(cfg), seed=2)
    state = to_timm_state_dict(model)
    assert torch.equal(state["head.bias"], torch.zeros(10))  # as timm holds OpenAI's CLIP (num_classes=512)
    save_file(state, tmp_path / "clip.safetensors")
    again = load_pretrained(tmp_path / "clip.safetensors", num_heads=3)
    assert again.config.num_classes == 10 and again.config.projection_dim is None
    with torch.no_grad():
        torch.testing.assert_close(again(X), model(X), atol=1e-6, rtol=0)


def test_a_head_count_no_rule_can_guess_is_asked_for(tmp_path):
    peer = randomise(TimmFamilyViT(dim=8, heads=2, mlp=16))
    save_file(peer.state_dict(), tmp_path / "w8.safetensors")
    with pytest.raises(CheckpointError, match=r"w8.safetensors: hidden size 8 is not a standard ViT size and the file "
                                              r"does not store the number of attention heads \(the usual rule, "
                                              r"64-wide heads, gives 0 heads\); pass num_heads=N \(CLI: "
                                              r"--num-heads N\)"):
        load_pretrained(tmp_path / "w8.safetensors")
    assert load_pretrained(tmp_path / "w8.safetensors", num_heads=2).config.num_heads == 2


def test_new_standard_widths_need_no_head_count(tmp_path):
    peer = randomise(TimmFamilyViT(dim=512, heads=8, mlp=64, depth=1, num_classes=2), seed=9)  # DeiT III Medium
    save_file(peer.state_dict(), tmp_path / "m.safetensors")
    model = load_pretrained(tmp_path / "m.safetensors")
    assert model.config.num_heads == 8
    with torch.no_grad():
        torch.testing.assert_close(model(X), peer(X), atol=1e-4, rtol=0)
