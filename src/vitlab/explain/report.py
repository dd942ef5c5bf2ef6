"""``vitlab report RUN``: one self-contained HTML file about a training run, with every image embedded.

Config, loss, accuracy and calibration-error curves, the reliability diagram (before and after a fitted
temperature), the confusion matrix, per-class accuracy, the most confused pairs, and a grid of test images with
predictions and attention maps. Figures are PNGs inlined as base64 data URIs and
the style sheet is inline, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from vitlab._files import atomic_write_text, read_json
from vitlab.errors import ConfigError, VitlabError
from vitlab.evaluation import evaluate_held_out
from vitlab.explain.attention import attention_panels
from vitlab.loaded import LoadedModel, load_checkpoint
from vitlab.plots import (attention_figure, calibration_figure, confusion_figure, curves_figure, figure_bytes,
                          reliability_figure)
from vitlab.checkpoints import (BEST, CONFIG_JSON, LAST, CONFIG_YAML, EVAL, METRICS, read_calibration, read_metrics,
                         read_run_config, read_state, require_run_folder)

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%}
.note{color:#666;font-size:.9em}
"""


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined as a base64 data URI."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def most_confused_pairs(confusion: Sequence[Sequence[int]], classes: Sequence[str],
                        top: int = 10) -> list[tuple[str, str, int, float]]:
    """The largest off-diagonal cells of a confusion matrix (rows: true): ``(true, predicted, count,
    fraction of the true class)``, largest count first, ties in class order; zero cells are left out."""
    m = torch.as_tensor(confusion, dtype=torch.long)
    off = m.clone()
    off.fill_diagonal_(0)
    totals = m.sum(dim=1).clamp_min(1)
    flat = off.flatten()
    # Stable sort on -count keeps ties in row-major (class) order.
    order = torch.sort(-flat, stable=True).indices
    pairs = []
    for i in order.tolist()[:top]:
        count = int(flat[i])
        if count == 0:
            break
        t, p = divmod(i, m.shape[1])
        pairs.append((classes[t], classes[p], count, count / int(totals[t])))
    return pairs


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[bool]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{html.escape(str(v))}</td>' if num else
                                    f"<td>{html.escape(str(v))}</td>" for v, num in zip(row, numeric)) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _evaluate(loaded: LoadedModel, num_images: int, method: str):
    """Evaluate the checkpoint on its run's test split; returns (eval dict, attention figure PNG, spec)."""
    result, data = evaluate_held_out(loaded)
    split = data.test
    n = min(num_images, len(split))
    index = torch.linspace(0, len(split) - 1, n).round().long().unique()
    panels, _ = attention_panels(loaded, split.take(index), method=method,
                                 true_labels=[split.classes[int(split.labels[i])] for i in index])
    title = f"{'attention rollout' if method == 'rollout' else 'last-layer attention'} on test images"
    return result, figure_bytes(attention_figure(panels, title=title)), result["data"]


def _curves_html(history: list[dict]) -> list[str]:
    parts = ["<h2>Loss, accuracy and calibration</h2>"]
    if not history:
        return parts + [f'<p class="note">no {METRICS} in the run folder.</p>']
    last = history[-1]
    return parts + [img_tag(figure_bytes(curves_figure(history)), "training curves"),
                    f'<p class="note">{len(history)} epochs logged; last: train loss '
                    f"{last.get('train_loss', float('nan')):.4f}"
                    + (f", test loss {last['test_loss']:.4f}, top-1 {100 * last['top1']:.2f}%"
                       if last.get("top1") is not None else "") + "</p>"]


def loss_story(history: list[dict]) -> str:
    """One sentence on the test loss and accuracy curves: whether the loss rose after its lowest epoch while
    the accuracy went on improving, and why that happens."""
    tested = [row for row in history if row.get("top1") is not None]
    if not tested:
        return "No epoch was evaluated on the test split."
    low = min(tested, key=lambda row: row["test_loss"])
    later = [row for row in tested if row["epoch"] > low["epoch"]]
    best = max(later, key=lambda row: row["top1"]) if later else low
    if best["top1"] > low["top1"] and best["test_loss"] > low["test_loss"]:
        return (f"From epoch {low['epoch']} to {best['epoch']} the test loss rose from {low['test_loss']:.3f} to "
                f"{best['test_loss']:.3f} while the top-1 accuracy went from {100 * low['top1']:.2f}% to "
                f"{100 * best['top1']:.2f}%: the model became more confident than it is right, and the loss "
                "(the mean negative log-probability of the true class) punishes each confident mistake more, "
                "while the accuracy counts only which class is on top.")
    return (f"The test loss was lowest at epoch {low['epoch']} ({low['test_loss']:.3f}, top-1 "
            f"{100 * low['top1']:.2f}%) and did not rise while the accuracy improved after it.")


def calibration_story(before: dict, calibration: dict | None) -> str:
    """One sentence on a reliability diagram (``before``: an evaluation at T = 1): where the confidence exceeds
    the accuracy, and what the fitted temperature did (``calibration``: a checkpoint's calibration.json)."""
    bins = before["reliability"]
    over = [i for i, n in enumerate(bins["count"]) if n and bins["confidence"][i] > bins["accuracy"][i]]
    share = sum(bins["count"][i] for i in over) / max(sum(bins["count"]), 1)
    text = (f"In the reliability diagram the confidence exceeds the accuracy (bars below the diagonal, the gap "
            f"shaded) in {len(over)} of {sum(1 for n in bins['count'] if n)} occupied bins, holding "
            f"{100 * share:.0f}% of the test images; the expected calibration error is {100 * before['ece']:.2f}%")
    if calibration is None:
        return text + (" and no temperature was fitted (<code>vitlab calibrate RUN</code>, or train with "
                       "<code>--set calibrate=true</code>).")
    after = calibration["test_after"]
    return text + (f", and dividing the logits by the temperature T = {calibration['temperature']:.3f} fitted on "
                   f"{calibration['val_images']:,} validation images took it to {100 * after['ece']:.2f}% (NLL "
                   f"{before['nll']:.3f} to {after['nll']:.3f}) without changing any prediction.")


def _calibration_html(history: list[dict], calibration: dict | None, result: dict) -> list[str]:
    """The reliability diagram (before and after the fitted temperature) and the two sentences that read it."""
    before = calibration["test_before"] if calibration is not None else result
    figure = (calibration_figure(calibration) if calibration is not None
              else reliability_figure(result["reliability"]))
    return ["<h2>Calibration: do the probabilities mean what they say?</h2>",
            img_tag(figure_bytes(figure), "reliability diagram"),
            f"<p>{html.escape(loss_story(history))} {calibration_story(before, calibration)}</p>"]


def _scaled(result: dict) -> str:
    t = result.get("temperature", 1.0)
    return f" (the logits divided by the fitted temperature T = {t:.3f})" if t != 1.0 else ""


def _results_html(run: Path, loaded: LoadedModel, num_images: int, method: str,
                  history: list[dict]) -> list[str]:
    """Test accuracy, confusion matrix, per-class accuracy, most confused pairs and the image grid: from a fresh
    evaluation on the run's test split, else from the run's eval.json (and no grid)."""
    grid_png = None
    try:
        result, grid_png, spec = _evaluate(loaded, num_images, method)
        note = (f"The checkpoint above evaluated now on the test split of <code>{html.escape(spec)}</code> "
                f"({result['count']:,} images).")
    except VitlabError as e:
        if not (run / EVAL).is_file():
            raise
        log.warning("cannot evaluate on the run's data (%s); using %s", e, run / EVAL)
        result = read_json(run / EVAL)
        note = (f"The run's data could not be loaded ({html.escape(str(e))}); these numbers are the run's "
                f"<code>{EVAL}</code> (its last evaluated epoch) and the image grid is left out.")
    classes, confusion = list(result["classes"]), result["confusion"]
    totals = [sum(row) for row in confusion]
    rows = [(name, totals[i], confusion[i][i], f"{100 * result['per_class'][name]:.1f}%")
            for i, name in enumerate(classes)]
    pairs = most_confused_pairs(confusion, classes)
    return [
        "<h2>Test accuracy</h2>",
        f'<p>top-1 <b>{100 * result["top1"]:.2f}%</b>, top-5 {100 * result["top5"]:.2f}%, '
        f'test loss {result["test_loss"]:.4f}{_scaled(result)}. <span class="note">{note}</span></p>',
        *(_calibration_html(history, read_calibration(loaded.path), result) if "reliability" in result else []),
        "<h2>Confusion matrix</h2>", img_tag(figure_bytes(confusion_figure(confusion, classes)), "confusion matrix"),
        "<h2>Per-class accuracy</h2>",
        _table(("class", "test images", "correct", "accuracy"), rows, (False, True, True, True)),
        "<h2>Most confused pairs</h2>",
        _table(("true class", "predicted as", "images", "of the true class"),
               [(t, p, c, f"{100 * f:.1f}%") for t, p, c, f in pairs], (False, False, True, True)) if pairs
        else "<p>No test image was misclassified.</p>",
        "<h2>Test images: predictions and attention</h2>",
        *(['<p class="note">Each image with its attention map (red: most attended); caption: predicted class and '
           "probability, the true class below it (green: right, red: wrong).</p>",
           img_tag(grid_png, "test images with attention maps")] if grid_png is not None
          else ['<p class="note">left out: the run\'s data could not be loaded.</p>']),
    ]


def write_report(run: str | Path, output: str | Path | None = None, *, num_images: int = 16,
                 method: str = "rollout", checkpoint: str | None = None) -> Path:
    """Write ``output`` (default ``RUN/report.html``): a self-contained HTML report of training run ``run``.

    The checkpoint (``checkpoint="best"`` or ``"last"``; default ``best/``, else ``last/``) is evaluated
    afresh on the run's test split; when that data cannot be loaded any more, the run's ``eval.json`` (its
    last evaluated epoch) is used and the image grid is left out, with a note saying so.
    """
    run = require_run_folder(run, "`vitlab report`")
    output = Path(output) if output is not None else run / "report.html"
    config_text = (run / CONFIG_YAML).read_text(encoding="utf-8")
    run_config = read_run_config(run)
    if checkpoint is not None and checkpoint not in (BEST, LAST):
        raise ConfigError(f"checkpoint={checkpoint!r} must be 'best' or 'last' (a folder of the run)")
    loaded = load_checkpoint(run / checkpoint if checkpoint else run)
    state = read_state(loaded.path)
    history = read_metrics(run) if (run / METRICS).is_file() else []

    parts = [f"<h1>vitlab run report: {html.escape(run.name)}</h1>",
             f'<p class="note">checkpoint <code>{html.escape(str(loaded.path))}</code>'
             + (f" (saved after epoch {state.epoch} of {state.planned_epochs})" if state else "") + ", model "
             f"{html.escape(str(run_config.get('model', '?')))}, {loaded.model.num_parameters():,} parameters; "
             f"data <code>{html.escape(str(run_config.get('data', '?')))}</code>; written "
             f"{time.strftime('%Y-%m-%d %H:%M')}</p>"]

    parts += _curves_html(history)
    parts += _results_html(run, loaded, num_images, method, history)
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{html.escape(config_text)}</pre>")
    parts.append("<h3>Model</h3>")
    parts.append(f"<pre>{html.escape((loaded.path / CONFIG_JSON).read_text(encoding='utf-8'))}</pre>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>vitlab report: {html.escape(run.name)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    atomic_write_text(output, page)
    return output


__all__ = ["write_report", "most_confused_pairs"]
