"""AdamW parameter groups (no decay on norms, biases, position embeddings, class token; optional layer-wise
lr decay) and the learning-rate schedule: a linear warmup, then a cosine or (airbench's triangle) a straight line
down to ``min_lr``."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")  # timm's no_weight_decay()


def _layer_id(name: str, depth: int) -> int:
    """0 for the embedding, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "dist_token", "reg_token", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: 1-D tensors (norms, biases, layer scales), the position
    embedding and the class token get no weight decay. With ``layer_decay``, block ``i`` of ``depth`` trains at
    ``lr * layer_decay ** (depth + 1 - (i + 1))`` (BEiT-style fine-tuning); each group carries its ``lr_scale``."""
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or name in NO_DECAY_NAMES
        layer = _layer_id(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel where PyTorch has one for the parameters' device (CPU
    and CUDA), one kernel for the whole update (docs/performance.md measures it against the default)."""
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for g in groups:
        g.pop("names")
    device = next((p.device.type for g in groups for p in g["params"]), "cpu")
    if device in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # older PyTorch without a fused kernel for this device
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float,
          decay: str = "cosine") -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear from ``lr / warmup_steps`` up to ``lr`` over
    ``warmup_steps``, then down to ``min_lr`` at ``total_steps``: along a cosine, or along a straight line
    (``decay="linear"``: with the warmup, the triangle of airbench94)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / span, 1.0)
    if decay == "linear":
        return lr - (lr - min_lr) * t
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


class WarmupDecay:
    """The schedule of :func:`lr_at` as a small object whose whole state is ``{step, total_steps, warmup_steps}``
    (JSON), so a resumed run continues at exactly the same learning rate. A time limit may change
    ``total_steps`` mid-run (longer or shorter at any replan); the decay is then recomputed over the new total,
    so the learning rate steps a little at that point and still ends at ``min_lr``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, total_steps: int,
                 warmup_steps: int, decay: str = "cosine"):
        self.optimizer, self.lr, self.min_lr, self.decay = optimizer, lr, min_lr, decay
        self.total_steps, self.warmup_steps, self.step_count = total_steps, warmup_steps, 0
        self._apply()

    def current_lr(self) -> float:
        return lr_at(self.step_count, total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=self.lr,
                     min_lr=self.min_lr, decay=self.decay)

    def _apply(self) -> None:
        lr = self.current_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def resize(self, total_steps: int, warmup_steps: int) -> None:
        """Lay the schedule out over ``total_steps`` with ``warmup_steps`` of warmup, from the current step on."""
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self._apply()

    def step(self) -> None:
        """Advance one optimiser step and set the groups' learning rates for the next one."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self._apply()
