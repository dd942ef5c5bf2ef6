"""What the other ``vitlab`` commands run, in one place for the CLI: the presets' table, datasets, the image
cache, WebDataset packing, the benchmark, the server's limits and the progress bar."""

from __future__ import annotations

from typing import Any

import torch

from vitlab.bench import benchmark, format_result
from vitlab.checkpoints import BEST, CONFIG_JSON, CONFIG_YAML, CONFUSION, EVAL, LAST, PREPROCESS, WEIGHTS
from vitlab.data import dataset_info
from vitlab.data.cache import cache_files, clear_cache, default_cache_dir
from vitlab.data.download import download_dataset
from vitlab.data.specs import data_kinds_help
from vitlab.models import PRESETS, create_model, get_config
from vitlab.server import Limits
from vitlab.training.progress import ProgressBar


def model_table() -> list[dict[str, Any]]:
    """One row per preset: name, image size, patch, patch embedding, layers, hidden size, heads, parameters,
    GFLOPs per image, description (what ``vitlab models`` prints)."""
    rows = []
    for name, preset in PRESETS.items():
        cfg = get_config(name)
        with torch.device("meta"):  # counting ViT-H/14's parameters should not allocate 2.5 GB
            params = create_model(cfg).num_parameters()
        rows.append(dict(name=name, image_size=list(cfg.image_size), patch=list(cfg.patch_size),
                         patch_embed=cfg.patch_embed, layers=cfg.depth,
                         hidden=cfg.hidden_dim, heads=cfg.num_heads, params=params,
                         gflops=cfg.flops_per_image() / 1e9, description=preset.description))
    return rows


def pack(*args: Any, **kwargs: Any) -> dict:
    """:func:`vitlab.data.sources.wds.pack` (the ``webdataset`` extra loads when it is called)."""
    from vitlab.data.sources.wds import pack as write_shards

    return write_shards(*args, **kwargs)


__all__ = ["model_table", "pack", "benchmark", "format_result", "BEST", "LAST", "CONFIG_JSON", "CONFIG_YAML",
           "CONFUSION", "EVAL", "PREPROCESS", "WEIGHTS", "dataset_info", "cache_files",
           "clear_cache", "default_cache_dir", "download_dataset", "data_kinds_help", "Limits", "ProgressBar"]
