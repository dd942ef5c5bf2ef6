"""A run folder and the checkpoint folders in it: what each file is, and how to find, read and swap them.

```
RUN/
  config.yaml            the resolved TrainConfig (`--recipe RUN/config.yaml` repeats the run)
  metrics.jsonl          one JSON object per epoch, rewritten with every checkpoint
  eval.json              the last evaluation: per-class accuracy and confusion matrix
  curves.png, confusion_matrix.png, reliability.png, tensorboard/
  last/  best/           checkpoint folders: config.json + model.safetensors (a save_pretrained folder),
                         preprocess.json (the input normalisation, and the temperature the logits are divided
                         by once one was fitted), calibration.json (what fitting it did), and the training
                         state: state.json, optimizer.safetensors, rng.safetensors, ema.safetensors (with EMA)
```

A checkpoint folder is written beside its final name and swapped in by two renames (:func:`swap_in`), so a
process killed at any moment leaves the old folder or the new one; a kill between the two renames leaves only
``.last.old`` / ``.best.old``, which readers use as they are and :func:`recover_run` puts back.

The one place that knows these names: training, evaluation, explanation and conversion all read a run through
it. It imports only the ground floor, the config and the file names of a ``save_pretrained`` folder.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vitlab._files import atomic_write_text, read_json, write_json
from vitlab.config import load_yaml
from vitlab.errors import CheckpointError
from vitlab.models.vit import CONFIG_NAME as CONFIG_JSON
from vitlab.models.vit import WEIGHTS_NAME as WEIGHTS

# in a run folder
CONFIG_YAML, METRICS, EVAL = "config.yaml", "metrics.jsonl", "eval.json"
CURVES, CONFUSION, RELIABILITY = "curves.png", "confusion_matrix.png", "reliability.png"
LAST, BEST = "last", "best"
# in a checkpoint folder, besides CONFIG_JSON and WEIGHTS (a save_pretrained folder's)
PREPROCESS, STATE, CALIBRATION = "preprocess.json", "state.json", "calibration.json"
OPTIMIZER, RNG, EMA = "optimizer.safetensors", "rng.safetensors", "ema.safetensors"


# ---------------------------------------------------------------- finding things
def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``vitlab train`` (it holds ``config.yaml``)."""
    return (Path(path) / CONFIG_YAML).is_file()


def require_run_folder(path: str | Path, command: str) -> Path:
    """``path`` as a Path, or a :class:`CheckpointError` saying that ``command`` takes a run folder."""
    path = Path(path)
    if not is_run_folder(path):
        raise CheckpointError(f"{path}: not a run folder (no {CONFIG_YAML}); {command} takes a folder written by "
                              "`vitlab train`")
    return path


def read_run_config(run: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict (its TrainConfig fields)."""
    return load_yaml(Path(run) / CONFIG_YAML)


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a ``save_pretrained`` pair (``config.json`` + ``model.safetensors``)."""
    path = Path(path)
    return (path / CONFIG_JSON).is_file() and (path / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its ``best/`` (else ``last/``) checkpoint; a ``save_pretrained`` folder -> itself.

    Read-only: a reader must not tidy a run that may still be training, so a swap cut between its two renames
    is read from ``.best.old`` / ``.last.old`` (each a complete checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass a run folder (with best/ or last/) or a checkpoint "
                              "folder (with config.json and model.safetensors)")
    if path.is_dir():
        if is_checkpoint_folder(path):
            return path
        for name in (BEST, f".{BEST}.old", LAST, f".{LAST}.old"):
            if (path / name / WEIGHTS).is_file():
                return path / name
    raise CheckpointError(f"{path}: neither a run folder (best/ or last/ inside) nor a checkpoint folder "
                          f"({CONFIG_JSON} + {WEIGHTS}); was the run stopped before its first epoch ended?")


# ---------------------------------------------------------------- preprocess.json
def read_preprocess(folder: str | Path) -> dict | None:
    """The ``{"mean", "std", "image_size", "channels"}`` a checkpoint folder (or run) was trained with, or None."""
    file = resolve_checkpoint(folder) / PREPROCESS
    return read_json(file) if file.is_file() else None


def write_preprocess(folder: str | Path, *, mean, std, image_size, channels: int) -> None:
    """Record the input normalisation beside a checkpoint's weights."""
    write_json(Path(folder) / PREPROCESS, {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
                                           "image_size": list(image_size), "channels": int(channels)})


def read_temperature(folder: str | Path) -> float:
    """The temperature a checkpoint folder's logits are divided by (``preprocess.json``'s ``temperature``); 1
    when none was fitted (every run folder written before calibration existed)."""
    file = resolve_checkpoint(folder) / PREPROCESS
    value = read_json(file).get("temperature", 1.0) if file.is_file() else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise CheckpointError(f"{file}: temperature={value!r} must be a positive number; fit it again with "
                              "`vitlab calibrate RUN`")
    return float(value)


def write_temperature(folder: str | Path, temperature: float, calibration: dict) -> None:
    """Record a fitted temperature in a checkpoint folder's ``preprocess.json``, and what fitting it did
    (``calibration``: the split, the metrics before and after) in ``calibration.json`` beside it."""
    file = Path(folder) / PREPROCESS
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; a temperature is saved with the input normalisation, so the "
                              "checkpoint needs its preprocess.json (re-save it with `vitlab convert`)")
    write_json(file, {**read_json(file), "temperature": float(temperature)})
    write_json(Path(folder) / CALIBRATION, {"temperature": float(temperature), **calibration})


def read_calibration(folder: str | Path) -> dict | None:
    """A checkpoint folder's ``calibration.json`` (see :func:`write_temperature`), or None."""
    file = resolve_checkpoint(folder) / CALIBRATION
    return read_json(file) if file.is_file() else None


# ---------------------------------------------------------------- metrics.jsonl
def write_metrics(run: str | Path, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` atomically from the run's history, so it always matches its checkpoint."""
    atomic_write_text(Path(run) / METRICS, "".join(json.dumps(row) + "\n" for row in history))


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (``run`` may also name the file itself)."""
    path = Path(run)
    if path.is_dir() or not path.name.endswith(".jsonl"):
        path = path / METRICS
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is this a run folder written by `vitlab train`?")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}:{i}: not valid JSON; the file is corrupt") from None
    return rows


# ---------------------------------------------------------------- state.json
@dataclass
class RunState:
    """A run's progress as ``state.json`` holds it (beside the tensors of the checkpoint).

    ``best_*`` describe what ``best/`` holds: the highest test top-1 so far (ties: the lower test loss), the
    epoch it came from, and whether those are the model's weights or their EMA (``best_source``); they change
    only in :meth:`record_best`.
    """

    planned_epochs: int  # the schedule's length in epochs; a time limit may change it (its plan is in steps,
    # scheduler["total_steps"], and may end inside the last epoch)
    config_epochs: int  # TrainConfig.epochs when the plan was made (a resume with another value re-lays it)
    epoch: int = 0  # epochs done
    wall_time: float = 0.0  # seconds of training, all sessions of the run
    history: list[dict] = field(default_factory=list)
    best_top1: float | None = None
    best_epoch: int | None = None
    best_loss: float | None = None
    best_source: str | None = None  # "model" or "ema"
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)

    def record_best(self, row: dict) -> str | None:
        """Compare an evaluated epoch's ``row`` (``top1``, ``test_loss``, and ``ema_*`` with EMA) with the best
        so far; when it is better, remember it and return which weights earned it ("model" or "ema")."""
        if row.get("top1") is None:
            return None
        source = "ema" if row.get("ema_top1") is not None and row["ema_top1"] > row["top1"] else "model"
        top1 = row["ema_top1"] if source == "ema" else row["top1"]
        loss = min(row["test_loss"], row.get("ema_test_loss", math.inf))
        best_loss = math.inf if self.best_loss is None else self.best_loss
        # a saturated 100% keeps improving: among equal top-1, the lower test loss wins
        if self.best_top1 is not None and (top1 < self.best_top1 or (top1 == self.best_top1 and loss >= best_loss)):
            return None
        self.best_top1, self.best_epoch, self.best_loss, self.best_source = top1, row["epoch"], loss, source
        return source

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = STATE) -> "RunState":
        """The state in ``data`` (a ``state.json``); keys of other parts of the checkpoint are left out."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise CheckpointError(f"{source}: not a vitlab training state ({e})") from None


def read_state(folder: str | Path) -> RunState | None:
    """The :class:`RunState` of a checkpoint folder (or run), or None when it holds no training state."""
    file = resolve_checkpoint(folder) / STATE
    return RunState.from_dict(read_json(file), str(file)) if file.is_file() else None


# ---------------------------------------------------------------- atomic folder swaps
def temp_sibling(final: str | Path) -> Path:
    """A fresh temporary folder name beside ``final`` (``.last.tmp-1a2b3c4d``), for writing then :func:`swap_in`."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"


def swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by ``tmp`` with two renames; a crash in between leaves ``.<name>.old``."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def recover_run(run: str | Path) -> None:
    """Finish a checkpoint swap that a crash interrupted and delete half-written temporary folders."""
    run = Path(run)
    for name in (LAST, BEST):
        old = run / f".{name}.old"
        if old.exists():
            if (run / name).exists():
                shutil.rmtree(old)
            else:
                old.rename(run / name)
    for tmp in run.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CONFIG_YAML", "METRICS", "EVAL", "LAST", "BEST", "PREPROCESS", "STATE", "CALIBRATION", "RELIABILITY",
           "RunState", "is_run_folder", "read_temperature", "write_temperature", "read_calibration",
           "require_run_folder", "read_run_config", "is_checkpoint_folder", "resolve_checkpoint", "read_preprocess",
           "write_preprocess", "write_metrics", "read_metrics", "read_state", "temp_sibling", "swap_in",
           "recover_run"]
