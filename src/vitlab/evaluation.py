"""Scoring a classifier on labelled images: test loss, top-1, top-5, per-class accuracy, the confusion matrix.

- :func:`evaluate_model`: a model object on a dataset split (training calls it after its epochs).
- :func:`evaluate`: a trained model (a run or checkpoint folder, or any file :func:`vitlab.load` reads) on
  the test split of a data spec, by default its own run's data. A folder without a test split is split by the
  run's own ``val_fraction`` and ``seed``, so it scores exactly the images the run held out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitlab._device import autocast, default_precision, resolve_device, sum_dtype
from vitlab._files import ensure_folder, write_json
from vitlab.data import BatchLoader, DatasetSplits, EvalTransform, load_data
from vitlab.errors import ConfigError, DataError
from vitlab.interop import LoadedModel, load
from vitlab.plots import RUN_FIGURE_DPI, confusion_figure, save_figure
from vitlab.runs import CONFUSION, EVAL, is_run_folder, read_run_config


class ClassificationTally:
    """Sums over evaluation batches, kept on the device (no host sync per batch): loss, top-1, top-5 hits and
    the confusion matrix. ``reduce()`` sums across processes; ``result()`` turns the sums into metrics."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.loss = torch.zeros((), dtype=sum_dtype(device), device=device)
        self.top1 = torch.zeros((), dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # (true, pred)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, labels, reduction="sum").to(self.loss.dtype)
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
            for t in (self.loss, self.top1, self.top5, self.count, self.confusion):
                dist.all_reduce(t)

    def result(self, classes: list[str] | None = None) -> dict:
        """``test_loss``, ``top1``, ``top5`` (fractions), ``per_class`` accuracy and ``confusion`` (rows: true)."""
        n = max(int(self.count), 1)
        confusion = self.confusion.cpu()
        per_true = confusion.sum(dim=1).clamp(min=1)
        per_class = (confusion.diag() / per_true).tolist()
        names = classes or [str(i) for i in range(self.num_classes)]
        return {"test_loss": float(self.loss) / n, "top1": int(self.top1) / n, "top5": int(self.top5) / n,
                "count": int(self.count), "classes": names,
                "per_class": {name: acc for name, acc in zip(names, per_class)},
                "confusion": confusion.tolist()}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, *, mean, std, image_size=None, batch_size: int = 512,
                   device: str | torch.device = "cpu", precision: str = "fp32", classes: list[str] | None = None,
                   tta_hflip: bool = False) -> dict:
    """Test loss, top-1, top-5, per-class accuracy and confusion matrix of ``model`` on ``dataset`` (an
    :class:`~vitlab.data.ArrayDataset` of uint8 images), normalised with ``mean``/``std``.

    With ``tta_hflip`` (test-time augmentation) each image is scored with its mirror image as well and the two
    class probabilities are averaged; the loss is the cross-entropy of that average.

    Under torch.distributed each rank takes every world_size-th image (no padding, so no image counts
    twice) and the sums are reduced, so every rank returns the same result.
    """
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    if world > 1:
        dataset = dataset.subset(torch.arange(rank, len(dataset), world))
    size = tuple(image_size) if image_size is not None else tuple(dataset.images.shape[-2:])
    transform = EvalTransform(mean=tuple(mean), std=tuple(std), image_size=size)
    num_classes = len(classes) if classes else int(getattr(model, "config").num_classes)
    tally = ClassificationTally(num_classes, device)
    was_training = model.training
    model.eval()
    if len(dataset):
        loader = BatchLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, device=device)
        for images, labels in loader:
            inputs = transform(images)
            with autocast(device, precision):
                logits = model(inputs)
                if tta_hflip:
                    mirrored = model(inputs.flip(-1))
            if tta_hflip:  # log of the mean probability: its log-softmax is itself
                logits = torch.logsumexp(torch.stack([logits.float().log_softmax(-1),
                                                      mirrored.float().log_softmax(-1)]), 0) - math.log(2)
            tally.update(logits, labels)
    model.train(was_training)
    tally.reduce()
    return tally.result(classes)


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


def evaluate_held_out(loaded: LoadedModel, data: str | None = None, *, batch_size: int = 512,
                      device: str | torch.device = "cpu", precision: str = "fp32", tta_hflip: bool | None = None,
                      cache_dir: str | None = None, workers: int | None = None) -> tuple[dict, DatasetSplits]:
    """Score ``loaded`` on the test split of ``data`` (default: its run's data spec), loaded as its run loaded it
    (``val_fraction``, ``seed``, ``skip_bad_files``, the run's ``cache_dir`` unless given); ``tta_hflip`` None:
    as the run evaluated. Returns the result and the dataset (whose ``test`` split was scored)."""
    run_config = _run_config(loaded)
    spec = data or run_config.get("data")
    if not spec:
        raise ConfigError(f"{loaded.path}: no run config.yaml names its data; pass the data spec (--data SPEC)")
    pre = loaded.preprocess
    splits = load_data(spec, image_size=pre.image_size, channels=pre.channels,
                       val_fraction=run_config.get("val_fraction", 0.1), seed=run_config.get("seed", 0),
                       cache_dir=cache_dir or run_config.get("cache_dir"),
                       skip_bad_files=bool(run_config.get("skip_bad_files", False)), workers=workers)
    check_classes(loaded.model.config, list(splits.classes), spec, loaded.path)
    flip = bool(run_config.get("tta_hflip", False)) if tta_hflip is None else tta_hflip
    result = evaluate_model(loaded.model, splits.test, mean=pre.mean, std=pre.std, image_size=pre.image_size,
                            batch_size=batch_size, device=device, precision=precision, classes=loaded.labels,
                            tta_hflip=flip)
    return {"checkpoint": str(loaded.path), "data": spec, **result}, splits


def evaluate(checkpoint: str | Path | LoadedModel, data: str | None = None, *, batch_size: int = 512,
             device: str = "auto", precision: str = "auto", tta_hflip: bool | None = None,
             out: str | Path | None = None, cache_dir: str | None = None, workers: int | None = None) -> dict:
    """Evaluate a trained model on the test split of ``data`` (default: its run's own data): test loss, top-1,
    top-5, per-class accuracy and the confusion matrix.

    ``checkpoint``: a run folder (its ``best/``, else ``last/``), a checkpoint folder, any file
    :func:`vitlab.load` reads, or a loaded model. ``precision`` "auto" is what training used (bf16 where the
    device has fast bf16 matmul). ``tta_hflip``: also score each image's mirror image and average the
    probabilities (None: as the run evaluated). With ``out``, writes ``eval.json`` and ``confusion_matrix.png``
    (class names on the axes) into that folder.
    """
    if out is not None:
        ensure_folder(out, "--out")  # before the work: a bad folder is named at once
    dev = resolve_device(device)
    precision = default_precision(dev) if precision == "auto" else precision
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load(checkpoint, device=str(dev))
    result, _ = evaluate_held_out(loaded, data, batch_size=batch_size, device=dev, precision=precision,
                                  tta_hflip=tta_hflip, cache_dir=cache_dir, workers=workers)
    if out is not None:
        out = Path(out)
        write_json(out / EVAL, result)
        title = f"{loaded.path}: top-1 {100 * result['top1']:.2f}%"
        save_figure(confusion_figure(result["confusion"], result["classes"], title=title), out / CONFUSION,
                    dpi=RUN_FIGURE_DPI)
    return result


__all__ = ["ClassificationTally", "evaluate_model", "evaluate_held_out", "evaluate", "check_classes"]
