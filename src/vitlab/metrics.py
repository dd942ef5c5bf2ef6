"""The scores of a classifier, as sums that add up over batches and processes: test loss, top-1, top-5, per-class
accuracy, the confusion matrix, and calibration (NLL, ECE, MCE, the L2 calibration error, the Brier score, a
reliability histogram); and the temperature that calibrates logits (temperature scaling, Guo et al. 2017).

Pure: tensors in, numbers out. Nothing here loads a model or data, writes a file or draws a figure
(:mod:`vitlab.evaluation` runs a model over a split and feeds these).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitlab._device import sum_dtype
from vitlab.errors import DataError
from vitlab.models import class_probabilities

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




__all__ = ["CALIBRATION_BINS", "CalibrationBins", "ClassificationTally", "TEMPERATURE_RANGE", "SCORES",
           "fit_temperature", "calibration_scores"]
