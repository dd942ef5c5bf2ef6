"""The network and nothing else: no data, no training, no printing."""

from vitlab.models.registry import PRESETS, create_model, get_config, list_models
from vitlab.checkpoints import load_state_dict_strict
from vitlab.models.patch_embed import patch_weight
from vitlab.models.vit import ViTOutput, VisionTransformer, class_probabilities

__all__ = ["VisionTransformer", "ViTOutput", "class_probabilities", "create_model", "get_config", "list_models",
           "PRESETS", "load_state_dict_strict", "patch_weight"]
