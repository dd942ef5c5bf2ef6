"""What training reports as it goes (:class:`Progress`), and a one-line progress bar (loss, images/s, ETA) that
stays quiet when its stream is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """What :func:`vitlab.training.fit` calls on rank 0: ``start`` as an epoch begins (its number from 1, the
    epochs planned, its steps), ``update`` after each step (the running mean loss, images/s), ``end`` when the
    epoch's steps are done, ``epoch_done`` with the epoch's metrics row once it is evaluated and saved.
    :class:`ProgressBar`, :class:`vitlab.notebook.NotebookProgress` and the multi-process launcher's relay are
    the three kinds vitlab has."""

    def start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def update(self, step: int, loss: float, images_per_s: float) -> None: ...

    def end(self) -> None: ...

    def epoch_done(self, row: dict) -> None: ...


def format_time(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def epoch_eta(step: int, steps: int, started: float) -> tuple[float, float]:
    """(fraction of the epoch done, seconds it has left) after ``step`` of ``steps``, begun at ``started``
    (``time.perf_counter()``)."""
    frac = step / max(steps, 1)
    elapsed = time.perf_counter() - started
    return frac, (elapsed / frac - elapsed if frac > 0 else 0.0)


class ProgressBar:
    """A :class:`Progress` that draws one line per epoch: writes to ``stream`` (default stdout) only if it is a
    terminal, unless ``force``."""

    def __init__(self, stream: TextIO | None = None, width: int = 24, force: bool = False):
        self.stream = stream or sys.stdout
        self.enabled = force or (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.width = width
        self._t0 = 0.0
        self._epoch = self._epochs = self._steps = 0

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._epochs, self._steps, self._t0 = epoch, epochs, steps, time.perf_counter()

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        frac, eta = epoch_eta(step, self._steps, self._t0)
        filled = int(self.width * frac)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\repoch {self._epoch}/{self._epochs} [{bar}] {step}/{self._steps} loss {loss:.4f} "
                          f"{images_per_s:,.0f} img/s ETA {format_time(eta)}  ")
        self.stream.flush()

    def end(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()

    def epoch_done(self, row: dict) -> None:
        """Nothing: the bar shows steps; the command prints the epoch's line."""
