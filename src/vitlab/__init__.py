"""vitlab: Vision Transformers that train well."""

from vitlab._version import __version__
from vitlab.api import LoadedModel, calibrate, evaluate, list_recipes, load, plot_run, train
from vitlab.config import TrainConfig, ViTConfig
from vitlab.errors import CheckpointError, ConfigError, DataError, VitlabError
from vitlab.evaluation import evaluate_model
from vitlab.models import VisionTransformer, ViTOutput, create_model, get_config, list_models
from vitlab.server import serve

__all__ = ["ViTConfig", "TrainConfig", "VisionTransformer", "ViTOutput", "create_model", "get_config", "list_models",
           "train", "evaluate", "evaluate_model", "load", "LoadedModel", "plot_run", "list_recipes", "VitlabError",
           "ConfigError", "DataError", "CheckpointError", "serve", "calibrate", "__version__"]
