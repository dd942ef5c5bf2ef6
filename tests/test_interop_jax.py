"""google-research ``.npz`` checkpoints: real ``.npz`` files in the published key layout and shapes, checked
against a NumPy forward pass written with Flax's conventions (HWIO conv, ``(D, H, hd)`` attention kernels,
``(in, out)`` Dense kernels), independent of vitlab's mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import randomise

from vitlab import CheckpointError, ViTConfig, VisionTransformer
from vitlab.interop import detect_format, load_pretrained
from vitlab.interop.jax_npz import to_jax_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

_erf = np.vectorize(math.erf)


def _ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def jax_vit_forward(a: dict[str, np.ndarray], images_nchw: np.ndarray) -> np.ndarray:
    """The google-research ViT forward pass on npz arrays, in float64 (GELU exact, as vitlab and timm use)."""
    tree = lambda prefix: {k[len(prefix):]: v.astype(np.float64) for k, v in a.items() if k.startswith(prefix)}  # noqa: E731
    x = images_nchw.transpose(0, 2, 3, 1).astype(np.float64)  # NHWC
    ph, pw, c, d = a["embedding/kernel"].shape
    b, h, w, _ = x.shape
    patches = x.reshape(b, h // ph, ph, w // pw, pw, c)
    x = np.einsum("bipjqc,pqcd->bijd", patches, a["embedding/kernel"]) + a["embedding/bias"]
    x = x.reshape(b, -1, d)
    if "cls" in a:
        x = np.concatenate([np.broadcast_to(a["cls"], (b, 1, d)), x], axis=1)
    x = x + a["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        blk = f"Transformer/encoderblock_{i}/"
        y = _ln(x, tree(blk + "LayerNorm_0/"))
        att = tree(blk + "MultiHeadDotProductAttention_1/")
        q, k, v = (np.einsum("bnd,dhk->bnhk", y, att[n + "/kernel"]) + att[n + "/bias"] for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = np.einsum("bhqs,bshk->bqhk", probs, v)
        x = x + np.einsum("bqhk,hkd->bqd", y, att["out/kernel"]) + att["out/bias"]
        y = _dense(_ln(x, tree(blk + "LayerNorm_2/")), tree(blk + "MlpBlock_3/Dense_0/"))
        y = 0.5 * y * (1 + _erf(y / np.sqrt(2)))
        x = x + _dense(y, tree(blk + "MlpBlock_3/Dense_1/"))
        i += 1
    x = _ln(x, tree("Transformer/encoder_norm/"))
    x = x[:, 0] if "cls" in a else x.mean(axis=1)
    if "pre_logits/kernel" in a:
        x = np.tanh(_dense(x, tree("pre_logits/")))
    return _dense(x, tree("head/"))


def _random_arrays(*, depth=2, heads=3, hd=8, mlp=40, patch=(8, 4), grid=(4, 8), classes=5, cls=True,
                   pre_logits=None, seed=0):
    """Arrays with the shapes of a google-research checkpoint, random values."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    d = heads * hd
    a = {"embedding/kernel": r(*patch, 3, d), "embedding/bias": r(d),
         "Transformer/posembed_input/pos_embedding": r(1, grid[0] * grid[1] + int(cls), d),
         "Transformer/encoder_norm/scale": r(d), "Transformer/encoder_norm/bias": r(d)}
    if cls:
        a["cls"] = r(1, 1, d)
    for i in range(depth):
        blk = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{blk}{ln}/scale"], a[f"{blk}{ln}/bias"] = r(d), r(d)
        for n in ("query", "key", "value"):
            a[f"{blk}MultiHeadDotProductAttention_1/{n}/kernel"] = r(d, heads, hd)
            a[f"{blk}MultiHeadDotProductAttention_1/{n}/bias"] = r(heads, hd)
        a[f"{blk}MultiHeadDotProductAttention_1/out/kernel"] = r(heads, hd, d)
        a[f"{blk}MultiHeadDotProductAttention_1/out/bias"] = r(d)
        a[f"{blk}MlpBlock_3/Dense_0/kernel"], a[f"{blk}MlpBlock_3/Dense_0/bias"] = r(d, mlp), r(mlp)
        a[f"{blk}MlpBlock_3/Dense_1/kernel"], a[f"{blk}MlpBlock_3/Dense_1/bias"] = r(mlp, d), r(d)
    head_in = d
    if pre_logits:
        a["pre_logits/kernel"], a["pre_logits/bias"] = r(d, pre_logits), r(pre_logits)
        head_in = pre_logits
    a["head/kernel"], a["head/bias"] = r(head_in, classes), r(classes)
    return a


IMAGES = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)

CASES = {
    "fine-tuned (ViT-B_16 imagenet2012 style)": dict(),
    "in21k with pre_logits": dict(pre_logits=11),
    "old file, opt/target/ prefix": dict(),
    "gap, no class token": dict(cls=False),
}


@pytest.mark.parametrize("case", CASES)
def test_npz_gives_the_logits_of_the_jax_model(tmp_path, case):
    arrays = _random_arrays(**CASES[case])
    prefix = "opt/target/" if "opt/target" in case else ""
    path = tmp_path / "ViT-X_8.npz"
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    assert detect_format(path) == "jax"
    model = load_pretrained(path)
    c = model.config
    assert (c.image_size, c.patch_size, c.num_heads, c.hidden_dim, c.mlp_dim, c.depth) == ((32, 32), (8, 4), 3, 24, 40, 2)
    assert c.class_token == ("cls" in arrays) and c.representation_dim == CASES[case].get("pre_logits")
    with torch.no_grad():
        ours = model(torch.from_numpy(IMAGES)).double().numpy()
    np.testing.assert_allclose(ours, jax_vit_forward(arrays, IMAGES), atol=1e-5, rtol=0)


def test_vitlab_to_npz_and_back(tmp_path):
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_dim=24, depth=2, num_heads=4, mlp_dim=40, num_classes=3,
                    representation_dim=6)
    model = randomise(VisionTransformer(cfg))  # biases and norms too, so a bias bug shows
    arrays = to_jax_arrays(model)
    assert arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"].shape == (4, 6, 24)
    x = torch.from_numpy(IMAGES)
    with torch.no_grad():
        np.testing.assert_allclose(jax_vit_forward(arrays, IMAGES), model(x).double().numpy(), atol=1e-5, rtol=0)
    np.savez(tmp_path / "m.npz", **arrays)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "m.npz")(x), model(x), atol=1e-6, rtol=0)


def test_missing_and_mis_shaped_arrays_are_named(tmp_path):
    arrays = _random_arrays()
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if k != "Transformer/encoderblock_1/LayerNorm_2/bias"})
    with pytest.raises(CheckpointError, match=r"bad.npz: missing key 'Transformer/encoderblock_1/LayerNorm_2/bias'"):
        load_pretrained(path)
    np.savez(path, **{**arrays, "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias": np.zeros(23, np.float32)})
    with pytest.raises(CheckpointError, match=r"bad.npz: key 'blocks.0.mlp.fc2.bias' has shape \(23,\)"):
        load_pretrained(path)
    np.savez(path, **{**arrays, "Transformer/encoderblock_0/extra/kernel": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"bad.npz: unexpected key 'Transformer/encoderblock_0/extra/kernel'"):
        load_pretrained(path)
    np.savez(path, something=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"bad.npz: an .npz without 'embedding/kernel'"):
        load_pretrained(path)


@pytest.mark.parametrize("change", [dict(patch_embed="conv_stem"), dict(locality_attention=True)])
def test_export_refuses_a_conv_stem_and_locality_attention(change):
    from vitlab import ConfigError

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_dim=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3,
                    **change)
    with pytest.raises(ConfigError, match="sin-cos positions, conv stem, shifted patches or locality attention"):
        to_jax_arrays(VisionTransformer(cfg))
