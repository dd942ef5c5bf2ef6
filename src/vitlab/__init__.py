"""vitlab: Vision Transformers that train well."""

from vitlab.config import ViTConfig
from vitlab.errors import CheckpointError, ConfigError, DataError, VitlabError
from vitlab.models import VisionTransformer, ViTOutput, create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = ["ViTConfig", "VisionTransformer", "ViTOutput", "create_model", "get_config", "list_models",
           "VitlabError", "ConfigError", "DataError", "CheckpointError", "__version__"]
