"""``vitlab.evaluate`` and ``vitlab.calibrate``: load a checkpoint, score it or fit its temperature, and write
what the commands write (``eval.json``, ``confusion_matrix.png``, ``reliability.png``)."""

from __future__ import annotations

from pathlib import Path

from vitlab._device import resolve_device, resolve_precision
from vitlab._files import ensure_folder, write_json
from vitlab.api.models import as_loaded
from vitlab.checkpoints import CONFUSION, EVAL, RELIABILITY, read_calibration
from vitlab.evaluation import calibration_splits, evaluate_held_out, fit_calibration
from vitlab.loaded import LoadedModel
from vitlab.plots import RUN_FIGURE_DPI, calibration_figure, confusion_figure, save_figure


def evaluate(checkpoint: str | Path | LoadedModel, data: str | None = None, *, batch_size: int = 512,
             device: str = "auto", precision: str = "auto", tta_hflip: bool | None = None,
             tta_shift: int | None = None, out: str | Path | None = None, cache_dir: str | None = None,
             workers: int | None = None) -> dict:
    """Evaluate a trained model on the test split of ``data`` (default: its run's own data): test loss, top-1,
    top-5, per-class accuracy and the confusion matrix.

    ``checkpoint``: a run folder (its ``best/``, else ``last/``), a checkpoint folder, any file
    :func:`vitlab.load` reads, or a loaded model. ``precision`` "auto" is what training used (bf16 where the
    device has fast bf16 matmul). ``tta_hflip``: also score each image's mirror image and average the
    probabilities; ``tta_shift``: also score those views moved that many pixels
    (:func:`vitlab.evaluation.tta_views`; both None: as the run's final evaluation did). With ``out``, writes
    ``eval.json`` and ``confusion_matrix.png`` (class names on the axes) into that folder.
    """
    if out is not None:
        ensure_folder(out, "--out")  # before the work: a bad folder is named at once
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    loaded = as_loaded(checkpoint, str(dev))
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


def save_reliability(loaded: LoadedModel) -> Path:
    """Draw ``reliability.png`` (before and after the fitted temperature) from the checkpoint's
    ``calibration.json`` into its run folder (else the checkpoint folder)."""
    folder = loaded.run or loaded.path
    fig = calibration_figure(read_calibration(loaded.path), title=folder.name)
    return save_figure(fig, folder / RELIABILITY, dpi=RUN_FIGURE_DPI)


def calibrate(checkpoint: str | Path | LoadedModel, data: str | None = None, *, batch_size: int = 512,
              device: str = "auto", precision: str = "auto", cache_dir: str | None = None,
              workers: int | None = None) -> dict:
    """Fit the temperature of a trained model after the fact and save it beside its weights, so that
    :func:`vitlab.predict`, the report, the server and the ONNX export divide its logits by it.

    T is fitted on the validation split (:func:`vitlab.evaluation.calibration_splits`: a ``val/`` folder, or the
    images a run trained with ``calibrate=true`` held out; never the test split). Prints nothing; returns
    :func:`~vitlab.evaluation.fit_calibration`'s record (the test split's NLL, ECE, MCE, Brier before and after)
    and writes ``reliability.png``.
    """
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    loaded = as_loaded(checkpoint, str(dev))
    splits = calibration_splits(loaded, data, cache_dir=cache_dir, workers=workers)
    result = fit_calibration(loaded, splits, batch_size=batch_size, device=dev, precision=precision)
    save_reliability(loaded)
    return {"checkpoint": str(loaded.path), "data": splits.spec, **result}


__all__ = ["evaluate", "calibrate", "save_reliability"]
