"""The top-level Python API of training: ``vitlab.train(config)``, ``vitlab.evaluate(...)``,
``vitlab.plot_run(run)`` and ``vitlab.list_recipes()``; the CLI commands are thin wrappers over these."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from vitlab.config import RECIPE_META_KEYS, RECIPES_DIR, TrainConfig, config_from_dict, load_yaml, to_dict
from vitlab.errors import DataError

log = logging.getLogger("vitlab.train")


def resume_config(run: str | Path, changes: dict[str, Any] | None = None) -> TrainConfig:
    """The config of run folder ``run`` (its ``config.yaml``) with ``changes``, set to resume it."""
    from vitlab.errors import CheckpointError

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run}: not a run folder (no config.yaml); --resume takes a folder written by "
                              "`vitlab train`")
    data = load_yaml(path)
    data.update(changes or {})
    data.update(resume=str(run), out=None)
    return config_from_dict(TrainConfig, data, source=str(path))


def train(config: TrainConfig | None = None, *, data=None, progress=None, **changes: Any):
    """Train a ViT as ``config`` (a :class:`~vitlab.config.TrainConfig`, default: the small digits model)
    says, with any field overridden by keyword; return a :class:`~vitlab.train.TrainResult`.

    With ``config.resume`` set, the run's own ``config.yaml`` is the base and only the fields of ``config``
    that differ from the defaults change it. ``config.init`` names pretrained weights (any format
    ``vitlab.interop.load_pretrained`` reads). ``data`` is a data spec (``"folder:photos"``) or a ready
    ``DatasetSplits``.
    """
    from vitlab.train.engine import fit

    if isinstance(data, (str, Path)):  # vitlab.train(data="folder:photos") means the config field
        changes["data"], data = str(data), None
    config = config or TrainConfig()
    if changes:
        config = config.replace(**changes)
    if config.resume:
        defaults = to_dict(TrainConfig())
        changed = {k: v for k, v in to_dict(config).items() if v != defaults[k] and k not in ("resume", "out")}
        config = resume_config(config.resume, changed)
    model = None
    if config.init:
        from vitlab.interop import load_pretrained

        # The run's model fields apply to the pretrained architecture too (image size: prepare_finetune).
        overrides = dict(config.model_overrides)
        overrides.update({k: getattr(config, k) for k in ("drop_path", "dropout") if getattr(config, k) is not None})
        model = load_pretrained(config.init, **overrides)
    return fit(config, data=data, model=model, progress=progress)


def evaluate(checkpoint: str | Path, data: str, *, batch_size: int = 512, device: str = "auto",
             precision: str = "auto", out: str | Path | None = None, cache_dir: str | None = None,
             workers: int | None = None, hflip: bool | None = None) -> dict:
    """Evaluate a run (its ``best/``, else ``last/``) or a checkpoint folder on the test split of ``data``:
    test loss, top-1, top-5, per-class accuracy and the confusion matrix. With ``out``, writes
    ``eval.json`` and ``confusion_matrix.png`` (class names on the axes) there. ``hflip``: average each
    image's probabilities with its mirror image's (None: as the run evaluated, its ``tta_hflip``)."""
    from vitlab.data import load_data
    from vitlab.train.checkpoint import load_model, load_preprocess, resolve_checkpoint
    from vitlab._device import default_precision, resolve_device
    from vitlab.train.engine import check_classes
    from vitlab.train.engine import evaluate as evaluate_model

    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    precision = default_precision(dev) if precision == "auto" else precision  # as training evaluated
    model = load_model(path, map_location=dev)
    cfg = model.config
    # A folder without a test split is split by the run's own val_fraction and seed, so the test images here
    # are the ones the run held out (not, with the defaults, partly its training images).
    run_file = path.parent / "config.yaml"
    run_config = load_yaml(run_file) if run_file.is_file() else {}
    splits = load_data(data, image_size=tuple(cfg.image_size), channels=cfg.in_channels, cache_dir=cache_dir,
                       workers=workers, val_fraction=run_config.get("val_fraction", 0.1),
                       seed=run_config.get("seed", 0))
    classes = list(splits.classes)
    check_classes(cfg, classes, data, path)
    pre = load_preprocess(path) or {"mean": list(splits.mean), "std": list(splits.std)}
    result = evaluate_model(model, splits.test, mean=pre["mean"], std=pre["std"], image_size=tuple(cfg.image_size),
                            batch_size=batch_size, device=dev, precision=precision, classes=classes,
                            hflip=bool(run_config.get("tta_hflip", False)) if hflip is None else hflip)
    result = {"checkpoint": str(path), "data": data, **result}
    if out is not None:
        from vitlab._files import write_json
        from vitlab.train.plots import plot_confusion

        out = Path(out)
        write_json(out / "eval.json", result)
        plot_confusion(result["confusion"], classes, out / "confusion_matrix.png",
                       title=f"{path}: top-1 {100 * result['top1']:.2f}%")
    return result


def plot_run(run: str | Path) -> list[Path]:
    """Draw ``curves.png`` (train and test loss, test accuracy per epoch) into run folder ``run`` and, when it
    has ``eval.json``, ``confusion_matrix.png``; return the files written."""
    from vitlab._files import read_json
    from vitlab.train.metrics import read_metrics
    from vitlab.train.plots import plot_run_files

    run = Path(run)
    history = read_metrics(run / "metrics.jsonl")
    if not history:
        raise DataError(f"{run / 'metrics.jsonl'} is empty: the run has not finished an epoch yet")
    final_eval = read_json(run / "eval.json") if (run / "eval.json").is_file() else None
    return plot_run_files(run, history, final_eval)


def list_recipes() -> list[dict[str, Any]]:
    """The packaged recipes: name, description, model, data, and what it ``measured`` (accuracy, wall time,
    machine, command) when a run of it was recorded."""
    known = {f.name for f in fields(TrainConfig)}
    rows = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = load_yaml(path)
        rows.append({"name": path.stem, "description": raw.get("description", ""), "model": raw.get("model"),
                     "data": raw.get("data"), "epochs": raw.get("epochs"), "measured": raw.get("measured"),
                     "fields": {k: v for k, v in raw.items() if k in known and k not in RECIPE_META_KEYS}})
    return rows
