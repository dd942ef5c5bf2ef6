"""vitlab in a Jupyter notebook: a progress display that updates in place, and the result of
:func:`vitlab.train` that shows its figures inline.

- :func:`in_notebook`: whether this process is a Jupyter kernel (the test ``tqdm.autonotebook`` makes);
- :class:`NotebookProgress`: what ``vitlab.train`` shows there instead of the terminal's bar: one HTML block,
  updated through ``IPython.display`` (a ``display_id``), with the epoch's bar and a table of finished epochs;
- :class:`RunResult`: the :class:`~vitlab.training.TrainResult` ``vitlab.train`` returns, with ``curves()``,
  ``confusion()``, ``attention()`` (PNG images a notebook draws inline), ``predict()``, ``report()`` and
  ``load()``; shown as the last value of a cell it is a summary with its curves and confusion matrix.

No widget library is needed: every Jupyter front end (JupyterLab, Notebook, VS Code) renders HTML and PNG
outputs and updates a display by its id. IPython is imported only inside a kernel, where it is running already.
"""

from __future__ import annotations

import html
import sys
import time
from pathlib import Path
from typing import Sequence

from vitlab.errors import DataError
from vitlab.explain.attention import attention_grid
from vitlab.explain.predict import Prediction, predict
from vitlab.explain.report import img_tag, write_report
from vitlab.loaded import LoadedModel, load_checkpoint
from vitlab.plots import confusion_figure, curves_figure, figure_bytes
from vitlab.checkpoints import METRICS, read_run_config
from vitlab.training import TrainResult
from vitlab.training.progress import epoch_eta, format_time


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel: IPython is running, started by an ``IPKernelApp`` (a terminal
    IPython is not a notebook)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


# ---------------------------------------------------------------- progress
_METRICS = [("epoch", "epoch", "{}"), ("train_loss", "train loss", "{:.4f}"), ("test_loss", "test loss", "{:.4f}"),
            ("top1", "top-1", "{:.2%}"), ("top5", "top-5", "{:.2%}"), ("lr", "lr", "{:.2e}"),
            ("images_per_s", "img/s", "{:,.0f}")]


class NotebookProgress:
    """Training progress as one HTML block that updates in place: the epoch's bar (steps, loss, images/s,
    ETA) over a table of the finished epochs (the last ``rows``). Called as
    :class:`~vitlab.training.progress.ProgressBar` is, plus ``epoch_done(row)``."""

    def __init__(self, rows: int = 10):
        self.rows, self.history, self._handle = rows, [], None
        self._epoch = self._epochs = self._steps = self._step = 0
        self._t0, self._line = 0.0, ""

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._epochs, self._steps, self._step = epoch, epochs, steps, 0
        self._t0, self._line = time.perf_counter(), "starting"
        self._show()

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        _, eta = epoch_eta(step, self._steps, self._t0)
        self._step, self._line = step, f"loss {loss:.4f} · {images_per_s:,.0f} img/s · ETA {format_time(eta)}"
        self._show()

    def end(self) -> None:
        self._step, self._line = self._steps, f"trained in {format_time(time.perf_counter() - self._t0)}"
        self._show()

    def epoch_done(self, row: dict) -> None:
        self.history.append(row)
        self._line = "evaluated" if row.get("top1") is not None else "done"
        self._show()

    def text(self) -> str:
        """The display as plain text (for front ends that do not render HTML)."""
        head = f"epoch {self._epoch}/{self._epochs}  step {self._step}/{self._steps}  {self._line}"
        last = self.history[-1] if self.history else None
        return head + (f"\nlast epoch: {_row_text(last)}" if last else "")

    def html(self) -> str:
        """The display as HTML: the bar, then the table."""
        bar = (f'<progress value="{self._step}" max="{max(self._steps, 1)}" style="width:16em"></progress> '
               f"epoch {self._epoch}/{self._epochs} · step {self._step}/{self._steps} · {html.escape(self._line)}")
        shown = self.history[-self.rows:]
        head = "".join(f"<th>{label}</th>" for key, label, _ in _METRICS)
        body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(key), fmt)}</td>" for key, _, fmt in _METRICS)
                       + "</tr>" for row in shown)
        earlier = len(self.history) - len(shown)
        note = f"<div>{earlier} earlier epoch(s) in {METRICS}</div>" if earlier else ""
        table = f'<table class="vitlab-epochs"><tr>{head}</tr>{body}</table>' if shown else ""
        return f'<div class="vitlab-progress"><div>{bar}</div>{note}{table}</div>'

    def _show(self) -> None:
        from IPython.display import display

        bundle = {"text/html": self.html(), "text/plain": self.text()}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)


def _cell(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _row_text(row: dict) -> str:
    return "  ".join(f"{label} {_cell(row.get(key), fmt)}" for key, label, fmt in _METRICS
                     if row.get(key) is not None)


# ---------------------------------------------------------------- the result
class PNGImage:
    """A figure as PNG bytes: a notebook draws it inline (``_repr_png_``); :meth:`save` writes it."""

    def __init__(self, data: bytes, alt: str = "figure"):
        self.data, self.alt = data, alt

    def _repr_png_(self) -> bytes:
        return self.data

    def _repr_html_(self) -> str:
        return img_tag(self.data, self.alt)

    def save(self, path: str | Path) -> Path:
        """Write the PNG to ``path``."""
        path = Path(path)
        path.write_bytes(self.data)
        return path


class HTMLPage:
    """A self-contained HTML file (``path``) that a notebook shows inline, in a frame of its own."""

    def __init__(self, path: Path, height: int = 640):
        self.path, self.height = Path(path), height

    def _repr_html_(self) -> str:
        page = html.escape(self.path.read_text(encoding="utf-8"), quote=True)
        return f'<iframe srcdoc="{page}" style="width:100%;height:{self.height}px;border:1px solid #ddd"></iframe>'

    def __repr__(self) -> str:
        return f"HTMLPage({str(self.path)!r})"


class RunResult(TrainResult):
    """What :func:`vitlab.train` returns: a :class:`~vitlab.training.TrainResult` (``run_dir``, ``history``,
    ``top1``, ...) whose figures a notebook shows inline."""

    @classmethod
    def of(cls, result: TrainResult) -> "RunResult":
        """The same result, with the display methods."""
        return cls(**{name: getattr(result, name) for name in result.__dataclass_fields__})

    def curves(self) -> PNGImage:
        """Train and test loss and test top-1 per epoch (the run's ``curves.png``)."""
        return PNGImage(figure_bytes(curves_figure(self.history, title=self.run_dir.name)), "training curves")

    def confusion(self) -> PNGImage:
        """The confusion matrix of the last evaluated epoch."""
        if self.final_eval is None:
            raise DataError(f"{self.run_dir}: the run was not evaluated, so it has no confusion matrix")
        top1 = self.final_eval["top1"]
        fig = confusion_figure(self.final_eval["confusion"], self.final_eval["classes"],
                               title=f"{self.run_dir.name}: top-1 {100 * top1:.2f}%")
        return PNGImage(figure_bytes(fig), "confusion matrix")

    def attention(self, images: Sequence[str | Path] | str | Path | None = None, *, num_images: int = 8,
                  **options) -> PNGImage:
        """Attention maps of the trained model over ``images`` (files or folders), or over ``num_images`` test
        images of the run's dataset; ``options`` as :func:`vitlab.explain.plot_attention`'s."""
        if images is None:
            options.update(data=read_run_config(self.run_dir)["data"], num_images=num_images)
        paths = [images] if isinstance(images, (str, Path)) else list(images or ())
        fig, _ = attention_grid(self.load(), paths, **options)
        return PNGImage(figure_bytes(fig), "attention maps")

    def predict(self, images: Sequence[str | Path] | str | Path, top_k: int = 3) -> list[Prediction]:
        """The trained model's top-``top_k`` classes for image files and folders (:func:`vitlab.explain.predict`)."""
        return predict(self.load(), images, top_k=top_k)

    def report(self, output: str | Path | None = None) -> HTMLPage:
        """Write the run's HTML report (``vitlab report``; default ``RUN/report.html``), shown inline."""
        return HTMLPage(write_report(self.run_dir, output))

    def load(self) -> LoadedModel:
        """The trained model with its preprocessing and labels (``vitlab.load(run_dir)``: best, else last)."""
        return load_checkpoint(self.run_dir)

    def _repr_html_(self) -> str:
        facts = [("run folder", self.run_dir), ("epochs", len(self.history)), ("stopped", self.stopped),
                 ("wall time", format_time(self.wall_time))]
        if self.top1 is not None:
            facts[1:1] = [("test top-1", f"{self.top1:.2%}"),
                          ("best", f"{self.best_top1:.2%} at epoch {self.best_epoch}")]
        rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
        figures = [self.curves()._repr_html_()] if self.history else []
        if self.final_eval is not None:
            figures.append(self.confusion()._repr_html_())
        return f"<div><table>{rows}</table>{''.join(figures)}</div>"


__all__ = ["in_notebook", "NotebookProgress", "RunResult", "PNGImage", "HTMLPage"]
