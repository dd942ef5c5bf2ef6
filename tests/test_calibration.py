"""Calibration: the metrics against torchmetrics, temperature scaling on logits with a known answer, and a real
run that fits, saves and uses its temperature (train, calibrate, load, predict, eval, report, ONNX export)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab import ConfigError, TrainConfig, calibrate, load
from vitlab.cli import main
from vitlab.api import evaluate
from vitlab.metrics import TEMPERATURE_RANGE, CalibrationBins, ClassificationTally, fit_temperature
from vitlab.api import predict
from vitlab.explain.report import write_report
from vitlab.plots import curves_figure, reliability_figure
from vitlab.checkpoints import PREPROCESS, read_calibration

tm = pytest.importorskip("torchmetrics.classification")
from torchmetrics.functional.classification.calibration_error import (  # noqa: E402
    _ce_compute, _multiclass_calibration_error_update)

EDGES = torch.linspace(0, 1, 16)  # torchmetrics' bin edges for n_bins=15, float32
NORMS = (("ece", "l1"), ("mce", "max"), ("ece_l2", "l2"))


def _torchmetrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """torchmetrics' MulticlassCalibrationError, its binning exactly, its sums in float64: the public class
    sums the confidences of a bin in float32, which drifts by more than 1e-6 when hundreds of equal
    confidences share a bin (0.1000035 for a true 0.1000000), so the oracle is its own code in float64."""
    confidences, accuracies = _multiclass_calibration_error_update(probs, labels)
    return {key: float(_ce_compute(confidences.double(), accuracies.double(), EDGES.double(), norm))
            for key, norm in NORMS}


def _torchmetrics_class(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    k = preds.shape[1]
    return {key: float(tm.MulticlassCalibrationError(num_classes=k, n_bins=15, norm=norm)(preds, labels))
            for key, norm in NORMS}


def _binned(probs: torch.Tensor, labels: torch.Tensor, batch: int = 97) -> dict:
    bins = CalibrationBins(torch.device("cpu"))
    for p, y in zip(probs.split(batch), labels.split(batch)):
        bins.update(p, y)
    return bins.result()


def _assert_like_torchmetrics(probs: torch.Tensor, labels: torch.Tensor) -> None:
    ours, theirs = _binned(probs, labels), _torchmetrics(probs, labels)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("k,scale,seed", [(2, 1.0, 0), (10, 3.0, 1), (10, 0.3, 2), (100, 8.0, 3)])
def test_ece_mce_l2_equal_torchmetrics_on_random_inputs(k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3000, k, generator=g) * scale
    labels = torch.randint(0, k, (3000,), generator=g)
    _assert_like_torchmetrics(logits.softmax(-1), labels)
    tally = ClassificationTally(k, torch.device("cpu"))
    for z, y in zip(logits.split(250), labels.split(250)):
        tally.update(z, y)
    ours = tally.result()
    for key, value in _torchmetrics_class(logits, labels).items():  # the public class, fed the logits
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def _two_class(top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Probabilities (N, 2) whose top class is 0 with confidence ``top`` (exactly, in float32)."""
    return torch.stack([top, 1 - top], 1)


def test_ece_mce_l2_equal_torchmetrics_on_adversarial_inputs():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    # every sample in one bin, the others empty
    _assert_like_torchmetrics(_two_class(torch.full((400,), 0.61), labels), labels)
    # every confidence exactly on an edge (the bin above it), 1.0 (a slot of its own) included
    on_edges = EDGES[EDGES >= 0.5]
    top = on_edges[torch.randint(0, len(on_edges), (400,), generator=g)]
    assert (top == 1.0).any() and set(top.tolist()) <= set(EDGES.tolist())
    _assert_like_torchmetrics(_two_class(top, labels), labels)
    # ties between the classes (confidence 0.5, the argmax torch.max picks), and all right or all wrong
    _assert_like_torchmetrics(_two_class(torch.full((400,), 0.5), labels), labels)
    _assert_like_torchmetrics(_two_class(torch.full((400,), 0.9), torch.zeros(400, dtype=torch.long)),
                              torch.zeros(400, dtype=torch.long))
    _assert_like_torchmetrics(_two_class(torch.full((400,), 0.9), torch.ones(400, dtype=torch.long)),
                              torch.ones(400, dtype=torch.long))
    # edges in a 10-class problem: the top probability on an edge, the rest spread evenly
    top = EDGES[EDGES >= 0.2][torch.randint(0, 13, (400,), generator=g)]
    probs = torch.cat([top[:, None], ((1 - top) / 9)[:, None].expand(-1, 9)], 1)
    labels10 = torch.randint(0, 10, (400,), generator=g)
    _assert_like_torchmetrics(probs, labels10)


def test_bins_put_an_edge_in_the_bin_above_and_one_in_its_own_slot():
    top = torch.tensor([EDGES[8].item(), EDGES[8].item(), 1.0, 0.55])
    result = _binned(_two_class(top, torch.zeros(4, dtype=torch.long)), torch.zeros(4, dtype=torch.long))
    counts = result["reliability"]["count"]
    assert len(counts) == 16 and counts[8] == 3 and counts[15] == 1 and sum(counts) == 4  # 0.55 is in [8/15, 9/15)


def test_tally_nll_brier_and_calibration_from_logits_batch_by_batch_and_summed():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1000, 7, generator=g) * 2.5
    labels = torch.randint(0, 7, (1000,), generator=g)
    one, halves = ClassificationTally(7, torch.device("cpu")), [ClassificationTally(7, torch.device("cpu"))
                                                                   for _ in range(2)]
    for i, (z, y) in enumerate(zip(logits.split(128), labels.split(128))):
        one.update(z, y)
        halves[i % 2].update(z, y)
    a, b = halves
    for ours, theirs in zip((a.loss, a.brier, a.count, *a.bins.tensors()),
                            (b.loss, b.brier, b.count, *b.bins.tensors())):
        ours += theirs  # what reduce()'s all_reduce does across two processes (tests/test_train_ddp.py: really)
    probs = logits.softmax(-1)
    brier = ((probs.double() - F.one_hot(labels, 7).double()) ** 2).sum(-1).mean()
    reference = {"nll": float(F.cross_entropy(logits.double(), labels)), "brier": float(brier),
                 **_torchmetrics(probs, labels)}
    for tally in (one, a):
        result = tally.result()
        assert result["nll"] == pytest.approx(reference["nll"], abs=1e-6)
        assert result["brier"] == pytest.approx(reference["brier"], abs=1e-6)
        for key in ("ece", "mce", "ece_l2"):
            assert result[key] == pytest.approx(reference[key], abs=1e-6), key


def _calibrated_logits(seed: int, n: int = 20000, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true label distribution: labels are drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2.0
    return logits, torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_scaling_recovers_a_known_temperature(temperature):
    logits, labels = _calibrated_logits(seed=int(temperature * 10))
    fitted = fit_temperature(logits * temperature, labels)
    assert fitted == pytest.approx(temperature, rel=1e-2)
    assert torch.equal((logits * temperature / fitted).argmax(-1), (logits * temperature).argmax(-1))


def test_temperature_one_is_a_fixed_point_for_calibrated_logits():
    logits, labels = _calibrated_logits(seed=11)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=1e-2)


def test_temperature_search_stays_in_its_range_and_refuses_nothing_to_fit():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])  # all right: the NLL falls as T falls
    assert fit_temperature(logits, torch.tensor([0, 1])) == pytest.approx(TEMPERATURE_RANGE[0], rel=1e-6)
    with pytest.raises(Exception, match="empty"):
        fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_train_config_checks_calibrate():
    with pytest.raises(ConfigError, match="TrainConfig.calibrate='yes' must be true or false"):
        TrainConfig(calibrate="yes")
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainConfig(calibrate=True, val_fraction=0.0)


def test_figures_draw_the_reliability_diagram_and_the_ece_curve():
    g = torch.Generator().manual_seed(0)
    bins = _binned((torch.randn(500, 3, generator=g) * 3).softmax(-1), torch.randint(0, 3, (500,), generator=g))
    assert len(reliability_figure(bins["reliability"], bins["reliability"], temperature=1.5).axes) == 4
    history = [{"epoch": e, "train_loss": 1.0, "test_loss": 1.0, "top1": 0.5, "ece": 0.1} for e in (1, 2)]
    assert [ax.get_ylabel() for ax in curves_figure(history).axes][-1].startswith("test expected calibration")
    assert len(curves_figure([{**row, "ece": None} for row in history]).axes) == 2  # runs before calibration


# ---------------------------------------------------------------- a real run
CLASSES = ["dark", "mid", "light"]


def _photos(root, splits):
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                # a brightness per image that overlaps the next class's: some images are ambiguous
                level = 60 + 60 * c + rng.integers(-55, 55)
                pixels = np.clip(level + rng.integers(-40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _train(root, out, **changes):
    from vitlab.api import train as fit  # the figures are vitlab.train's

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = dict(model="vit-cifar-tiny-p4", data=f"folder:{root}", image_size=[16, 16],
                        model_overrides={"depth": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}, epochs=3,
                        batch_size=12, lr=3e-3, warmup_epochs=0.5, device="cpu", precision="fp32", out=str(out))
        return fit(TrainConfig(**{**settings, **changes}))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    root = _photos(tmp_path_factory.mktemp("photos"), (("train", 20), ("test", 8)))
    out = tmp_path_factory.mktemp("runs") / "run"
    return _train(root, out, calibrate=True, val_fraction=0.25), root


def test_calibrate_true_holds_out_images_fits_saves_and_plots(calibrated_run):
    result, _ = calibrated_run
    run = result.run_dir
    record = result.calibration
    assert record["val_images"] == 15  # a quarter of each class's 20 training images, never the test split
    assert record["test_before"]["top1"] == record["test_after"]["top1"]  # accuracy unchanged by construction
    assert record["val_nll_after"] <= record["val_nll_before"]
    saved = json.loads((run / "best" / PREPROCESS).read_text())
    assert saved["temperature"] == record["temperature"] != 1.0
    assert read_calibration(run)["test_after"]["ece"] == record["test_after"]["ece"]
    assert (run / "reliability.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["ece"] <= 1 and row["ece"] <= row["mce"] for row in rows)
    assert "ece" in json.loads((run / "eval.json").read_text())


def test_load_predict_and_eval_use_the_temperature_and_keep_top1(calibrated_run, tmp_path):
    result, root = calibrated_run
    loaded = load(result.run_dir)
    t = result.calibration["temperature"]
    assert loaded.temperature == t
    files = sorted((root / "test").rglob("*.png"))
    calibrated = predict(loaded, files, top_k=3)
    loaded.temperature = 1.0
    raw = predict(loaded, files, top_k=3)
    for c, r in zip(calibrated, raw):
        assert [label for label, _ in c.top] == [label for label, _ in r.top]  # same order of the classes
        logits = torch.log(torch.tensor([p for _, p in r.top], dtype=torch.float64))  # up to a constant
        expected = (logits / t).softmax(-1)  # all 3 classes are in the top 3, so this is the whole softmax
        assert [p for _, p in c.top] == pytest.approx(expected.tolist(), abs=1e-5)
    scaled = evaluate(result.run_dir, device="cpu", precision="fp32")
    assert scaled["temperature"] == t
    assert scaled["top1"] == result.calibration["test_after"]["top1"]
    assert scaled["ece"] == pytest.approx(result.calibration["test_after"]["ece"], abs=1e-6)
    assert scaled["nll"] == pytest.approx(result.calibration["test_after"]["nll"], abs=1e-6)


def test_cli_calibrate_refits_the_same_temperature_and_eval_prints_calibration(calibrated_run, capsys):
    result, _ = calibrated_run
    assert main(["calibrate", str(result.run_dir), "--device", "cpu", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"temperature T = {result.calibration['temperature']:.4f}, fitted on 15 validation images" in out
    assert "before (T=1)" in out and "after" in out
    assert main(["eval", str(result.run_dir), "--device", "cpu", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"(logits / T, the fitted temperature T = {result.calibration['temperature']:.4f})" in out
    assert "ECE" in out and "MCE" in out and "Brier" in out


def test_report_shows_the_reliability_diagram_and_reads_it(calibrated_run, tmp_path):
    result, _ = calibrated_run
    page = write_report(result.run_dir, tmp_path / "r.html", num_images=3).read_text()
    record = result.calibration
    assert 'alt="reliability diagram"' in page
    assert f"temperature T = {record['temperature']:.3f}" in page
    assert f"{100 * record['test_before']['ece']:.2f}%" in page and f"{100 * record['test_after']['ece']:.2f}%" in page


def test_onnx_export_divides_the_logits_by_the_temperature(calibrated_run, tmp_path, caplog):
    ort = pytest.importorskip("onnxruntime")
    result, _ = calibrated_run
    loaded = load(result.run_dir)
    x = torch.randn(4, 3, 16, 16)
    path = main(["export", str(result.run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert path == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = session.run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        expected = loaded.model(x) / loaded.temperature
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(result.run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "not applied by a hf export" in caplog.text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["logit_temperature"] == loaded.temperature
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(result.run_dir), "--format", "timm", "--out", str(tmp_path / "t.safetensors")]) == 0
    assert "not applied by a timm export" in caplog.text
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.logit_temperature == loaded.temperature  # kept, though transformers does not apply it


def test_a_run_without_a_temperature_loads_with_one(calibrated_run, tmp_path):
    result, _ = calibrated_run
    import shutil

    old = tmp_path / "old"
    shutil.copytree(result.run_dir, old)
    pre = json.loads((old / "best" / PREPROCESS).read_text())
    del pre["temperature"]
    (old / "best" / PREPROCESS).write_text(json.dumps(pre))
    (old / "best" / "calibration.json").unlink()
    assert load(old).temperature == 1.0
    pre["temperature"] = -1
    (old / "best" / PREPROCESS).write_text(json.dumps(pre))
    with pytest.raises(Exception, match="temperature=-1 must be a positive number"):
        load(old)


def test_calibrate_refuses_a_run_that_trained_on_every_image_and_uses_a_val_folder(tmp_path):
    root = _photos(tmp_path / "photos", (("train", 10), ("test", 4)))
    plain = _train(root, tmp_path / "plain", epochs=1, plots=False)
    with pytest.raises(ConfigError, match="no image is left to fit a temperature on"):
        calibrate(plain.run_dir, device="cpu")
    assert main(["calibrate", str(plain.run_dir), "--device", "cpu"]) == 2
    with_val = _photos(tmp_path / "with-val", (("train", 10), ("val", 4), ("test", 4)))
    run = _train(with_val, tmp_path / "val-run", epochs=1, plots=False)
    record = calibrate(run.run_dir, device="cpu", precision="fp32")
    assert record["val_images"] == 12  # the val/ folder, 4 images of each class
    assert record["test_before"]["top1"] == record["test_after"]["top1"]


def test_the_report_says_when_the_loss_rose_while_the_accuracy_improved():
    from vitlab.explain.report import loss_story

    rows = [(1, 1.9, 0.30), (2, 1.5, 0.45), (3, 1.6, 0.47), (4, 1.7, 0.49), (5, 1.8, 0.46)]
    history = [{"epoch": e, "train_loss": 1.0, "test_loss": loss, "top1": top1} for e, loss, top1 in rows]
    assert loss_story(history).startswith("From epoch 2 to 4 the test loss rose from 1.500 to 1.700 while the "
                                          "top-1 accuracy went from 45.00% to 49.00%: the model became more "
                                          "confident than it is right")
    falling = [{**row, "test_loss": 2.0 - 0.1 * row["epoch"]} for row in history]
    assert loss_story(falling).startswith("The test loss was lowest at epoch 5 (1.500, top-1 46.00%) and did not rise")
