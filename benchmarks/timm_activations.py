"""Print the table of timm ViTs whose MLP is not exact GELU (``vitlab.interop.timm.TIMM_ACTIVATIONS``).

A timm state dict does not store the MLP's activation (it has no parameters), so vitlab reads it from the
architecture's name: a timm hub folder's ``config.json`` names it, and a file is often named after it. This
builds every model of timm's ``vision_transformer`` module on the meta device (no memory, no download) and
prints the ones whose ``blocks[0].mlp.act`` is QuickGELU or tanh GELU, as the Python the table is. Run it in a
venv with timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``, then ``pip install --no-deps -e .``):

    python benchmarks/timm_activations.py
"""

from __future__ import annotations

import collections
import warnings


def activations() -> dict[str, str]:
    """timm model name -> the activation's class name (``GELUTanh`` for ``nn.GELU(approximate="tanh")``)."""
    import timm
    import torch

    found = {}
    for name in timm.list_models(module="vision_transformer"):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception as e:  # noqa: BLE001  (a model timm cannot build without its weights: say so)
            print(f"# skipped {name}: {type(e).__name__}")
            continue
        act = getattr(getattr(next(iter(getattr(model, "blocks", [])), None), "mlp", None), "act", None)
        kind = type(act).__name__
        found[name] = "GELUTanh" if kind == "GELU" and getattr(act, "approximate", "none") == "tanh" else kind
    return found


def main() -> None:
    import timm

    found = activations()
    print(f"# timm {timm.__version__}: {len(found)} models, {dict(collections.Counter(found.values()))}")
    ours = {"QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh"}
    for kind, name in ours.items():
        print(f"{name}: {sorted(m for m, k in found.items() if k == kind)}")


if __name__ == "__main__":
    main()
