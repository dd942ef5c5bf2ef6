"""Running a model over labelled images and scoring it (the scores themselves: :mod:`vitlab.metrics`).

- :func:`evaluate_model` / :func:`evaluate_views`: a model object on a dataset split (training calls them after
  its epochs), with test-time views (:func:`tta_views`).
- :func:`evaluate_held_out`: a loaded checkpoint on the test split of a data spec, by default its own run's data,
  loaded as its run loaded it (:func:`load_like_run`). A folder without a test split is split by the run's own
  ``val_fraction`` and ``seed``, so it scores exactly the images the run held out.
- :func:`fit_calibration`: fit the temperature T that the logits are divided by on a validation split, never the
  test split, and save it with the checkpoint's preprocessing.

Files and figures (``eval.json``, ``confusion_matrix.png``, ``reliability.png``) are the verbs' business
(:mod:`vitlab.api`), not this module's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitlab._device import autocast, resolve_precision
from vitlab.checkpoints import CONFIG_JSON, CONFIG_YAML, read_run_config, write_temperature
from vitlab.data import DatasetSplits, EvalTransform, has_own_val, load_data, with_val_split
from vitlab.errors import ConfigError, DataError
from vitlab.loaded import LoadedModel
from vitlab.metrics import TEMPERATURE_RANGE, ClassificationTally, calibration_scores, fit_temperature

log = logging.getLogger(__name__)


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
    ``temperature`` (a fitted one: :func:`fit_calibration`) before they are scored.

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
                        f"{list(model_config.labels)[:10]} ({source}/{CONFIG_JSON}); evaluate on a dataset with the "
                        "classes the model was trained on")
    if model_config.num_classes != len(classes):
        raise DataError(f"{data}: {len(classes)} classes, but the model in {source} has "
                        f"{model_config.num_classes} outputs")


def run_config(loaded: LoadedModel) -> dict[str, Any]:
    """The config.yaml of the run ``loaded`` belongs to (:attr:`LoadedModel.run`), or {}."""
    return read_run_config(loaded.run) if loaded.run is not None else {}


def load_like_run(loaded: LoadedModel, data: str | None, config: dict[str, Any], cache_dir: str | None,
                  workers: int | None) -> DatasetSplits:
    """The dataset ``data`` (default: the run's data spec) loaded as ``loaded``'s run (``config``: its
    :func:`run_config`) loaded it."""
    spec = data or config.get("data")
    if not spec:
        raise ConfigError(f"{loaded.path}: no run {CONFIG_YAML} names its data; pass the data spec (--data SPEC)")
    pre = loaded.preprocess
    splits = load_data(spec, image_size=pre.image_size, channels=pre.channels,
                       val_fraction=config.get("val_fraction", 0.1), seed=config.get("seed", 0),
                       cache_dir=cache_dir or config.get("cache_dir"),
                       skip_bad_files=bool(config.get("skip_bad_files", False)), workers=workers)
    check_classes(loaded.model.config, list(splits.classes), spec, loaded.path)
    return splits


def evaluate_held_out(loaded: LoadedModel, data: str | None = None, *, batch_size: int = 512,
                      device: str | torch.device = "cpu", precision: str = "auto", tta_hflip: bool | None = None,
                      tta_shift: int | None = None, cache_dir: str | None = None,
                      workers: int | None = None) -> tuple[dict, DatasetSplits]:
    """Score ``loaded`` on the test split of ``data`` (default: its run's data spec), loaded as its run loaded it
    (``val_fraction``, ``seed``, ``skip_bad_files``, the run's ``cache_dir`` unless given); ``tta_hflip`` and
    ``tta_shift`` None: as the run's final evaluation did. The logits are divided by ``loaded.temperature``, as
    prediction divides them. ``precision`` "auto": :func:`resolve_precision`'s rule (``vitlab evaluate`` and the
    report both score with this). Returns the result and the dataset (whose ``test`` split was scored)."""
    precision = resolve_precision(precision, device)
    config = run_config(loaded)
    splits = load_like_run(loaded, data, config, cache_dir, workers)
    flip = bool(config.get("tta_hflip", False)) if tta_hflip is None else tta_hflip
    shift = int(config.get("tta_shift", 0)) if tta_shift is None else tta_shift
    pre = loaded.preprocess
    result = evaluate_model(loaded.model, splits.test, mean=pre.mean, std=pre.std, image_size=pre.image_size,
                            batch_size=batch_size, device=device, precision=precision, classes=loaded.labels,
                            tta_hflip=flip, tta_shift=shift, temperature=loaded.temperature)
    return {"checkpoint": str(loaded.path), "data": splits.spec, **result}, splits


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


def calibration_splits(loaded: LoadedModel, data: str | None = None, *, cache_dir: str | None = None,
                       workers: int | None = None) -> DatasetSplits:
    """The data to fit ``loaded``'s temperature on, loaded as its run loaded it, with its validation split: the
    ``val/`` folder of a folder dataset that has one beside ``test/``, else the images a run trained with
    ``calibrate=true`` held out of its training split (``val_fraction``, ``seed``). A run that trained on all of
    its training images has none left to fit on (the test split is never used): that is a :class:`ConfigError`."""
    config = run_config(loaded)
    splits = load_like_run(loaded, data, config, cache_dir, workers)
    if not config.get("calibrate") and not has_own_val(splits):
        raise ConfigError(f"{loaded.path}: its run trained on every training image of {splits.spec} (calibrate "
                          "was false) and the data has no val/ folder, so no image is left to fit a temperature "
                          "on (never the test split); train with --set calibrate=true, which holds out "
                          "val_fraction of the training images, or pass --data a folder with a val/ folder")
    return with_val_split(splits, config.get("val_fraction", 0.1), config.get("seed", 0))


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


__all__ = ["tta_views", "evaluate_model", "evaluate_views", "evaluate_held_out", "check_classes", "load_like_run",
           "run_config", "calibration_splits", "fit_calibration"]
