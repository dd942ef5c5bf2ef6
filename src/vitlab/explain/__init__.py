"""See and use what a ViT learned: attention rollout and maps, figures, prediction on photos, run reports."""

from vitlab.explain.rollout import attention_rollout, fuse_heads, last_layer_attention, rollout_matrix

__all__ = ["attention_rollout", "last_layer_attention", "rollout_matrix", "fuse_heads"]
