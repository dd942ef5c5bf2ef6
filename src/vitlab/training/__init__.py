"""The training loop and everything a run writes.

- :func:`fit`: train as a :class:`~vitlab.config.TrainConfig` says and write the run folder (``engine.py``);
- :class:`TrainStep`: the one training step that ``fit`` runs and ``vitlab bench`` times (``step.py``);
- the time limit (``budget.py``), AdamW groups and the schedule (``optim.py``), the progress bar and its
  protocol (``progress.py``); checkpoints and exact resume are :mod:`vitlab.checkpoints`.

Most users call :func:`vitlab.train`, which builds the config from a recipe and keyword changes and calls
:func:`fit`.
"""

from vitlab.training.engine import DivergedError, TrainResult, fit
from vitlab.training.step import TrainStep, make_train_step

__all__ = ["fit", "TrainResult", "DivergedError", "TrainStep", "make_train_step"]
