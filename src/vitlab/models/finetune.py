"""Adapting a pretrained ViT to a new task: new head, new image size, linear probe. Training calls it for
``TrainConfig.init``; in a notebook or a hand-written loop, call it yourself (layer-wise lr decay is
``vitlab.training.optim.param_groups(model, weight_decay=..., layer_decay=...)``)."""

from __future__ import annotations

import logging
from typing import Sequence

from vitlab.config import pair
from vitlab.models.vit import VisionTransformer

log = logging.getLogger(__name__)


def prepare_finetune(model: VisionTransformer, *, num_classes: int | None = None,
                     labels: Sequence[str] | None = None, image_size: int | tuple[int, int] | None = None,
                     linear_probe: bool = False, reset_head: bool | None = None,
                     keep_pre_logits: bool = False) -> VisionTransformer:
    """Make a pretrained ``model`` ready to fine-tune, in place (and return it).

    - ``image_size``: when it differs, the learned position embedding is resized bicubically on its patch grid
      (224 -> 384, or 224 -> 32 for CIFAR upsampled is also possible: the grid shrinks to 2x2).
    - ``num_classes`` / ``labels``: the head is replaced by a fresh one when the class count or the class names
      differ (``reset_head=True`` forces it, ``False`` keeps the pretrained head). As in the paper (section 3.2),
      the whole head goes: an ImageNet-21k checkpoint's pre-logits layer (Linear + tanh) is removed too, unless
      ``keep_pre_logits``.
    - ``linear_probe``: every parameter but the head is frozen (``requires_grad=False``), as ``TrainConfig``'s
      ``linear_probe`` does.
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
        model.reset_classifier(num_classes, labels, keep_pre_logits=keep_pre_logits)
    for name, p in model.named_parameters():
        p.requires_grad_(not linear_probe or name.startswith("head."))
    return model

