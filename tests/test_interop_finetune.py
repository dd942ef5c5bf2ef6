"""Fine-tuning a converted checkpoint: new head, new resolution, layer-wise lr decay, linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitlab import ViTConfig, VisionTransformer
from vitlab.interop import load_pretrained
from vitlab.models.finetune import prepare_finetune
from vitlab.interop.jax_npz import to_jax_arrays
from vitlab.interop.timm import to_timm_state_dict
from vitlab.training.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

PRETRAINED = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=2, num_heads=3, mlp_dim=48,
                       num_classes=10)


@pytest.fixture()
def checkpoint(tmp_path):
    """A 'pretrained' 10-class model at 32 px, written as a timm file."""
    torch.manual_seed(0)
    path = tmp_path / "pretrained.safetensors"
    save_file(to_timm_state_dict(VisionTransformer(PRETRAINED)), path)
    return path




def _fixture_batch(n=16, size=48, seed=0):
    """Two classes a model can learn in a few steps: a bright square in the top half or in the bottom half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.arange(n) % 2
    for i in range(n):
        top = 0 if y[i] == 0 else size // 2
        left = int(torch.randint(0, size - 16, (1,), generator=g))
        x[i, :, top + 4:top + 16, left:left + 16] += 2.0
    return x, y


def _train(model, groups, steps, x, y, lr):
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_full_finetune_at_a_new_resolution_with_layer_decay(checkpoint):
    model = load_pretrained(checkpoint, num_heads=3)
    cls_pos = model.pos_embed[:, :1].detach().clone()
    prepare_finetune(model, labels=["top", "bottom"], image_size=48)
    assert model.config.num_classes == 2 and model.config.labels == ["top", "bottom"]
    assert model.config.image_size == (48, 48) and model.pos_embed.shape == (1, 1 + 36, 24)
    assert torch.equal(model.pos_embed[:, :1], cls_pos)  # the class token's position is kept as it was
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    lr_of = {name: 1e-3 * g["lr_scale"] for g in groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert lr_of["head.weight"] == pytest.approx(1e-3) and lr_of["norm.weight"] == pytest.approx(1e-3)
    assert lr_of["blocks.1.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.25)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.125) == lr_of["pos_embed"]
    assert wd_of["blocks.0.mlp.fc1.weight"] == 0.05 and wd_of["blocks.0.mlp.fc1.bias"] == 0.0 == wd_of["pos_embed"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    x, y = _fixture_batch()
    losses = _train(model, groups, 20, x, y, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_linear_probe_moves_only_the_head(tmp_path):
    torch.manual_seed(1)
    source = VisionTransformer(PRETRAINED.replace(representation_dim=16))
    with torch.no_grad():  # larger weights than the init's, so the frozen features depend on the image
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    np.savez(tmp_path / "ViT-tiny.npz", **to_jax_arrays(source))  # a converted JAX checkpoint this time
    model = prepare_finetune(load_pretrained(tmp_path / "ViT-tiny.npz"), num_classes=2, image_size=48,
                             linear_probe=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    # the in21k-style pre-logits layer went with the old head (the paper's fine-tuning), as did its config field
    assert model.config.representation_dim is None and "pre_logits.0.weight" not in model.state_dict()
    assert model.head.weight.shape == (2, 24)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head_before = model.head.weight.detach().clone()
    groups = param_groups(model, weight_decay=0.0, layer_decay=0.75)
    assert {n for g in groups for n in g["names"]} == trainable
    x, y = _fixture_batch(seed=3)
    losses = _train(model, groups, 30, x, y, lr=2e-2)
    assert losses[-1] < 0.8 * losses[0], losses  # 0.37-0.65 of the first loss over seeds 0-3
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert not torch.equal(model.head.weight, head_before)


def test_keep_pre_logits(tmp_path):
    source = VisionTransformer(PRETRAINED.replace(representation_dim=16))
    np.savez(tmp_path / "in21k.npz", **to_jax_arrays(source))
    model = prepare_finetune(load_pretrained(tmp_path / "in21k.npz"), num_classes=3, keep_pre_logits=True)
    assert model.config.representation_dim == 16 and model.head.weight.shape == (3, 16)
    torch.testing.assert_close(model.pre_logits[0].weight, source.pre_logits[0].weight)


def test_same_classes_keep_the_pretrained_head(checkpoint):
    model = load_pretrained(checkpoint, num_heads=3)
    head = model.head.weight.detach().clone()
    prepare_finetune(model, num_classes=10)
    assert torch.equal(model.head.weight, head)
    prepare_finetune(model, num_classes=10, reset_head=True)
    assert not torch.equal(model.head.weight, head)
