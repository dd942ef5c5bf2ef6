"""Training runs: ``vitlab.train(config)`` (which reads ``config.init``'s pretrained weights, trains, and draws the
run's figures), ``vitlab.plot_run(run)``, ``vitlab.list_recipes()`` and :func:`resume_config`."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from vitlab._files import read_json
from vitlab.checkpoints import CONFIG_YAML, EVAL, METRICS, can_resume, read_calibration, read_metrics, require_run_folder
from vitlab.config import RECIPE_META_KEYS, RECIPES_DIR, TrainConfig, config_from_dict, load_yaml, to_dict
from vitlab.data import DatasetSplits
from vitlab.errors import ConfigError, DataError
from vitlab.interop import read_pretrained
from vitlab.notebook import NotebookProgress, RunResult, in_notebook
from vitlab.plots import plot_run_files
from vitlab.training import TrainResult, fit
from vitlab.training.engine import model_overrides
from vitlab.training.launch import launch
from vitlab.training.progress import Progress


def train(config: TrainConfig | None = None, *, data: str | Path | DatasetSplits | None = None, progress=None,
          devices: int = 1, **changes: Any) -> RunResult:
    """Train a ViT as ``config`` (a :class:`~vitlab.config.TrainConfig`; default: the small digits model) says,
    with any field changed by keyword (``vitlab.train(epochs=5, lr=1e-3)``); return a
    :class:`~vitlab.notebook.RunResult` (a :class:`~vitlab.training.TrainResult` whose figures a notebook
    shows inline).

    ``data``: a data spec (``"folder:photos"``, the same as ``data=`` among the changes) or a ready
    ``DatasetSplits``. To continue a run, pass ``resume=RUN``: the run's own ``config.yaml`` is the base, and the
    fields given as keywords (``vitlab.train(resume=run, epochs=50)``) or set in ``config`` to other than their
    defaults change it. ``config.init`` names pretrained weights to fine-tune (any format
    :func:`vitlab.load` reads). ``progress``: see :class:`~vitlab.training.progress.ProgressBar`; by default a
    :class:`~vitlab.notebook.NotebookProgress` in a Jupyter kernel and none elsewhere; ``False``: none.

    ``devices=N``: N DistributedDataParallel processes started from this one, as ``torchrun --nproc_per_node N``
    would (:mod:`vitlab.training.launch`): from a notebook too, with rank 0's progress shown here.
    """
    if isinstance(data, (str, Path)):
        changes["data"], data = str(data), None
    config = config or TrainConfig()
    resume = changes.pop("resume", None) or config.resume
    if resume:
        defaults = to_dict(TrainConfig())
        changed = {k: v for k, v in to_dict(config).items() if v != defaults[k] and k not in ("resume", "out")}
        config = resume_config(resume, {**changed, **changes})
    elif changes:
        config = config.replace(**changes)
    if progress is None and in_notebook():
        progress = NotebookProgress()
    progress = None if progress is False else progress
    if progress is not None and not isinstance(progress, Progress):
        missing = [m for m in ("start", "update", "end", "epoch_done") if not callable(getattr(progress, m, None))]
        raise ConfigError(f"progress={type(progress).__name__}: lacks {', '.join(missing)} (see "
                          "vitlab.training.progress.Progress)")
    model = normalization = None
    if config.init and not (config.resume and can_resume(config.resume)):  # a resumed run has its own weights
        found = read_pretrained(config.init, **model_overrides(config))
        model, normalization = found.model, found.normalization
    if devices == 1:
        result = fit(config, data=data, model=model, normalization=normalization, progress=progress)
    else:
        result = launch(config, devices, data=data, model=model, normalization=normalization, progress=progress)
    _draw(config, result)
    return RunResult.of(result)


def _draw(config: TrainConfig, result: TrainResult) -> None:
    """The run's figures (``config.plots``), by one process: the caller of a launch, or torchrun's rank 0."""
    if config.plots and result.history and os.environ.get("RANK", "0") == "0":
        plot_run_files(result.run_dir, result.history, result.final_eval, result.calibration)


def resume_config(run: str | Path, changes: dict[str, Any] | None = None) -> TrainConfig:
    """The config of run folder ``run`` (its ``config.yaml``) with ``changes``, set to resume it."""
    run = require_run_folder(run, "--resume")
    data = load_yaml(run / CONFIG_YAML)
    data.update(changes or {})
    data.update(resume=str(run), out=None)
    return config_from_dict(TrainConfig, data, source=str(run / CONFIG_YAML))


def plot_run(run: str | Path) -> list[Path]:
    """Draw ``curves.png`` (train and test loss, test accuracy and calibration error per epoch) into run folder
    ``run`` and, when it has ``eval.json``, ``confusion_matrix.png`` and ``reliability.png`` (before and after
    its fitted temperature, when it has one); return the files written."""
    run = Path(run)
    history = read_metrics(run)
    if not history:
        raise DataError(f"{run / METRICS} is empty: the run has not finished an epoch yet")
    final_eval = read_json(run / EVAL) if (run / EVAL).is_file() else None
    return plot_run_files(run, history, final_eval, read_calibration(run))


def list_recipes() -> list[dict[str, Any]]:
    """The packaged recipes: name, description, model, data, and the runs of it that were ``measured`` (a list,
    empty when none was recorded; each run: accuracy, wall time, machine, command, note)."""
    known = {f.name for f in fields(TrainConfig)}
    rows = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = load_yaml(path)
        rows.append({"name": path.stem, "description": raw.get("description", ""), "model": raw.get("model"),
                     "data": raw.get("data"), "epochs": raw.get("epochs"), "measured": raw.get("measured") or [],
                     "fields": {k: v for k, v in raw.items() if k in known and k not in RECIPE_META_KEYS}})
    return rows


__all__ = ["train", "RunResult", "resume_config", "plot_run", "list_recipes"]
