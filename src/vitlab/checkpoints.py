"""vitlab's own files: a model folder, a run folder and the checkpoint folders in it; what each file is, and how
to find, read, write and swap them. The one module that names them.

```
RUN/
  config.yaml            the resolved TrainConfig (`--recipe RUN/config.yaml` repeats the run)
  metrics.jsonl          one JSON object per epoch, rewritten with every checkpoint
  eval.json              the last evaluation: per-class accuracy and confusion matrix
  curves.png, confusion_matrix.png, reliability.png, tensorboard/
  last/  best/           checkpoint folders: config.json + model.safetensors (a model folder, as
                         VisionTransformer.save_pretrained writes it), preprocess.json (the input normalisation,
                         and the temperature the logits are divided by once one was fitted), calibration.json
                         (what fitting it did), and the training state: state.json, optimizer.safetensors,
                         rng.safetensors, ema.safetensors (with EMA), lookahead.safetensors (with Lookahead)
  teacher/               a distilled run's CNN teacher (TrainConfig.teacher): model.safetensors, teacher.json
```

A checkpoint folder is written beside its final name and swapped in by two renames (:func:`swap_in`), so a
process killed at any moment leaves the old folder or the new one; a kill between the two renames leaves only
``.last.old`` / ``.best.old``, which readers use as they are and :func:`recover_run` puts back. Everything is
safetensors or JSON; nothing is pickled.

It sits just above the config: it knows tensors and dicts, not the network (``VisionTransformer.save_pretrained``
and ``from_pretrained`` call :func:`write_model_folder` and :func:`read_model_folder`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from vitlab._files import atomic_write_text, load_safetensors, read_json, save_safetensors, write_json
from vitlab.config import load_yaml, to_dict
from vitlab.errors import CheckpointError

# a model folder
CONFIG_JSON, WEIGHTS = "config.json", "model.safetensors"
# in a run folder
CONFIG_YAML, METRICS, EVAL = "config.yaml", "metrics.jsonl", "eval.json"
CURVES, CONFUSION, RELIABILITY = "curves.png", "confusion_matrix.png", "reliability.png"
LAST, BEST = "last", "best"
# in a checkpoint folder, besides the model folder's two
PREPROCESS, STATE, CALIBRATION = "preprocess.json", "state.json", "calibration.json"
OPTIMIZER, RNG, EMA = "optimizer.safetensors", "rng.safetensors", "ema.safetensors"
LOOKAHEAD = "lookahead.safetensors"
# a distilled run's CNN teacher (TrainConfig.teacher): run/teacher/model.safetensors + teacher.json
TEACHER, TEACHER_JSON = "teacher", "teacher.json"


# ---------------------------------------------------------------- a distilled run's teacher
def write_teacher(run: str | Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """``run/teacher/``: the teacher's weights (model.safetensors) and ``info`` (teacher.json: its name, epochs,
    seconds, test top-1), each atomically."""
    folder = Path(run) / TEACHER
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS, state, metadata={"format": "pt"})
    write_json(folder / TEACHER_JSON, info)


def read_teacher(run: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict] | None:
    """(weights, info) of the teacher ``run`` saved, or None when it has none (it stopped while the teacher
    trained)."""
    folder = Path(run) / TEACHER
    if not (folder / TEACHER_JSON).is_file() or not (folder / WEIGHTS).is_file():
        return None
    return load_safetensors(folder / WEIGHTS, device=str(device)), read_json(folder / TEACHER_JSON)


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


def can_resume(run: str | Path) -> bool:
    """Whether run folder ``run`` holds a checkpoint a run can continue from (``last/state.json``)."""
    return (Path(run) / LAST / STATE).is_file()


def run_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint folder belongs to (``RUN/best`` -> ``RUN``), or None: the one answer to "which
    run is this"."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent if checkpoint.is_dir() and is_run_folder(checkpoint.parent) else None


def read_run_config(run: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict (its TrainConfig fields)."""
    return load_yaml(Path(run) / CONFIG_YAML)


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a model folder's two files (``config.json`` + ``model.safetensors``)."""
    path = Path(path)
    return (path / CONFIG_JSON).is_file() and (path / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its ``best/`` (else ``last/``) checkpoint; a model folder -> itself.

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


# ---------------------------------------------------------------- model folders (config.json + model.safetensors)
def write_model_folder(directory: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write a model folder: ``config`` (a ViTConfig as a dict) as ``config.json`` and ``state`` as
    ``model.safetensors``, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / WEIGHTS, state, metadata={"format": "pt"})
    write_json(directory / CONFIG_JSON, {"architecture": "VisionTransformer", **config})
    return directory


def model_folder(path: str | Path) -> Path | None:
    """The model folder ``path`` names (itself, or a run folder's ``best/``, ``.best.old``, ``last/``,
    ``.last.old``), or None when it is not a vitlab one. A Hugging Face folder also holds config.json +
    model.safetensors; vitlab's config.json names ``hidden_dim``. A corrupt ``config.json`` is named."""
    try:
        folder = resolve_checkpoint(path)
    except CheckpointError:
        return None
    data = read_json(folder / CONFIG_JSON)
    return folder if isinstance(data, dict) and "hidden_dim" in data else None


@dataclass
class ModelFolder:
    """What :func:`read_model_folder` read: the folder, its config (a dict of ViTConfig fields) and weights, and
    the two files' names for error messages."""

    folder: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    config_source: str
    weights_source: str


def read_model_folder(path: str | Path, map_location: str | torch.device = "cpu") -> ModelFolder:
    """Read the model folder ``path`` names: a folder :func:`write_model_folder` wrote, or a run folder (its
    ``best/``, else ``last/``)."""
    folder = model_folder(path)
    if folder is None:
        resolve_checkpoint(path)  # names a missing path, or a run stopped before its first checkpoint
        raise CheckpointError(f"{path}: not a vitlab model folder ({CONFIG_JSON} with hidden_dim + {WEIGHTS}) nor "
                              "a run folder holding one")
    config = read_json(folder / CONFIG_JSON)
    config.pop("architecture", None)
    return ModelFolder(folder, config, load_safetensors(folder / WEIGHTS, device=str(map_location)),
                       str(folder / CONFIG_JSON), str(folder / WEIGHTS))


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, raising a :class:`CheckpointError` that names the first key that is
    missing, unexpected, or of the wrong shape."""
    own = model.state_dict()
    for key, expected in own.items():  # in the model's order, so "first" means first in the network
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {tuple(expected.shape)})")
        if tuple(state[key].shape) != tuple(expected.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects "
                                  f"{tuple(expected.shape)}")
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"{source}: unexpected key {key!r} of shape {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)


class InputSpec(Protocol):
    """What ``preprocess.json`` records (a :class:`vitlab.data.transforms.Preprocess` is one)."""

    mean: Sequence[float]
    std: Sequence[float]
    image_size: Sequence[int]
    channels: int


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



# ---------------------------------------------------------------- nested state <-> tensors + JSON
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested dict/list structure into JSON (tensors replaced by ``{"__tensor__": key}``) and a flat
    ``{key: tensor}`` dict, so an optimiser state can be stored as safetensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, dict):
            # JSON keys are strings; remember int keys (optimizer state is keyed by parameter index).
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)], "tuple": isinstance(x, tuple)}
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return {"__float__": repr(x)}
        return x

    return walk(obj, prefix or "s"), tensors


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [unflatten_state(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


# ---------------------------------------------------------------- RNG states
def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, numpy, torch (and CUDA) RNG states as JSON + uint8/int64 tensors."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {"python": [py_version, list(py_state), py_gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss),
                                                                       float(np_gauss)]}
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states restored for the devices that exist)."""
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


# ---------------------------------------------------------------- checkpoint folders
def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, preprocess: InputSpec, state: RunState,
                    optimizer: torch.optim.Optimizer | None = None, ema: torch.nn.Module | None = None,
                    slow: torch.nn.Module | None = None) -> Path:
    """Write a complete checkpoint folder atomically (temp folder, then rename swap); RNG states are captured
    here. Without ``optimizer`` the folder holds weights and state but cannot resume a run (``best/`` from EMA).
    ``slow``: Lookahead's slow weights."""
    directory = Path(directory)
    tmp = temp_sibling(directory)
    try:
        write_model_folder(tmp, to_dict(model.config), model.state_dict())
        write_preprocess(tmp, mean=preprocess.mean, std=preprocess.std, image_size=preprocess.image_size,
                         channels=preprocess.channels)
        data: dict[str, Any] = state.to_dict()
        if optimizer is not None:
            structure, tensors = flatten_state(optimizer.state_dict(), "optimizer")
            save_safetensors(tmp / OPTIMIZER, tensors)
            data["optimizer"] = structure
        for module, name in ((ema, EMA), (slow, LOOKAHEAD)):
            if module is not None:
                save_safetensors(tmp / name, module.state_dict())
        rng_meta, rng_tensors = capture_rng()
        save_safetensors(tmp / RNG, rng_tensors)
        data["rng"] = rng_meta
        write_json(tmp / STATE, data)
        swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint folder to ``dst`` atomically (used to make ``best/`` from ``last/``)."""
    src, dst = Path(src), Path(dst)
    tmp = temp_sibling(dst)
    try:
        shutil.copytree(src, tmp)
        swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_training_state(directory: str | Path, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None,
                        ema: torch.nn.Module | None = None, slow: torch.nn.Module | None = None,
                        map_location: str | torch.device = "cpu") -> RunState:
    """Load weights, optimizer, EMA, Lookahead's slow weights and RNG states of a checkpoint folder in place;
    return its :class:`RunState`."""
    directory = Path(directory)
    data = read_json(directory / STATE)
    load_state_dict_strict(model, load_safetensors(directory / WEIGHTS, device=str(map_location)),
                           source=str(directory / WEIGHTS))
    if optimizer is not None:
        if "optimizer" not in data:
            raise CheckpointError(f"{directory / STATE}: no optimizer state; this checkpoint cannot resume")
        tensors = load_safetensors(directory / OPTIMIZER, device=str(map_location))
        optimizer.load_state_dict(unflatten_state(data["optimizer"], tensors))
    for module, name, field_name in ((ema, EMA, "ema_decay"), (slow, LOOKAHEAD, "lookahead")):
        if module is not None:
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory}: no {name}, but {field_name} is set; resume with the run's "
                                      "own config")
            module.load_state_dict(load_safetensors(directory / name, device=str(map_location)))
    restore_rng(data["rng"], load_safetensors(directory / RNG))
    return RunState.from_dict(data, str(directory / STATE))
