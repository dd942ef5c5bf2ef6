"""The Vision Transformer: patch embedding -> [class, distillation, register tokens] + positions -> encoder
blocks -> norm -> pool -> head.

One class for every variant; a :class:`~vitlab.config.ViTConfig` says which. Parameter names follow timm's
``vision_transformer`` layout (``patch_embed.proj``, ``dist_token``, ``reg_token``, ``norm_pre``,
``blocks.N.attn.qkv``, ``attn_pool``, ``head``, ``head_dist``), so its weights load with few changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlab.checkpoints import load_state_dict_strict, read_model_folder, write_model_folder
from vitlab.config import ViTConfig, check_num_heads, config_from_dict, pair, to_dict
from vitlab.models.block import Block
from vitlab.models.patch_embed import PatchEmbed, patch_weight
from vitlab.models.pool import AttentionPool
from vitlab.models.position import resize_grid_embedding, sincos_2d


def class_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in float32: the one place vitlab turns logits into class probabilities
    (prediction, attention maps, the server, evaluation's calibration bins)."""
    return (logits.float() / temperature).softmax(dim=-1)


@dataclass
class ViTOutput:
    """What ``forward`` returns when hidden states or attentions are asked for.

    ``hidden_states``: the embedding output and each block's output, ``depth + 1`` tensors ``(B, N, D)``
    (before the final norm, as Hugging Face returns them; register tokens included). ``attentions``: each
    block's ``(B, H, N, N)`` attention probabilities. ``pool_attention``: with ``pool="map"``, the probe's
    ``(B, H, 1, gh*gw)`` attention over the patch tokens; else None.
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    pool_attention: torch.Tensor | None = None


class VisionTransformer(nn.Module):
    """A ViT as in "An Image Is Worth 16x16 Words", with the common variants as config switches."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(in_channels=c.in_channels, hidden_dim=c.hidden_dim,
                                      patch_size=c.patch_size, style=c.patch_embed,
                                      extra_convs=c.stem_extra_convs, bias=c.patch_embed_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_dim)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.hidden_dim)) if c.distillation_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.register_tokens, c.hidden_dim)) if c.register_tokens else None
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_pos_prefix_tokens + c.num_patches, c.hidden_dim))
        elif c.pos_embed == "sincos":
            self._set_sincos_pos_embed()
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(c.dropout)
        self.norm_pre = nn.LayerNorm(c.hidden_dim, eps=c.norm_eps) if c.norm_before_blocks else nn.Identity()
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear schedule
        self.blocks = nn.ModuleList(
            Block(dim=c.hidden_dim, num_heads=c.num_heads, mlp_dim=c.mlp_dim, qkv_bias=c.qkv_bias,
                  dropout=c.dropout, attention_dropout=c.attention_dropout, drop_path=rate,
                  layer_scale=c.layer_scale, norm_eps=c.norm_eps, activation=c.mlp_activation,
                  locality=c.locality_attention)
            for rate in rates)
        self.norm = nn.LayerNorm(c.hidden_dim, eps=c.norm_eps) if c.final_norm else nn.Identity()
        self.attn_pool = (AttentionPool(dim=c.hidden_dim, num_heads=c.num_heads, mlp_dim=c.mlp_dim, norm_eps=c.norm_eps,
                                        activation=c.mlp_activation) if c.pool == "map" else None)
        self.projection = nn.Linear(c.hidden_dim, c.projection_dim, bias=False) if c.projection_dim else nn.Identity()
        if c.representation_dim:
            self.pre_logits = nn.Sequential(nn.Linear(c.hidden_dim, c.representation_dim), nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        self._build_heads()
        self.gradient_checkpointing = False
        self.reset_parameters()

    def _build_heads(self) -> None:
        """``head`` (and DeiT's ``head_dist``) for the config's classes: Identity without classes."""
        c = self.config
        head_in = c.representation_dim or c.projection_dim or c.hidden_dim
        self.head = nn.Linear(head_in, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if c.distillation_head:
            self.head_dist = nn.Linear(head_in, c.num_classes) if c.num_classes > 0 else nn.Identity()
        else:
            self.head_dist = None

    def _set_sincos_pos_embed(self, device: torch.device | str | None = None) -> None:
        # Fixed, so a non-persistent buffer (in no file); a prefix token's position is zero (MAE / MoCo v3).
        c = self.config
        pe = torch.cat((torch.zeros(c.num_pos_prefix_tokens, c.hidden_dim), sincos_2d(c.grid_size, c.hidden_dim)))
        self.register_buffer("pos_embed", pe[None].to(device), persistent=False)

    # ---------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02, cut at 2 std) for weights and embeddings; zero biases; unit norms."""

        def trunc(t: torch.Tensor) -> None:
            nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for token in (self.pos_embed, self.cls_token, self.dist_token, self.reg_token):
            if isinstance(token, nn.Parameter):
                trunc(token)
        if self.attn_pool is not None:  # timm's scale for the probe: std 1/sqrt(D)
            d = self.config.hidden_dim
            nn.init.trunc_normal_(self.attn_pool.latent, std=d**-0.5, a=-2 * d**-0.5, b=2 * d**-0.5)
        for blk in self.blocks:
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    nn.init.constant_(ls.gamma, self.config.layer_scale)

    # ---------------------------------------------------------------- forward
    def _pos_embed_for(self, grid: tuple[int, int], interpolate: bool) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        if tuple(grid) == tuple(self.config.grid_size):
            return self.pos_embed
        if not interpolate:
            raise ValueError(f"input gives a {grid[0]}x{grid[1]} patch grid but the model was built for "
                             f"{self.config.grid_size[0]}x{self.config.grid_size[1]} (image_size="
                             f"{self.config.image_size}); resize the images, call resize_image_size(), or pass "
                             "interpolate_pos_encoding=True")
        c = self.config
        if c.pos_embed == "sincos":
            pe = sincos_2d(grid, c.hidden_dim).to(self.pos_embed)
            return torch.cat((self.pos_embed[:, :c.num_pos_prefix_tokens], pe[None]), dim=1)
        return resize_grid_embedding(self.pos_embed, c.grid_size, grid, c.num_pos_prefix_tokens,
                                     antialias=c.pos_resize_antialias)

    def embed(self, x: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, N, D)`` with the prefix tokens (class, distillation,
        registers) and positions, after the pre-norm (CLIP's) if any: what the first block reads."""
        grid = (x.shape[-2] // self.config.patch_size[0], x.shape[-1] // self.config.patch_size[1])
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, gh*gw, D)
        pos = self._pos_embed_for(grid, interpolate_pos_encoding)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if self.config.pos_embed_patches_only:  # positions on the patches, then the prefix before them
            x = torch.cat(prefix + [x if pos is None else x + pos], dim=1)  # -> (B, prefix+gh*gw, D)
        else:
            x = torch.cat(prefix + [x], dim=1)  # -> (B, prefix+gh*gw, D)
            x = x if pos is None else x + pos
        return self.norm_pre(self.pos_drop(self._drop_patches(x)))

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Training with ``patch_dropout``: keep a random ``1 - patch_dropout`` of each image's patch tokens (at
        least one, in their order) and every prefix token. ``(B, prefix + N, D) -> (B, prefix + keep, D)``."""
        p = self.config.patch_dropout
        if not (self.training and p > 0):
            return x
        prefix = self.config.num_prefix_tokens
        n = x.shape[1] - prefix
        keep = max(1, round(n * (1 - p)))
        order = torch.rand(x.shape[0], n, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values
        patches = x[:, prefix:].gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat((x[:, :prefix], patches), dim=1)

    def pool(self, x: torch.Tensor, return_attention: bool = False):
        """Tokens ``(B, N, D)`` -> one vector per image ``(B, D)``: the class token, the mean of the patches, or
        the attention pool over the patches (with ``return_attention``, also its ``(B, H, 1, gh*gw)``
        probabilities, None for the other pools). Prefix tokens (registers too) never enter a mean or a pool."""
        probs = None
        if self.config.pool == "cls":
            x = x[:, 0]
        elif self.config.pool == "mean":
            x = x[:, self.config.num_prefix_tokens:].mean(dim=1)
        elif return_attention:
            x, probs = self.attn_pool(x[:, self.config.num_prefix_tokens:], return_attention=True)
        else:
            x = self.attn_pool(x[:, self.config.num_prefix_tokens:])
        return (x, probs) if return_attention else x

    def forward_features(self, x: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Images -> tokens after the encoder and final norm, ``(B, N, D)`` (before the norm when the config
        says ``norm_after_pool``: then :meth:`forward_head` applies it to the pooled vector)."""
        x = self.embed(x, interpolate_pos_encoding)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self._token_norm(x)

    def _token_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.config.norm_after_pool else self.norm(x)

    def forward_head(self, x: torch.Tensor, return_attention: bool = False, both_heads: bool = False):
        """Final-norm tokens ``(B, N, D)`` -> logits ``(B, num_classes)`` (no classes: the pooled, projected
        vector). With a distillation head, the mean of the class-token and distillation-token heads, as DeiT
        infers, or with ``both_heads`` the two apart (class head, distillation head), as DeiT trains them.
        ``return_attention``: also the attention pool's probabilities (see :meth:`pool`)."""
        pooled, probs = self.pool(x, return_attention=True) if return_attention else (self.pool(x), None)
        if self.config.norm_after_pool:
            pooled = self.norm(pooled)
        logits = self.head(self.pre_logits(self.projection(pooled)))
        if self.head_dist is not None:
            dist = self.head_dist(x[:, 1])  # x[:, 1]: the distillation token
            logits = (logits, dist) if both_heads else (logits + dist) / 2
        elif both_heads:
            raise ValueError("both_heads=True needs a distillation head (ViTConfig.distillation_head)")
        return (logits, probs) if return_attention else logits

    def forward(self, x: torch.Tensor, *, return_attentions: bool = False, return_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False, both_heads: bool = False):
        """Images ``(B, C, H, W)`` -> logits ``(B, num_classes)``.

        With ``return_attentions`` or ``return_hidden_states``, returns a :class:`ViTOutput` instead; asking
        for attentions takes the explicit attention path for every block. ``both_heads`` (a model with a
        distillation head): the tuple (class-token logits, distillation-token logits), what DeiT's training
        loss reads.
        """
        if both_heads:
            return self.forward_head(self.forward_features(x, interpolate_pos_encoding), both_heads=True)
        if not (return_attentions or return_hidden_states):
            return self.forward_head(self.forward_features(x, interpolate_pos_encoding))
        x = self.embed(x, interpolate_pos_encoding)
        hidden, attentions = [x], []
        for blk in self.blocks:
            if return_attentions:
                x, probs = blk(x, return_attention=True)
                attentions.append(probs)
            else:
                x = blk(x)
            hidden.append(x)
        logits, pool_attention = self.forward_head(self._token_norm(x), return_attention=return_attentions)
        return ViTOutput(logits=logits, hidden_states=tuple(hidden) if return_hidden_states else None,
                         attentions=tuple(attentions) if return_attentions else None, pool_attention=pool_attention)

    # ---------------------------------------------------------------- changes for fine-tuning
    def resize_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the input size in place: a learned position embedding is resized bicubically on its grid
        (prefix tokens' positions kept; antialiased when ``config.pos_resize_antialias``), a sin-cos one
        recomputed. For fine-tuning at another resolution."""
        new = self.config.replace(image_size=pair(image_size, "image_size"))
        if self.pos_embed is not None:
            pe = self._pos_embed_for(new.grid_size, interpolate=True)
            if isinstance(self.pos_embed, nn.Parameter):
                self.pos_embed = nn.Parameter(pe.detach().clone())
            else:
                self.register_buffer("pos_embed", pe.detach().clone(), persistent=False)
        self.config = new

    def reset_classifier(self, num_classes: int, labels: list[str] | None = None, *, keep_pre_logits: bool = True,
                         keep_projection: bool = False) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes.

        What served only the pretraining task goes with the old head, so the new head reads the pretrained
        features directly:

        - DeiT's distillation head: without a teacher it would learn what the class token's head learns
          (Hugging Face's ``DeiTForImageClassification`` fine-tunes so too). The distillation token stays, as
          part of the pretrained encoder.
        - CLIP's image-text projection (a linear map to 512 or 768 dimensions, kept with ``keep_projection``):
          timm's and Hugging Face's CLIP classifiers read the pooled vector, not its projection.
        - The in21k pre-logits layer (Linear + tanh) only with ``keep_pre_logits=False``, as the paper fine-tunes.
        """
        changes: dict = dict(num_classes=num_classes, labels=labels, distillation_head=False)
        if not keep_projection:
            changes["projection_dim"] = None
            self.projection = nn.Identity()
        if not keep_pre_logits:
            changes["representation_dim"] = None
            self.pre_logits = nn.Identity()
        self.config = self.config.replace(**changes)
        ref = next(self.parameters())
        self._build_heads()
        self.head.to(ref)
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(self.head.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.gradient_checkpointing = enabled

    def set_attention_impl(self, impl: str = "auto") -> None:
        """Pick the attention kernel of every block: "auto" (default), "sdpa" or "explicit" (same maths)."""
        from vitlab.models.attention import IMPLS

        if impl not in IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {', '.join(IMPLS)}")
        for blk in self.blocks:
            blk.attn.impl = impl
        if self.attn_pool is not None:
            self.attn_pool.impl = impl

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a model folder (the config and the weights; see :mod:`vitlab.checkpoints`) into ``directory``."""
        return write_model_folder(directory, to_dict(self.config), self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        **overrides: Any) -> "VisionTransformer":
        """Load a folder written by :meth:`save_pretrained`, or a run folder's ``best/`` (else ``last/``); no file
        is ever unpickled. The one reader of a vitlab model folder.

        ``overrides`` change :class:`~vitlab.config.ViTConfig` fields (``drop_path=0.1``, ``patch_embed="linear"``
        on a conv model); a ``num_heads`` other than the stored one is refused (the weights would load and compute
        something else)."""
        found = read_model_folder(path, map_location)
        if "num_heads" in found.config:
            check_num_heads(overrides, found.config["num_heads"], found.config_source, "num_heads")
        config = config_from_dict(ViTConfig, {**found.config, **overrides}, source=found.config_source)
        state = found.state
        if "patch_embed.proj.weight" in state:  # patch_embed='linear' on a conv model, or the reverse
            state["patch_embed.proj.weight"] = patch_weight(state["patch_embed.proj.weight"], config)
        return cls.from_state_dict(config, state, source=found.weights_source, device=map_location)

    @classmethod
    def from_state_dict(cls, config: ViTConfig, state: dict[str, torch.Tensor], source: str,
                        device: torch.device | str = "cpu") -> "VisionTransformer":
        """Build a model of ``config`` holding exactly ``state`` (loaded strictly, errors name ``source``).

        The random initialisation is skipped: the model is laid out on the meta device and given uninitialised
        memory that strict loading fills (initialising ViT-B/16 takes most of a load on a 2-core CPU).
        """
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        if config.pos_embed == "sincos":
            model._set_sincos_pos_embed(device)
        load_state_dict_strict(model, state, source=source)
        return model

