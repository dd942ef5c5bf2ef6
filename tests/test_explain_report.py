"""The run report: a real (tiny) training run on an image folder, then checks of the HTML's content and numbers."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.config import TrainConfig
from vitlab.api import predict
from vitlab.explain.report import most_confused_pairs, write_report

CLASSES = ["dark", "mid", "light"]


def test_most_confused_pairs_exact():
    m = [[5, 2, 0], [3, 4, 3], [0, 1, 9]]
    assert most_confused_pairs(m, ["a", "b", "c"]) == [
        ("b", "a", 3, 0.3), ("b", "c", 3, 0.3), ("a", "b", 2, 2 / 7), ("c", "b", 1, 0.1)]
    assert most_confused_pairs(m, ["a", "b", "c"], top=1) == [("b", "a", 3, 0.3)]
    assert most_confused_pairs([[4, 0], [0, 2]], ["a", "b"]) == []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run of a 1-block ViT on a folder of 16x16 PNGs whose brightness gives the class."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(40 + 80 * c + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    out = tmp_path_factory.mktemp("runs") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from vitlab.training import fit

        fit(TrainConfig(model="vit-cifar-tiny-p4", data=f"folder:{root}", image_size=[16, 16],
                        model_overrides={"depth": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32},
                        epochs=2, batch_size=12, lr=3e-3, warmup_epochs=0.5, device="cpu", plots=False,
                        cache_dir=str(tmp_path_factory.mktemp("cache")),
                        out=str(out)))
    finally:
        torch.set_num_threads(before)
    return out, root


def test_report_is_self_contained_with_real_numbers(run, tmp_path):
    out, root = run
    path = write_report(out, tmp_path / "r.html", num_images=6)
    page = path.read_text()
    for heading in ("Loss, accuracy and calibration", "Calibration: do the probabilities mean what they say?",
                    "Confusion matrix", "Per-class accuracy", "Most confused pairs",
                    "Test images: predictions and attention", "Configuration"):
        assert f"<h2>{heading}</h2>" in page
    # Every image is embedded and decodes as a PNG; nothing is fetched from elsewhere.
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 4  # curves, reliability diagram, confusion matrix, attention grid
    assert "no temperature was fitted" in page  # the run trained without calibrate=true
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not re.search(r'(href|src)="(https?:|//)', page)
    assert "folder:" in page and "vit-cifar-tiny-p4" in page  # the run's config
    # The top-1 in the report equals the fraction of test files that `predict` gets right, file by file.
    results = predict(out, [root / "test"], top_k=1)
    correct = [r.top[0][0] == r.file.split("/")[-2] for r in results]
    top1 = re.search(r"top-1 <b>([0-9.]+)%</b>", page).group(1)
    assert top1 == f"{100 * sum(correct) / len(correct):.2f}"
    # Per-class rows: test images and correct counts match predict's, class by class.
    for name in CLASSES:
        n_right = sum(c for c, r in zip(correct, results) if r.file.split("/")[-2] == name)
        assert re.search(rf"<td>{name}</td><td class=\"num\">5</td><td class=\"num\">{n_right}</td>", page)


def test_cli_report_default_path(run, capsys):
    out, _ = run
    assert main(["report", str(out), "--num-images", "3", "--checkpoint", "last"]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert f"<code>{out / 'last'}</code> (saved after epoch 2 of 2)" in page


def test_report_falls_back_to_eval_json_when_data_is_gone(run, tmp_path):
    import shutil

    out, _ = run
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(re.sub(r"data: .*", f"data: folder:{tmp_path / 'gone'}", config, count=1))
    page = write_report(moved, checkpoint="last").read_text()
    assert "could not be loaded" in page and "eval.json" in page
    assert len(re.findall(r"<img ", page)) == 3  # curves, reliability diagram, confusion matrix; no image grid
    import json

    top1 = json.loads((moved / "eval.json").read_text())["top1"]
    assert f"top-1 <b>{100 * top1:.2f}%</b>" in page
