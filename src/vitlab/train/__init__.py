"""The training loop and everything a run writes: fit/evaluate, optimiser and schedule, checkpoints,
metrics, plots, progress bar.

``vitlab.train`` is both this package and the function the issue asks for (``vitlab.train(config)``): an
attribute ``train`` on ``vitlab`` is overwritten by the import system whenever ``vitlab.train.<module>`` is
imported, so instead of a function shadowing the package, the package itself is callable.
"""

import sys
import types

from vitlab.train.checkpoint import load_model, load_preprocess, resolve_checkpoint
from vitlab.train.engine import DivergedError, TrainResult, evaluate, fit

__all__ = ["fit", "evaluate", "TrainResult", "DivergedError", "load_model", "load_preprocess",
           "resolve_checkpoint"]


class _CallableModule(types.ModuleType):
    def __call__(self, config=None, **kwargs):
        """``vitlab.train(config, data=None, progress=None, **changes)``: see :func:`vitlab.api.train`."""
        from vitlab.api import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
