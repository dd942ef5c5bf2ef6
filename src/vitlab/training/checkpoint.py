"""Checkpoints of a training run: atomic save, exact resume.

A checkpoint folder (``RUN/last``, ``RUN/best``; see :mod:`vitlab.runs` for the layout) is a ``save_pretrained``
folder plus ``preprocess.json`` and the training state: the :class:`~vitlab.runs.RunState` and the structure of
the optimizer state in ``state.json``, the optimizer's tensors, the RNG states and the EMA weights in
safetensors files. Everything is safetensors or JSON; nothing is pickled. A checkpoint is written into a
temporary sibling folder and swapped in by renames, so a process killed at any moment leaves the previous
checkpoint or the new one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab._files import load_safetensors, read_json, save_safetensors, write_json
from vitlab.data.transforms import Preprocess
from vitlab.errors import CheckpointError
from vitlab.models import load_state_dict_strict
from vitlab.runs import EMA, OPTIMIZER, RNG, STATE, WEIGHTS, RunState, swap_in, temp_sibling, write_preprocess



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
def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, preprocess: Preprocess, state: RunState,
                    optimizer: torch.optim.Optimizer | None = None, ema: torch.nn.Module | None = None) -> Path:
    """Write a complete checkpoint folder atomically (temp folder, then rename swap); RNG states are captured
    here. Without ``optimizer`` the folder holds weights and state but cannot resume a run (``best/`` from EMA)."""
    directory = Path(directory)
    tmp = temp_sibling(directory)
    try:
        model.save_pretrained(tmp)
        write_preprocess(tmp, mean=preprocess.mean, std=preprocess.std, image_size=preprocess.image_size,
                         channels=preprocess.channels)
        data: dict[str, Any] = state.to_dict()
        if optimizer is not None:
            structure, tensors = flatten_state(optimizer.state_dict(), "optimizer")
            save_safetensors(tmp / OPTIMIZER, tensors)
            data["optimizer"] = structure
        if ema is not None:
            save_safetensors(tmp / EMA, ema.state_dict())
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
                        ema: torch.nn.Module | None = None, map_location: str | torch.device = "cpu") -> RunState:
    """Load weights, optimizer, EMA and RNG states of a checkpoint folder in place; return its :class:`RunState`."""
    directory = Path(directory)
    data = read_json(directory / STATE)
    load_state_dict_strict(model, load_safetensors(directory / WEIGHTS, device=str(map_location)),
                           source=str(directory / WEIGHTS))
    if optimizer is not None:
        if "optimizer" not in data:
            raise CheckpointError(f"{directory / STATE}: no optimizer state; this checkpoint cannot resume")
        tensors = load_safetensors(directory / OPTIMIZER, device=str(map_location))
        optimizer.load_state_dict(unflatten_state(data["optimizer"], tensors))
    if ema is not None:
        if not (directory / EMA).is_file():
            raise CheckpointError(f"{directory}: no {EMA}, but ema_decay is set; resume with the run's own config")
        ema.load_state_dict(load_safetensors(directory / EMA, device=str(map_location)))
    restore_rng(data["rng"], load_safetensors(directory / RNG))
    return RunState.from_dict(data, str(directory / STATE))
