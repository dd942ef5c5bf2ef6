"""timm ``vision_transformer`` state dicts. timm cannot be installed here, so a small module written with timm's
structure and module names (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``ls1.gamma``, ``fc_norm``, ``head``)
produces the files; its forward follows timm's ``VisionTransformer.forward_features/forward_head``."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise
from safetensors.torch import save_file
from torch import nn

from vitlab import CheckpointError, VisionTransformer
from vitlab.interop import detect_format, load_pretrained
from vitlab.interop.timm import to_timm_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TimmLayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, mlp, qkv_bias, layer_scale):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads, qkv_bias)
        self.ls1 = TimmLayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, mlp)
        self.ls2 = TimmLayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm's VisionTransformer with ``global_pool`` in ('token', 'avg') and ``fc_norm`` as timm decides it."""

    def __init__(self, *, img=32, patch=8, dim=24, depth=2, heads=3, mlp=48, num_classes=5, class_token=True,
                 global_pool="token", fc_norm=None, qkv_bias=True, layer_scale=False):
        super().__init__()
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.global_pool, self.num_prefix = global_pool, int(class_token)
        self.patch_embed = TimmPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + self.num_prefix, dim))
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, mlp, qkv_bias, layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        x = x[:, self.num_prefix:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return self.head(self.fc_norm(x))


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

VARIANTS = {
    "cls-token": dict(),
    "fc_norm-avg": dict(global_pool="avg"),
    "gap-no-class-token": dict(global_pool="avg", class_token=False),
    "avg-no-fc_norm": dict(global_pool="avg", fc_norm=False),
    "no-qkv-bias-layer-scale": dict(qkv_bias=False, layer_scale=True),
    "no-head": dict(num_classes=0),
}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_gives_the_logits_of_its_model(tmp_path, name, suffix):
    peer = randomise(TimmViT(**VARIANTS[name]))
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in peer.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    assert detect_format(path) == "timm"
    # timm's weights cannot tell mean pooling with the norm before pooling from class-token pooling
    overrides = dict(pool="mean") if name == "avg-no-fc_norm" else {}
    model = load_pretrained(path, num_heads=3, **overrides)
    assert model.config.depth == 2 and model.config.image_size == (32, 32) and model.config.num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(model(X), peer(X), atol=1e-5, rtol=0)
    # and the reverse: vitlab -> timm names loads strictly into timm's module with equal logits
    back = TimmViT(**VARIANTS[name]).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(X), peer(X), atol=1e-5, rtol=0)


def test_wrapped_and_ddp_prefixed_checkpoint(tmp_path):
    peer = randomise(TimmViT(dim=192, heads=3), seed=4)  # ViT-Ti width: heads from the standard table
    torch.save({"model": {f"module.{k}": v for k, v in peer.state_dict().items()}, "epoch": 3}, tmp_path / "c.pth")
    model = load_pretrained(tmp_path / "c.pth")
    assert model.config.num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(model(X), peer(X), atol=1e-5, rtol=0)


def test_in21k_pre_logits_layer(tmp_path):
    from vitlab import ViTConfig

    model = randomise(VisionTransformer(ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=1,
                                                    num_heads=3, mlp_dim=48, num_classes=7, representation_dim=10)))
    state = to_timm_state_dict(model)
    assert state["pre_logits.fc.weight"].shape == (10, 24)
    save_file(state, tmp_path / "in21k.safetensors")
    loaded = load_pretrained(tmp_path / "in21k.safetensors", num_heads=3)
    assert loaded.config.representation_dim == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=1e-6, rtol=0)


def test_unexpected_missing_and_mis_shaped_keys_are_named(tmp_path):
    state = randomise(TimmViT()).state_dict()
    path = tmp_path / "bad.safetensors"
    save_file({**state, "dist_token": torch.zeros(1, 1, 24)}, path)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: unexpected key 'dist_token' of shape \(1, 1, 24\)"):
        load_pretrained(path, num_heads=3)
    save_file({k: v for k, v in state.items() if k != "blocks.1.norm2.bias"}, path)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: missing key 'blocks.1.norm2.bias'"):
        load_pretrained(path, num_heads=3)
    save_file({**state, "blocks.0.mlp.fc2.weight": torch.zeros(24, 47)}, path)
    with pytest.raises(CheckpointError, match=r"key 'blocks.0.mlp.fc2.weight' has shape \(24, 47\)"):
        load_pretrained(path, num_heads=3)


def test_heads_of_a_non_standard_width_must_be_given(tmp_path):
    save_file(randomise(TimmViT()).state_dict(), tmp_path / "w24.safetensors")
    with pytest.raises(CheckpointError, match=r"hidden size 24 .* pass num_heads=N"):
        load_pretrained(tmp_path / "w24.safetensors")


class NotWeights:
    """A pickled object: ``torch.load(weights_only=True)`` must refuse to build it."""


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"model": NotWeights()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match=r"obj.pth: cannot read it as a PyTorch weights file with "
                                              r"weights_only=True"):
        load_pretrained(tmp_path / "obj.pth")


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a zip or a pickle")
    with pytest.raises(CheckpointError, match=r"junk.pth: cannot read it as a PyTorch weights file"):
        load_pretrained(tmp_path / "junk.pth")
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: not a known ViT layout \(first key 'linear.weight'\)"):
        load_pretrained(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"nothing.pth: no such file"):
        load_pretrained(tmp_path / "nothing.pth")


def test_export_refuses_a_conv_stem():
    from vitlab import ConfigError, ViTConfig

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_dim=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3,
                    patch_embed="conv_stem")
    with pytest.raises(ConfigError, match="patch_embed='conv_stem' has no timm vision_transformer equivalent"):
        to_timm_state_dict(VisionTransformer(cfg))
