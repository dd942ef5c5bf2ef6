"""vitlab: Vision Transformers that train well."""

from vitlab.config import ViTConfig
from vitlab.errors import CheckpointError, ConfigError, DataError, VitlabError
from vitlab.models import VisionTransformer, ViTOutput, create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = ["ViTConfig", "VisionTransformer", "ViTOutput", "create_model", "get_config", "list_models",
           "VitlabError", "ConfigError", "DataError", "CheckpointError", "__version__"]

import vitlab.train as train  # noqa: E402  (callable: vitlab.train(config); see vitlab/train/__init__.py)
from vitlab.api import evaluate, list_recipes, plot_run  # noqa: E402
from vitlab.config import TrainConfig  # noqa: E402

__all__ += ["train", "evaluate", "plot_run", "list_recipes", "TrainConfig"]
