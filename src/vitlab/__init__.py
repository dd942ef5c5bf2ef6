"""vitlab: Vision Transformers that train well.

The names below are imported on first use (PEP 562), so ``import vitlab`` and ``vitlab --version`` stay light:
torch loads with the first model, dataset or run, matplotlib with the first figure, and the web stack (the
``serve`` extra) only with :func:`serve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitlab._version import __version__
from vitlab.errors import CheckpointError, ConfigError, DataError, MissingExtraError, VitlabError

if TYPE_CHECKING:
    from vitlab.api import (LoadedModel, calibrate, convert, evaluate, export, list_recipes, load, plot_attention,
                            plot_run, predict, serve, train, write_report)
    from vitlab.config import TrainConfig, ViTConfig
    from vitlab.evaluation import evaluate_model
    from vitlab.models import VisionTransformer, ViTOutput, create_model, get_config, list_models

__all__ = ["ViTConfig", "TrainConfig", "VisionTransformer", "ViTOutput", "create_model", "get_config", "list_models",
           "train", "evaluate", "evaluate_model", "load", "LoadedModel", "plot_run", "list_recipes", "VitlabError",
           "ConfigError", "DataError", "CheckpointError", "MissingExtraError", "serve", "calibrate", "convert",
           "export", "predict", "plot_attention", "write_report", "__version__"]

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(["LoadedModel", "calibrate", "convert", "evaluate", "export", "list_recipes", "load",
                     "plot_attention", "plot_run", "predict", "serve", "train", "write_report"], "vitlab.api"),
    **dict.fromkeys(["TrainConfig", "ViTConfig"], "vitlab.config"),
    "evaluate_model": "vitlab.evaluation",
    **dict.fromkeys(["VisionTransformer", "ViTOutput", "create_model", "get_config", "list_models"], "vitlab.models"),
}


# the subpackages and modules reachable as attributes after a bare ``import vitlab`` (``vitlab.data.dataset_info``)
_SUBMODULES = ("api", "bench", "checkpoints", "config", "data", "evaluation", "explain", "interop", "loaded",
               "metrics", "models", "notebook", "plots", "server", "training")


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if name in _SUBMODULES:
        return import_module(f"vitlab.{name}")  # the import binds it here as well
    if name not in _LAZY:
        raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
