"""Attention rollout and last-layer maps: exact values on hand-made attentions and on hand-set real models."""

from __future__ import annotations

import pytest
import torch

from vitlab import ViTConfig, VisionTransformer
from vitlab.errors import ConfigError
from vitlab.explain.rollout import attention_rollout, fuse_heads, last_layer_attention, rollout_matrix


def _tiny(**changes) -> VisionTransformer:
    cfg = ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=3, hidden_dim=16, depth=2, num_heads=2,
                    mlp_dim=32)
    return VisionTransformer(cfg.replace(**changes)).eval()


def _set_attention(model: VisionTransformer, q_dirs: torch.Tensor, k_dirs: torch.Tensor, gain: float) -> None:
    """Give every head of every block q = gain * q_dirs @ t and k = gain * k_dirs @ t for a (normed) token t;
    ``q_dirs``, ``k_dirs``: (head_dim, hidden_dim). v = 0."""
    c = model.config
    d, hd = c.hidden_dim, c.head_dim
    with torch.no_grad():
        for blk in model.blocks:
            w = torch.zeros(3 * d, d)
            for h in range(c.num_heads):
                w[h * hd:(h + 1) * hd] = gain * q_dirs
                w[d + h * hd:d + (h + 1) * hd] = gain * k_dirs
            blk.attn.qkv.weight.copy_(w)
            blk.attn.qkv.bias.zero_()


def _one_hot_tokens(model: VisionTransformer) -> None:
    """Zero the patch projection and give token i the position code e_i (N <= hidden_dim), so the tokens
    entering every block are distinct one-hot vectors, whatever the image."""
    c = model.config
    n = c.num_patches + c.num_prefix_tokens
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        if model.cls_token is not None:
            model.cls_token.zero_()
        model.pos_embed.copy_(torch.eye(n, c.hidden_dim)[None] * 10.0)
        for blk in model.blocks:
            # v = 0 and zero MLP output keep the tokens unchanged from block to block.
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.bias.zero_()


def test_fused_probabilities_rows_sum_to_one_through_real_model():
    torch.manual_seed(0)
    model = _tiny()
    out = model(torch.randn(3, 1, 8, 8), return_attentions=True)
    assert len(out.attentions) == 2
    for a in out.attentions:
        assert a.shape == (3, 2, 17, 17)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 17), rtol=0, atol=1e-5)
    roll = rollout_matrix(out.attentions)
    torch.testing.assert_close(roll.sum(-1), torch.ones(3, 17), rtol=0, atol=1e-5)
    maps = attention_rollout(out.attentions, grid_size=model.config.grid_size)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3), rtol=0, atol=1e-5)
    assert last_layer_attention(out.attentions).shape == (3, 2, 4, 4)


def test_identity_attention_gives_uniform_rollout_through_real_model():
    model = _tiny(hidden_dim=64, num_heads=2)  # 17 tokens; their one-hot codes fit in a 32-dim head
    _one_hot_tokens(model)
    # q = k = the token's (normed) code: q_i . k_j is large only for i == j, so each token attends to itself.
    eye = torch.eye(32, 64)
    _set_attention(model, eye, eye, gain=3.0)
    out = model(torch.randn(2, 1, 8, 8), return_attentions=True)
    for a in out.attentions:
        torch.testing.assert_close(a, torch.eye(17).expand(2, 2, 17, 17), rtol=0, atol=1e-4)
    # Rolled out, identity stays identity: the class token never reads a patch, so no patch is preferred.
    torch.testing.assert_close(rollout_matrix(out.attentions), torch.eye(17).expand(2, 17, 17), rtol=0, atol=1e-4)
    maps = attention_rollout(out.attentions)
    torch.testing.assert_close(maps, torch.full((2, 4, 4), 1 / 16), rtol=0, atol=1e-5)


def test_identity_attention_gives_uniform_rollout_mean_pooled_model():
    model = _tiny(hidden_dim=64, num_heads=2, class_token=False, pool="mean")  # 16 patch tokens, no class token
    _one_hot_tokens(model)
    eye = torch.eye(32, 64)
    _set_attention(model, eye, eye, gain=3.0)
    out = model(torch.randn(2, 1, 8, 8), return_attentions=True)
    torch.testing.assert_close(out.attentions[-1], torch.eye(16).expand(2, 2, 16, 16), rtol=0, atol=1e-4)
    # Mean over the patch rows of the identity: every patch exactly 1/16, no degenerate case involved.
    maps = attention_rollout(out.attentions, pool="mean", num_prefix_tokens=0)
    torch.testing.assert_close(maps, torch.full((2, 4, 4), 1 / 16), rtol=0, atol=1e-5)


def test_every_layer_attending_to_patch_k_peaks_at_k_through_real_model():
    k = 6  # patch index in the 4x4 grid: row 1, column 2; token k + 1
    model = _tiny(hidden_dim=64, num_heads=2)
    _one_hot_tokens(model)
    # Every query is the same direction, and only token k+1's key points along it.
    q = torch.zeros(32, 64)
    q[0, :17] = 1.0  # query = sum of the token's code = the same for every token
    key = torch.zeros(32, 64)
    key[0, k + 1] = 1.0  # key of token j is large only for j = k+1
    _set_attention(model, q, key, gain=4.0)
    out = model(torch.randn(2, 1, 8, 8), return_attentions=True)
    assert (out.attentions[0][..., k + 1] > 0.99).all()
    for maps in (attention_rollout(out.attentions), last_layer_attention(out.attentions).mean(1)):
        flat = maps.reshape(2, 16)
        assert (flat.argmax(-1) == k).all()
        assert (maps[:, 1, 2] > 0.9).all()


def test_rollout_of_one_layer_equals_its_fused_attention_plus_identity():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, 5)
    attn = logits.softmax(-1)
    for fusion in ("mean", "max", "min"):
        fused = fuse_heads(attn, fusion)
        expected = fused + torch.eye(5)
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(rollout_matrix([attn], fusion), expected)
        row = expected[:, 0, 1:]
        torch.testing.assert_close(attention_rollout([attn], fusion), (row / row.sum(-1, keepdim=True)).view(2, 2, 2))
    # The model's own attention, through return_attentions, one block.
    model = _tiny(depth=1)
    out = model(torch.randn(2, 1, 8, 8), return_attentions=True)
    fused = out.attentions[0].mean(1) + torch.eye(17)
    fused = fused / fused.sum(-1, keepdim=True)
    torch.testing.assert_close(rollout_matrix(out.attentions), fused)


def test_rollout_multiplies_layers_in_order():
    torch.manual_seed(2)
    a1, a2 = torch.randn(2, 1, 1, 4, 4).softmax(-1)
    r = lambda a: (a[:, 0] + torch.eye(4)) / 2  # noqa: E731
    torch.testing.assert_close(rollout_matrix([a1, a2]), r(a2) @ r(a1))
    assert not torch.allclose(r(a2) @ r(a1), r(a1) @ r(a2))


def test_head_fusions_and_discard_ratio_exact():
    attn = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]],
                          [[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]]]])  # (1, 2, 3, 3)
    torch.testing.assert_close(fuse_heads(attn, "max")[0, 0], torch.tensor([0.5, 0.6, 0.3]))
    torch.testing.assert_close(fuse_heads(attn, "min")[0, 0], torch.tensor([0.1, 0.3, 0.2]))
    # mean fused: [[.3,.45,.25],[.2,.2,.6],[.55,.125,.325]]; discarding 4 of 9 zeroes .125,.2,.2,.25
    m = rollout_matrix([attn], "mean", discard_ratio=4 / 9 + 1e-6)
    expected = torch.tensor([[1.3, 0.45, 0.0], [0.0, 1.0, 0.6], [0.55, 0.0, 1.325]])
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(m[0], expected)


def test_mean_pooled_model_without_class_token():
    torch.manual_seed(3)
    model = _tiny(class_token=False, pool="mean")
    out = model(torch.randn(2, 1, 8, 8), return_attentions=True)
    assert out.attentions[0].shape == (2, 2, 16, 16)
    maps = attention_rollout(out.attentions, pool="mean", num_prefix_tokens=0)
    expected = rollout_matrix(out.attentions).mean(1)
    torch.testing.assert_close(maps, (expected / expected.sum(-1, keepdim=True)).view(2, 4, 4))
    with pytest.raises(ConfigError, match="class token"):
        attention_rollout(out.attentions, pool="cls", num_prefix_tokens=0)


def test_non_square_grid_needs_grid_size():
    attn = torch.full((1, 1, 7, 7), 1 / 7)
    with pytest.raises(ConfigError, match="square"):
        attention_rollout([attn])
    maps = attention_rollout([attn], grid_size=(2, 3))
    torch.testing.assert_close(maps, torch.full((1, 2, 3), 1 / 6))
