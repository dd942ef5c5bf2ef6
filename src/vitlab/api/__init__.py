"""The verbs a user calls, each taking paths (a run folder, any checkpoint, a data spec) as well as loaded
objects; every ``vitlab`` command is a thin wrapper over one of them, and ``import vitlab`` exposes them.

- :mod:`~vitlab.api.models`: ``load`` (any format), ``convert``, ``export``;
- :mod:`~vitlab.api.runs`: ``train``, ``plot_run``, ``list_recipes``, ``resume_config``;
- :mod:`~vitlab.api.evaluation`: ``evaluate``, ``calibrate``;
- :mod:`~vitlab.api.explain`: ``predict``, ``plot_attention``, ``write_report``, ``serve`` (the web stack loads
  when it is called);
- :mod:`~vitlab.api.tools`: what the other commands run (datasets, the image cache, presets, ``bench``).

The one layer that imports :mod:`vitlab.interop` (foreign formats) and joins it to vitlab's own.
"""

from vitlab.api.evaluation import calibrate, evaluate
from vitlab.api.explain import plot_attention, predict, serve, write_report
from vitlab.api.models import (FORMATS, LoadedModel, Pretrained, as_loaded, convert, detect_format, export, load,
                               load_pretrained, read_pretrained)
from vitlab.api.runs import RunResult, list_recipes, plot_run, resume_config, train

__all__ = ["train", "RunResult", "resume_config", "plot_run", "list_recipes", "evaluate", "calibrate", "load",
           "as_loaded", "LoadedModel", "convert", "export", "detect_format", "read_pretrained", "load_pretrained",
           "Pretrained", "FORMATS", "predict", "plot_attention", "write_report", "serve"]
