"""Adapting a pretrained ViT to a new task: new head, new image size, linear probe, layer-wise lr decay."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from vitlab.config import pair
from vitlab.models import VisionTransformer

log = logging.getLogger(__name__)


def prepare_finetune(model: VisionTransformer, *, num_classes: int | None = None,
                     labels: Sequence[str] | None = None, image_size: int | tuple[int, int] | None = None,
                     linear_probe: bool = False, reset_head: bool | None = None) -> VisionTransformer:
    """Make a pretrained ``model`` ready to fine-tune, in place (and return it).

    - ``image_size``: when it differs, the learned position embedding is resized bicubically on its patch grid
      (224 -> 384, or 224 -> 32 for CIFAR upsampled is also possible: the grid shrinks to 2x2).
    - ``num_classes`` / ``labels``: the head is replaced by a fresh one when the class count or the class names
      differ (``reset_head=True`` forces it, ``False`` keeps the pretrained head).
    - ``linear_probe``: every parameter but the head (and pre-logits layer) is frozen (``requires_grad=False``).
    """
    c = model.config
    if image_size is not None and pair(image_size, "image_size") != tuple(c.image_size):
        log.info("resizing the position embedding from %s to %s px", c.image_size, pair(image_size, "image_size"))
        model.resize_image_size(image_size)
    labels = list(labels) if labels is not None else None
    if num_classes is None and labels is not None:
        num_classes = len(labels)
    if reset_head is None:
        reset_head = num_classes is not None and (num_classes != c.num_classes
                                                 or (labels is not None and labels != c.labels))
    if reset_head:
        if num_classes is None:
            raise ValueError("reset_head=True needs num_classes or labels")
        log.info("new head: %d classes (the checkpoint had %d)", num_classes, c.num_classes)
        model.reset_classifier(num_classes, labels)
    for name, p in model.named_parameters():
        p.requires_grad_(not linear_probe or name.startswith(("head.", "pre_logits.")))
    return model


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, norm/head depth + 1."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(model: VisionTransformer, *, lr: float, weight_decay: float,
                             layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups with lr ``lr * layer_decay ** (depth + 1 - layer_id)`` (BEiT / MAE fine-tuning).

    Biases, norms, the class token and position embedding get no weight decay; frozen parameters are left
    out. Each group carries ``lr_scale`` so a scheduler can apply its factor on top.
    """
    depth = model.config.depth
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        lid = layer_id(name, depth)
        scale = layer_decay ** (depth + 1 - lid)
        group = groups.setdefault((lid, no_decay), {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                                                    "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]
