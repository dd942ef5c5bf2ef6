"""Scoring a classifier on labelled images: test loss, top-1, top-5, per-class accuracy, the confusion matrix,
and calibration (NLL, ECE, MCE, the L2 calibration error, the Brier score, a reliability histogram).

- :func:`evaluate_model`: a model object on a dataset split (training calls it after its epochs).
- :func:`evaluate`: a trained model (a run or checkpoint folder, or any file :func:`vitlab.load` reads) on
  the test split of a data spec, by default its own run's data. A folder without a test split is split by the
  run's own ``val_fraction`` and ``seed``, so it scores exactly the images the run held out.
- :func:`calibrate`: fit the temperature T that the logits are divided by (temperature scaling, Guo et al.
  2017) on a validation split, never the test split, and save it with the checkpoint's preprocessing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitlab._device import autocast, resolve_device, resolve_precision, sum_dtype
from vitlab._files import ensure_folder, write_json
from vitlab.data import DatasetSplits, EvalTransform, has_own_val, load_data, with_val_split
from vitlab.errors import ConfigError, DataError
from vitlab.interop import LoadedModel, load
from vitlab.models import class_probabilities
from vitlab.plots import RUN_FIGURE_DPI, calibration_figure, confusion_figure, save_figure
from vitlab.runs import (CONFUSION, EVAL, RELIABILITY, is_run_folder, read_calibration, read_run_config,
                         write_temperature)

log = logging.getLogger(__name__)


CALIBRATION_BINS = 15


class CalibrationBins:
    """The top-label reliability histogram: per confidence bin, how many samples, how many right, and the sum
    of their confidences (the top softmax probability), as sums that add up over batches and processes.

    The bins are torchmetrics' ``MulticlassCalibrationError`` (and Guo et al.'s): ``num_bins`` equal-width
    bins on [0, 1] with edges ``torch.linspace(0, 1, num_bins + 1)`` in float32; a confidence on an edge
    belongs to the bin above it, and a confidence of exactly 1 to an extra last slot of its own, which the
    errors count like any bin (``torch.bucketize(..., right=True) - 1``).
    """

    def __init__(self, device: torch.device, num_bins: int = CALIBRATION_BINS):
        self.edges = torch.linspace(0, 1, num_bins + 1, device=device)
        self.count = torch.zeros(num_bins + 1, dtype=torch.int64, device=device)
        self.correct = torch.zeros(num_bins + 1, dtype=torch.int64, device=device)
        self.confidence = torch.zeros(num_bins + 1, dtype=sum_dtype(device), device=device)

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``probs`` (B, K) class probabilities, ``labels`` (B,)."""
        confidence, predicted = probs.float().max(dim=-1)
        slot = torch.bucketize(confidence, self.edges, right=True) - 1  # (B,)
        slots = len(self.count)
        self.count += torch.bincount(slot, minlength=slots)
        self.correct += torch.bincount(slot[predicted == labels], minlength=slots)
        self.confidence.index_add_(0, slot, confidence.to(self.confidence.dtype))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The sums (count, correct, confidence per bin), for summing across processes."""
        return self.count, self.correct, self.confidence

    def result(self) -> dict:
        """``ece`` (L1), ``mce`` (max), ``ece_l2`` (root of the count-weighted mean squared gap) and
        ``reliability``: the bins' edges, counts, accuracies and mean confidences (0 where a bin is empty)."""
        count = self.count.double().cpu()
        accuracy = self.correct.double().cpu() / count.clamp(min=1)
        confidence = self.confidence.double().cpu() / count.clamp(min=1)
        gap = (accuracy - confidence).abs()
        weight = count / count.sum().clamp(min=1)
        return {"ece": float((gap * weight).sum()), "mce": float(gap.max()),
                "ece_l2": math.sqrt(float((gap ** 2 * weight).sum())),
                "reliability": {"edges": self.edges.cpu().tolist(), "count": self.count.cpu().tolist(),
                                "accuracy": accuracy.tolist(), "confidence": confidence.tolist()}}


class ClassificationTally:
    """Sums over evaluation batches, kept on the device (no host sync per batch): loss, top-1, top-5 hits, the
    confusion matrix, the Brier score and the reliability histogram (:class:`CalibrationBins`). ``reduce()``
    sums across processes; ``result()`` turns the sums into metrics."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.loss = torch.zeros((), dtype=sum_dtype(device), device=device)
        self.brier = torch.zeros((), dtype=sum_dtype(device), device=device)
        self.top1 = torch.zeros((), dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # (true, pred)
        self.bins = CalibrationBins(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, labels, reduction="sum").to(self.loss.dtype)
        probs = class_probabilities(logits)
        self.bins.update(probs, labels)
        # Brier: sum over classes of (p - onehot)^2 = sum p^2 - 2 p_true + 1, in [0, 2]
        brier = probs.square().sum(-1) - 2 * probs.gather(1, labels[:, None]).squeeze(1) + 1
        self.brier += brier.sum().to(self.brier.dtype)
        k = min(5, self.num_classes)
        topk = logits.topk(k, dim=-1).indices  # (B, k)
        hits = topk == labels[:, None]
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=-1).sum()
        self.count += labels.numel()
        self.confusion += torch.bincount(labels * self.num_classes + topk[:, 0],
                                         minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def reduce(self) -> None:
        """Sum the tallies of all processes (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.loss, self.brier, self.top1, self.top5, self.count, self.confusion, *self.bins.tensors()):
                dist.all_reduce(t)

    def result(self, classes: list[str] | None = None) -> dict:
        """``test_loss`` (= ``nll``, the mean negative log-likelihood), ``top1``, ``top5`` (fractions), the
        calibration (``ece``, ``mce``, ``ece_l2``, ``brier``, ``reliability``: see :class:`CalibrationBins`),
        ``per_class`` accuracy and ``confusion`` (rows: true)."""
        n = max(int(self.count), 1)
        confusion = self.confusion.cpu()
        per_true = confusion.sum(dim=1).clamp(min=1)
        per_class = (confusion.diag() / per_true).tolist()
        names = classes or [str(i) for i in range(self.num_classes)]
        return {"test_loss": float(self.loss) / n, "top1": int(self.top1) / n, "top5": int(self.top5) / n,
                "nll": float(self.loss) / n, "brier": float(self.brier) / n, **self.bins.result(),
                "count": int(self.count), "classes": names,
                "per_class": {name: acc for name, acc in zip(names, per_class)},
                "confusion": confusion.tolist()}


View = tuple[bool, int]  # (mirrored, shift): an image, flipped left-right or not, moved `shift` pixels diagonally


def tta_views(hflip: bool, shift: int) -> dict[View, float]:
    """The test-time views of an image and their weights: the image itself (and its mirror image with
    ``hflip``); with ``shift`` > 0 also each of those moved ``shift`` pixels up-left and ``shift`` down-right,
    the gap filled by reflection, the moved views weighing half in all. This is airbench's multi-crop evaluation
    (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024), weights included."""
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise ConfigError(f"tta_shift={shift!r} must be an integer >= 0 (pixels; 0: no moved views)")
    plain = [(False, 0), (True, 0)] if hflip else [(False, 0)]
    if not shift:
        return {view: 1 / len(plain) for view in plain}
    moved = [(flip, d) for d in (-shift, shift) for flip, _ in plain]
    return {**{view: 0.5 / len(plain) for view in plain}, **{view: 0.5 / len(moved) for view in moved}}


def _view(x: torch.Tensor, view: View) -> torch.Tensor:
    """``x`` (B, C, H, W) seen as ``view``: mirrored, then moved ``shift`` pixels down and right (up and left when
    negative), the uncovered border filled by reflecting the image."""
    mirrored, shift = view
    x = x.flip(-1) if mirrored else x
    if shift:
        s, (h, w) = abs(shift), x.shape[-2:]
        padded = F.pad(x, (s, s, s, s), mode="reflect")
        top = s - shift  # shift > 0: the image starts lower (the crop starts higher in the padded image)
        x = padded[..., top:top + h, top:top + w]
    return x


def _logits(model: torch.nn.Module, dataset, transform: EvalTransform, *, batch_size: int, device: torch.device,
            precision: str, view_sets: list[dict[View, float]]):
    """(one logits (B, K) float32 per view set, labels (B,)) of ``dataset`` batch by batch, the model in eval
    mode. A view set's logits are the log of the weighted mean probability of its views (:func:`tta_views`; the
    log-softmax of such logits is themselves); a view that several sets share is run once."""
    was_training = model.training
    model.eval()
    try:
        if not len(dataset):
            return
        views = list(dict.fromkeys(view for views in view_sets for view in views))
        loader = dataset.loader(batch_size=batch_size, shuffle=False, drop_last=False, device=device)
        for images, labels in loader:
            inputs = transform(images)
            with autocast(device, precision):
                scored = {view: model(_view(inputs, view)) for view in views}
            combined = []
            for weights in view_sets:
                if len(weights) == 1:
                    combined.append(scored[next(iter(weights))].float())
                    continue
                combined.append(torch.logsumexp(torch.stack([scored[view].float().log_softmax(-1) + math.log(w)
                                                             for view, w in weights.items()]), 0))
            yield combined, labels
    finally:
        model.train(was_training)


def _eval_transform(dataset, mean, std, image_size) -> EvalTransform:
    size = tuple(image_size) if image_size is not None else tuple(dataset.image_size)
    return EvalTransform(mean=tuple(mean), std=tuple(std), image_size=size)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, *, mean, std, image_size=None, batch_size: int = 512,
                   device: str | torch.device = "cpu", precision: str = "fp32", classes: list[str] | None = None,
                   tta_hflip: bool = False, tta_shift: int = 0, temperature: float = 1.0) -> dict:
    """Test loss, top-1, top-5, calibration, per-class accuracy and confusion matrix of ``model`` on
    ``dataset`` (an :class:`~vitlab.data.ArrayDataset` of uint8 images), normalised with ``mean``/``std``.

    With ``tta_hflip`` (test-time augmentation) each image is scored with its mirror image as well, and with
    ``tta_shift`` > 0 with those views moved ``tta_shift`` pixels diagonally (:func:`tta_views`); the class
    probabilities are averaged and the loss is the cross-entropy of that average. The logits are divided by
    ``temperature`` (a fitted one: :func:`calibrate`) before they are scored.

    Under torch.distributed each rank takes every world_size-th image (no padding, so no image counts
    twice) and the sums are reduced, so every rank returns the same result.
    """
    return evaluate_views(model, dataset, [tta_views(tta_hflip, tta_shift)], mean=mean, std=std,
                          image_size=image_size, batch_size=batch_size, device=device, precision=precision,
                          classes=classes, temperature=temperature)[0]


@torch.no_grad()
def evaluate_views(model: torch.nn.Module, dataset, view_sets: list[dict[View, float]], *, mean, std,
                   image_size=None, batch_size: int = 512, device: str | torch.device = "cpu",
                   precision: str = "fp32", classes: list[str] | None = None, temperature: float = 1.0) -> list[dict]:
    """:func:`evaluate_model`'s result for each of ``view_sets`` (:func:`tta_views`), in one pass over
    ``dataset``: training's last evaluation scores its curve's views and the run's final ones together."""
    device = torch.device(device)
    transform = _eval_transform(dataset, mean, std, image_size)
    shift, side = max(abs(s) for views in view_sets for _, s in views), min(transform.image_size)
    if shift >= side:  # reflection fills at most side - 1 pixels
        raise ConfigError(f"tta_shift={shift} must be smaller than the image side ({side} px)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    dataset = dataset.part(rank, world)
    num_classes = len(classes) if classes else int(getattr(model, "config").num_classes)
    tallies = [ClassificationTally(num_classes, device) for _ in view_sets]
    for logits, labels in _logits(model, dataset, transform, batch_size=batch_size, device=device,
                                  precision=precision, view_sets=view_sets):
        for tally, set_logits in zip(tallies, logits):
            tally.update(set_logits / temperature, labels)
    results = []
    for tally, views in zip(tallies, view_sets):
        tally.reduce()
        results.append({**tally.result(classes), "temperature": float(temperature), "views": len(views)})
    return results


def check_classes(model_config, classes: list[str], data: str, source) -> None:
    """A :class:`DataError` unless dataset ``data`` has the classes (names and number) the model was trained on."""
    if model_config.labels is not None and list(model_config.labels) != list(classes):
        raise DataError(f"{data}: its classes {list(classes)[:10]} differ from the model's "
                        f"{list(model_config.labels)[:10]} ({source}/config.json); evaluate on a dataset with the "
                        "classes the model was trained on")
    if model_config.num_classes != len(classes):
        raise DataError(f"{data}: {len(classes)} classes, but the model in {source} has "
                        f"{model_config.num_classes} outputs")


def _run_config(loaded: LoadedModel) -> dict[str, Any]:
    """The config.yaml of the run a checkpoint folder belongs to (``RUN/best`` -> ``RUN``), or {}."""
    run = loaded.path.parent
    return read_run_config(run) if loaded.path.is_dir() and is_run_folder(run) else {}


def _load_like_run(loaded: LoadedModel, data: str | None, run_config: dict[str, Any], cache_dir: str | None,
                   workers: int | None) -> DatasetSplits:
    """The dataset ``data`` (default: the run's data spec) loaded as ``loaded``'s run loaded it."""
    spec = data or run_config.get("data")
    if not spec:
        raise ConfigError(f"{loaded.path}: no run config.yaml names its data; pass the data spec (--data SPEC)")
    pre = loaded.preprocess
    splits = load_data(spec, image_size=pre.image_size, channels=pre.channels,
                       val_fraction=run_config.get("val_fraction", 0.1), seed=run_config.get("seed", 0),
                       cache_dir=cache_dir or run_config.get("cache_dir"),
                       skip_bad_files=bool(run_config.get("skip_bad_files", False)), workers=workers)
    check_classes(loaded.model.config, list(splits.classes), spec, loaded.path)
    return splits


def evaluate_held_out(loaded: LoadedModel, data: str | None = None, *, batch_size: int = 512,
                      device: str | torch.device = "cpu", precision: str = "auto", tta_hflip: bool | None = None,
                      tta_shift: int | None = None, cache_dir: str | None = None,
                      workers: int | None = None) -> tuple[dict, DatasetSplits]:
    """Score ``loaded`` on the test split of ``data`` (default: its run's data spec), loaded as its run loaded it
    (``val_fraction``, ``seed``, ``skip_bad_files``, the run's ``cache_dir`` unless given); ``tta_hflip`` and
    ``tta_shift`` None: as the run's final evaluation did. The logits are divided by ``loaded.temperature``, as
    prediction divides them. ``precision`` "auto": :func:`resolve_precision`'s rule, as :func:`evaluate` (the report
    scores with this). Returns the result and the dataset (whose ``test`` split was scored)."""
    precision = resolve_precision(precision, device)
    run_config = _run_config(loaded)
    splits = _load_like_run(loaded, data, run_config, cache_dir, workers)
    flip = bool(run_config.get("tta_hflip", False)) if tta_hflip is None else tta_hflip
    shift = int(run_config.get("tta_shift", 0)) if tta_shift is None else tta_shift
    pre = loaded.preprocess
    result = evaluate_model(loaded.model, splits.test, mean=pre.mean, std=pre.std, image_size=pre.image_size,
                            batch_size=batch_size, device=device, precision=precision, classes=loaded.labels,
                            tta_hflip=flip, tta_shift=shift, temperature=loaded.temperature)
    return {"checkpoint": str(loaded.path), "data": splits.spec, **result}, splits


def evaluate(checkpoint: str | Path | LoadedModel, data: str | None = None, *, batch_size: int = 512,
             device: str = "auto", precision: str = "auto", tta_hflip: bool | None = None,
             tta_shift: int | None = None, out: str | Path | None = None, cache_dir: str | None = None, workers: int | None = None) -> dict:
    """Evaluate a trained model on the test split of ``data`` (default: its run's own data): test loss, top-1,
    top-5, per-class accuracy and the confusion matrix.

    ``checkpoint``: a run folder (its ``best/``, else ``last/``), a checkpoint folder, any file
    :func:`vitlab.load` reads, or a loaded model. ``precision`` "auto" is what training used (bf16 where the
    device has fast bf16 matmul). ``tta_hflip``: also score each image's mirror image and average the
    probabilities; ``tta_shift``: also score those views moved that many pixels (:func:`tta_views`; both None:
    as the run's final evaluation did). With ``out``, writes ``eval.json`` and ``confusion_matrix.png``
    (class names on the axes) into that folder.
    """
    if out is not None:
        ensure_folder(out, "--out")  # before the work: a bad folder is named at once
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load(checkpoint, device=str(dev))
    result, _ = evaluate_held_out(loaded, data, batch_size=batch_size, device=dev, precision=precision,
                                  tta_hflip=tta_hflip, tta_shift=tta_shift, cache_dir=cache_dir,
                                  workers=workers)
    if out is not None:
        out = Path(out)
        write_json(out / EVAL, result)
        title = f"{loaded.path}: top-1 {100 * result['top1']:.2f}%"
        save_figure(confusion_figure(result["confusion"], result["classes"], title=title), out / CONFUSION,
                    dpi=RUN_FIGURE_DPI)
    return result


# ---------------------------------------------------------------- temperature scaling
TEMPERATURE_RANGE = (0.01, 100.0)
SCORES = ("top1", "nll", "ece", "mce", "ece_l2", "brier", "reliability")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T in :data:`TEMPERATURE_RANGE` that minimises the mean negative log-likelihood of
    softmax(``logits`` / T) for ``labels``: a golden-section search on log T, in float64. The NLL is convex in
    1/T, so it has one minimum and the search finds it; dividing by T > 0 never changes the top class."""
    if not len(labels):
        raise DataError("no images to fit a temperature on: the validation split is empty")
    z, y = logits.detach().double().cpu(), labels.cpu()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    shrink = (math.sqrt(5) - 1) / 2
    a, b = hi - shrink * (hi - lo), lo + shrink * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-9:
        if fa <= fb:  # the minimum is left of b
            hi, b, fb = b, a, fa
            a = hi - shrink * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + shrink * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def calibration_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 and the calibration metrics (NLL, ECE, MCE, L2, Brier, the reliability bins) of ``logits``."""
    tally = ClassificationTally(logits.shape[-1], logits.device)
    tally.update(logits, labels)
    result = tally.result()
    return {key: result[key] for key in SCORES}


@torch.no_grad()
def _all_logits(loaded: LoadedModel, dataset, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (undivided) and labels of every image of ``dataset``, on the CPU, by this process alone."""
    pre = loaded.preprocess
    batches = [(logits[0].cpu(), labels.cpu()) for logits, labels in
               _logits(loaded.model, dataset, _eval_transform(dataset, pre.mean, pre.std, pre.image_size),
                       view_sets=[tta_views(False, 0)], **kwargs)]
    if not batches:
        raise DataError("no images to score: the split is empty")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def fit_calibration(loaded: LoadedModel, splits: DatasetSplits, *, batch_size: int = 512,
                    device: str | torch.device = "cpu", precision: str = "fp32") -> dict:
    """Fit ``loaded``'s temperature on ``splits.val`` (which must not be the test split), score the test split
    before (T = 1) and after, save T in the checkpoint folder (``preprocess.json``, with ``calibration.json``)
    and set ``loaded.temperature``. Returns ``{"temperature", "val_images", "val_nll_before", "val_nll_after",
    "test_before", "test_after"}`` (each ``test_*``: :func:`calibration_scores`)."""
    if splits.val is None or splits.val is splits.test:
        raise ConfigError("a temperature is fitted on a validation split apart from the test split; "
                          "pass splits made by vitlab.data.with_val_split")
    kwargs = dict(batch_size=batch_size, device=torch.device(device), precision=precision)
    val_logits, val_labels = _all_logits(loaded, splits.val, **kwargs)
    temperature = fit_temperature(val_logits, val_labels)
    test_logits, test_labels = _all_logits(loaded, splits.test, **kwargs)
    record = {"val_images": len(val_labels),
              "val_nll_before": float(F.cross_entropy(val_logits.double(), val_labels)),
              "val_nll_after": float(F.cross_entropy(val_logits.double() / temperature, val_labels)),
              "test_before": calibration_scores(test_logits, test_labels),
              "test_after": calibration_scores(test_logits / temperature, test_labels)}
    write_temperature(loaded.path, temperature, record)
    loaded.temperature = temperature
    if not TEMPERATURE_RANGE[0] * 1.01 < temperature < TEMPERATURE_RANGE[1] / 1.01:
        log.warning("the fitted temperature %.4g is at the edge of the search range %s: the validation split "
                    "(%d images) is too small or too easy to say how confident the model should be",
                    temperature, TEMPERATURE_RANGE, len(val_labels))
    return {"temperature": temperature, **record}


def figure_folder(loaded: LoadedModel) -> Path:
    """Where a checkpoint's figures go: its run folder (``RUN/best`` -> ``RUN``), else the checkpoint folder."""
    return loaded.path.parent if is_run_folder(loaded.path.parent) else loaded.path


def save_reliability(loaded: LoadedModel) -> Path:
    """Draw ``reliability.png`` (before and after the fitted temperature) from the checkpoint's
    ``calibration.json`` into :func:`figure_folder`."""
    folder = figure_folder(loaded)
    fig = calibration_figure(read_calibration(loaded.path), title=folder.name)
    return save_figure(fig, folder / RELIABILITY, dpi=RUN_FIGURE_DPI)


def calibrate(checkpoint: str | Path | LoadedModel, data: str | None = None, *, batch_size: int = 512,
              device: str = "auto", precision: str = "auto", cache_dir: str | None = None,
              workers: int | None = None) -> dict:
    """Fit the temperature of a trained model after the fact and save it beside its weights, so that
    :func:`vitlab.predict`, the report, the server and the ONNX export divide its logits by it.

    T is fitted on the validation split: the ``val/`` folder of a folder dataset that has one beside ``test/``,
    else the images a run trained with ``calibrate=true`` held out of its training split (``val_fraction``,
    ``seed``). A run that trained on all of its training images has none left to fit on (the test split is never
    used): that is a :class:`ConfigError`. Prints nothing; returns :func:`fit_calibration`'s record (the test
    split's NLL, ECE, MCE, Brier before and after) and writes ``reliability.png``.
    """
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load(checkpoint, device=str(dev))
    run_config = _run_config(loaded)
    splits = _load_like_run(loaded, data, run_config, cache_dir, workers)
    if not run_config.get("calibrate") and not has_own_val(splits):
        raise ConfigError(f"{loaded.path}: its run trained on every training image of {splits.spec} (calibrate "
                          "was false) and the data has no val/ folder, so no image is left to fit a temperature "
                          "on (never the test split); train with --set calibrate=true, which holds out "
                          "val_fraction of the training images, or pass --data a folder with a val/ folder")
    splits = with_val_split(splits, run_config.get("val_fraction", 0.1), run_config.get("seed", 0))
    result = fit_calibration(loaded, splits, batch_size=batch_size, device=dev, precision=precision)
    save_reliability(loaded)
    return {"checkpoint": str(loaded.path), "data": splits.spec, **result}


__all__ = ["CalibrationBins", "ClassificationTally", "tta_views", "evaluate_model", "evaluate_views",
           "evaluate_held_out", "evaluate",
           "check_classes", "fit_temperature", "calibration_scores", "fit_calibration", "calibrate",
           "save_reliability", "TEMPERATURE_RANGE"]
