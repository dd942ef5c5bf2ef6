"""torchvision ``vit_b_16``-style state dicts. torchvision cannot be built here, so a small module with
torchvision's structure (``conv_proj``, ``class_token``, ``encoder.layers.encoder_layer_N`` with an
``nn.MultiheadAttention`` and an ``nn.Sequential`` MLP, ``heads.head``) writes the files; its forward follows
torchvision's ``VisionTransformer.forward``."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import randomise
from torch import nn

from vitlab import CheckpointError
from vitlab.interop import detect_format, load_pretrained
from vitlab.interop.torchvision import to_torchvision_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


class EncoderBlock(nn.Module):
    def __init__(self, heads, dim, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq, depth, heads, dim, mlp):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(heads, dim, mlp)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(nn.Module):
    def __init__(self, *, img=32, patch=8, depth=2, heads=4, dim=32, mlp=64, num_classes=6, representation=None):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder((img // patch) ** 2 + 1, depth, heads, dim, mlp)
        layers = OrderedDict()
        if representation:
            layers["pre_logits"] = nn.Linear(dim, representation)
            layers["act"] = nn.Tanh()
        layers["head"] = nn.Linear(representation or dim, num_classes)
        self.heads = nn.Sequential(layers)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("representation", [None, 12])
def test_torchvision_state_dict_gives_the_logits_of_its_model(tmp_path, representation):
    peer = randomise(TorchvisionViT(representation=representation))
    torch.save(peer.state_dict(), tmp_path / "vit_b_16.pth")
    assert detect_format(tmp_path / "vit_b_16.pth") == "torchvision"
    model = load_pretrained(tmp_path / "vit_b_16.pth", num_heads=4)
    assert (model.config.num_classes, model.config.representation_dim) == (6, representation)
    with torch.no_grad():
        torch.testing.assert_close(model(X), peer(X), atol=1e-5, rtol=0)
    back = TorchvisionViT(representation=representation).eval()
    back.load_state_dict(to_torchvision_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(X), peer(X), atol=1e-5, rtol=0)


def test_pre_0_13_mlp_names_and_wrong_head_count(tmp_path):
    peer = randomise(TorchvisionViT(), seed=2)
    state = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
             for k, v in peer.state_dict().items()}
    torch.save(state, tmp_path / "old.pth")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "old.pth", num_heads=4)(X), peer(X), atol=1e-5, rtol=0)
        # heads are not in the file: a wrong count loads but computes something else
        assert (load_pretrained(tmp_path / "old.pth", num_heads=2)(X) - peer(X)).abs().max() > 1e-3


def test_shape_mismatch_is_named(tmp_path):
    state = randomise(TorchvisionViT()).state_dict()
    state["encoder.layers.encoder_layer_1.self_attention.out_proj.weight"] = torch.zeros(32, 31)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth: key 'blocks.1.attn.proj.weight' has shape \(32, 31\)"):
        load_pretrained(tmp_path / "bad.pth", num_heads=4)
    state["encoder.layers.encoder_layer_1.self_attention.out_proj.weight"] = torch.zeros(32, 32)
    del state["encoder.layers.encoder_layer_1.ln_2.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth: missing key 'blocks.1.norm2.weight'"):
        load_pretrained(tmp_path / "bad.pth", num_heads=4)


def test_linear_patch_embedding_loads_with_the_conv_models_logits(tmp_path):
    peer = randomise(TorchvisionViT(), seed=3)
    torch.save(peer.state_dict(), tmp_path / "vit.pth")
    conv = load_pretrained(tmp_path / "vit.pth", num_heads=4)
    linear = load_pretrained(tmp_path / "vit.pth", num_heads=4, patch_embed="linear")
    assert linear.config.patch_embed == "linear" and linear.patch_embed.proj.weight.shape == (32, 3 * 8 * 8)
    with torch.no_grad():
        torch.testing.assert_close(linear(X), conv(X), atol=1e-5, rtol=0)
        torch.testing.assert_close(linear(X), peer(X), atol=1e-5, rtol=0)
    back = TorchvisionViT().eval()  # and back: a linear patch embedding is written as the equal convolution
    back.load_state_dict(to_torchvision_state_dict(linear), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(X), peer(X), atol=1e-5, rtol=0)
