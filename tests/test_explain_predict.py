"""Prediction and attention figures on real image files written by the test: values, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab import ViTConfig, VisionTransformer
from vitlab._files import write_json
from vitlab.cli import main
from vitlab.api import plot_attention
from vitlab.explain.inputs import list_images
from vitlab.explain.maps import compute_attention_maps, upsample_maps
from vitlab.plots import heatmap_overlay
from vitlab.api import predict
from vitlab.explain.rollout import attention_rollout

MEAN, STD = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
LABELS = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_classes=3, hidden_dim=24, depth=2, num_heads=2, mlp_dim=48,
                    labels=LABELS)
    model = VisionTransformer(cfg)
    with torch.no_grad():  # a head that is not near-uniform, so probabilities differ between images
        model.head.weight.mul_(30)
    path = tmp_path_factory.mktemp("ckpt") / "best"
    model.save_pretrained(path)
    write_json(path / "preprocess.json", {"mean": MEAN, "std": STD, "image_size": [16, 16], "channels": 3})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "dog").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(root / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), mode="RGBA").save(root / "c_rgba.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(root / "dog" / "d.jpg", quality=90)
    (root / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def _reference_probs(model: VisionTransformer, path: Path) -> torch.Tensor:
    """What predict must compute: the data layer's decoding at 16x16 RGB, /255, (x - mean) / std, softmax."""
    from vitlab.data import decode_image

    a = torch.from_numpy(decode_image(path, (16, 16), 3)).float() / 255.0
    x = (a - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        return model(x[None]).softmax(-1)[0]


def test_predict_values_match_reference_preprocessing(checkpoint, images):
    model = VisionTransformer.from_pretrained(checkpoint).eval()
    files = [images / "a_rgb.png", images / "b_gray.png", images / "c_rgba.png", images / "dog" / "d.jpg"]
    results = predict(checkpoint, files, top_k=3, batch_size=2)
    assert [r.file for r in results] == [str(f) for f in files]
    for r, f in zip(results, files):
        assert r.ok
        ref = _reference_probs(model, f)
        order = ref.argsort(descending=True).tolist()
        assert [lab for lab, _ in r.top] == [LABELS[i] for i in order]
        np.testing.assert_allclose([p for _, p in r.top], ref[order].numpy(), atol=2e-5)
    # The stored mean/std matter: with 0.5/0.5 the probabilities are different.
    other = predict(vitlab.load(checkpoint, mean=[0.5] * 3, std=[0.5] * 3), files[:1], top_k=3)
    a, b = dict(other[0].top), dict(results[0].top)
    assert max(abs(a[lab] - b[lab]) for lab in LABELS) > 1e-2


def test_predict_batching_does_not_change_results(checkpoint, images):
    one = predict(checkpoint, [images], top_k=2, batch_size=1)
    many = predict(checkpoint, [images], top_k=2, batch_size=64)
    assert [r.file for r in one] == [r.file for r in many]
    for a, b in zip(one, many):
        assert a.error == b.error
        assert [lab for lab, _ in a.top] == [lab for lab, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-5)


def test_folder_listing_and_corrupt_file_reported_by_name(checkpoint, images):
    files = list_images([images])
    assert [f.relative_to(images).as_posix() for f in files] == [
        "a_rgb.png", "b_gray.png", "c_rgba.png", "dog/d.jpg", "e_corrupt.jpg"]  # notes.txt is no image
    results = predict(checkpoint, [images, images / "notes.txt"], top_k=5)
    bad = {Path(r.file).name: r.error for r in results if not r.ok}
    assert set(bad) == {"e_corrupt.jpg", "notes.txt"}
    assert "e_corrupt.jpg" in bad["e_corrupt.jpg"] and "notes.txt" in bad["notes.txt"]
    good = [r for r in results if r.ok]
    assert len(good) == 4 and all(len(r.top) == 3 for r in good)  # top_k capped at the 3 classes
    for r in good:
        assert abs(sum(p for _, p in r.top) - 1.0) < 1e-5
    missing = predict(checkpoint, [images / "missing.png", images / "a_rgb.png"])
    assert "missing.png" in missing[0].error and "not found" in missing[0].error and missing[1].ok


def test_cli_predict_json_and_exit_code(checkpoint, images, capsys):
    code = main(["predict", str(checkpoint.parent), str(images), "--top-k", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 1  # one corrupt file
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5
    assert "error" in rows[4] and rows[4]["file"].endswith("e_corrupt.jpg")
    assert [t["label"] for t in rows[0]["top"]][0] in LABELS and len(rows[0]["top"]) == 2
    assert "e_corrupt.jpg" in err
    code = main(["predict", str(checkpoint), str(images / "a_rgb.png")])
    out, _ = capsys.readouterr()
    assert code == 0 and "a_rgb.png" in out and "%" in out


def test_maps_come_from_each_image_itself(checkpoint):
    torch.manual_seed(1)
    model = VisionTransformer.from_pretrained(checkpoint).eval()
    x = torch.randn(3, 3, 16, 16)
    together = compute_attention_maps(model, x)
    for i in range(3):
        alone = compute_attention_maps(model, x[i:i + 1])
        torch.testing.assert_close(together.maps[i], alone.maps[0], atol=1e-6, rtol=1e-5)
        out = model(x[i:i + 1], return_attentions=True)
        torch.testing.assert_close(alone.maps, attention_rollout(out.attentions), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(together.maps[0], together.maps[1])
    assert together.head_maps.shape == (3, 2, 4, 4)
    last = compute_attention_maps(model, x, method="last")
    torch.testing.assert_close(last.maps, together.head_maps.mean(1), atol=1e-6, rtol=1e-5)


def test_upsample_and_overlay_values():
    grid = torch.zeros(1, 2, 2)
    grid[0, 1, 0] = 1.0  # bottom-left cell
    up = upsample_maps(grid, (8, 8))[0]
    assert up.shape == (8, 8) and float(up.max()) == 1.0 and float(up.min()) == 0.0
    assert up[4:, :4].mean() > 0.5 > up[:4, 4:].mean()
    image = np.full((3, 8, 8), 100, dtype=np.uint8)
    np.testing.assert_array_equal(heatmap_overlay(image, up, alpha=0.0), np.full((8, 8, 3), 100))
    full = heatmap_overlay(image, up, alpha=1.0)
    import matplotlib
    np.testing.assert_allclose(full[7, 0] / 255.0, matplotlib.colormaps["jet"](1.0)[:3], atol=1 / 255)


def test_plot_attention_figure_and_true_labels(checkpoint, images, tmp_path):
    out = tmp_path / "fig.png"
    items = plot_attention(checkpoint, [images], out, heads=True)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200
    named = {Path(i.name).name: i for i in items}
    assert named["e_corrupt.jpg"].error and "e_corrupt.jpg" in named["e_corrupt.jpg"].error
    assert named["d.jpg"].true_label == "dog" and named["a_rgb.png"].true_label is None
    ref = predict(checkpoint, [images / "dog" / "d.jpg"], top_k=1)[0].top[0]
    assert named["d.jpg"].label == ref[0] and abs(named["d.jpg"].probability - ref[1]) < 1e-5
    code = main(["attention", str(checkpoint), str(images / "a_rgb.png"), "-o", str(tmp_path / "f.svg"),
                 "--method", "last"])
    assert code == 0 and (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    assert main(["attention", str(checkpoint), str(images / "a_rgb.png"), "-o", str(tmp_path / "f.gif")]) == 2
    assert not (tmp_path / "f.gif").exists()


def test_maps_of_mean_pooled_model_without_class_token():
    torch.manual_seed(2)
    cfg = ViTConfig(image_size=16, patch_size=4, num_classes=3, hidden_dim=24, depth=2, num_heads=2, mlp_dim=48,
                    class_token=False, pool="mean", final_norm=False)
    model = VisionTransformer(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = compute_attention_maps(model, x)
    out = model(x, return_attentions=True)
    assert out.attentions[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(maps.maps, attention_rollout(out.attentions, pool="mean", num_prefix_tokens=0))
    torch.testing.assert_close(maps.probs, out.logits.softmax(-1))
    assert maps.head_maps.shape == (2, 2, 4, 4)


def test_predict_with_worker_processes_equals_inline(checkpoint, images, monkeypatch):
    from vitlab.data.sources import folder as folder_source

    inline = predict(checkpoint, [images, images / "missing.png"], top_k=3)
    monkeypatch.setattr(folder_source, "INLINE_BELOW", 0)  # use the pool even for a few files
    pooled = predict(checkpoint, [images, images / "missing.png"], top_k=3, workers=2)
    assert [r.to_dict() for r in pooled] == [r.to_dict() for r in inline]
    assert [Path(r.file).name for r in pooled if not r.ok] == ["e_corrupt.jpg", "missing.png"]
    assert "e_corrupt.jpg" in pooled[4].error and "not found" in pooled[5].error


def test_many_files_are_predicted_from_the_image_cache_as_from_memory(checkpoint, images, monkeypatch):
    import sys

    from vitlab.data.cache import cache_files

    predict_module = sys.modules["vitlab.explain.predict"]  # the package exports the function under that name

    in_memory = predict(checkpoint, [images, images / "missing.png"], top_k=3)
    assert cache_files() == []
    monkeypatch.setattr(predict_module, "CACHE_FROM", 1)
    mapped = predict(checkpoint, [images, images / "missing.png"], top_k=3)
    assert [r.to_dict() for r in mapped] == [r.to_dict() for r in in_memory]
    assert len(cache_files()) == 1 and any(not r.ok for r in mapped)
