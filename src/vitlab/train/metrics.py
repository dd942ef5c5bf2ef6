"""Losses, top-k accuracy, the confusion matrix, and the per-epoch metrics file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab._files import atomic_write_text


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums (exact enough over an epoch), float32 where the device has no float64 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets ``(B, K)`` (label smoothing, Mixup/CutMix), computed in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


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
        import torch.distributed as dist

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


def write_metrics(path: str | Path, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON object per epoch) atomically from the run's history, so the file
    always matches the checkpoint it belongs with."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``."""
    from vitlab.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is this a run folder written by `vitlab train`?")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}:{i}: not valid JSON") from None
    return rows
