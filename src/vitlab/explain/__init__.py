"""See and use what a ViT learned: attention rollout and maps, figures, prediction on photos, run reports.

- :func:`attention_rollout`, :func:`last_layer_attention`: maps from the attention probabilities.
- :func:`compute_attention_maps`: run a model on images and get its maps; :func:`plot_attention`: one figure.
- :func:`predict`: top-k classes for image files and folders.
- :func:`write_report`: a self-contained HTML report of a training run.
"""

from vitlab.explain.attention import plot_attention
from vitlab.explain.maps import compute_attention_maps, upsample_maps
from vitlab.explain.predict import Prediction, predict
from vitlab.explain.report import write_report
from vitlab.explain.rollout import attention_rollout, fuse_heads, last_layer_attention, rollout_matrix

__all__ = ["attention_rollout", "last_layer_attention", "rollout_matrix", "fuse_heads", "compute_attention_maps",
           "upsample_maps", "plot_attention", "predict", "Prediction", "write_report"]
