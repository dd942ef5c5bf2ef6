"""Every pretrained family vitlab reads, built by the real peers, saved as their users save it, loaded by vitlab.

For each model: ``timm.create_model(name, pretrained=False)`` (or a ``torchvision.models.vit_*``, or a
``transformers`` model from its config), every parameter perturbed so that biases, norms, tokens and layer scales
are not at their initial values, saved as its users save it (timm: ``.safetensors`` and a ``.pth`` state dict;
torchvision: ``.pth``; transformers: ``save_pretrained``), loaded with ``vitlab.interop.load_pretrained`` (format
detected), and run on the same random images. One row per model and format: the max absolute difference of the
logits (pooled features or image embeddings for a model without a classifier), then ``N passed, M failed``. A
row passes at <= 1e-4 (float32; the peers' fused attention kernels differ from vitlab's in the last bits).
Rows marked "refused" check that a family vitlab cannot express stops with one line naming it.

Outside CI: timm needs torchvision, which does not import beside the CPU build of torch 2.13 that the README
installs. On the dev machine a second virtual environment holds torch 2.14.1 (a CUDA build that runs on the CPU),
torchvision 0.29.1, timm and transformers:

    PYTHONPATH=src /work/peer-venv/bin/python benchmarks/peer_parity.py            # every row (~4 min, 2 cores)
    PYTHONPATH=src /work/peer-venv/bin/python benchmarks/peer_parity.py --only dinov2
"""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from vitlab.errors import CheckpointError, ConfigError
from vitlab.interop import detect_format, load_pretrained

TOLERANCE = 1e-4


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter, in eval mode: a converter that drops or swaps a bias, norm, token or layer
    scale then changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def images(size: tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------------------- the models

# (timm name, create_model kwargs, vitlab load_pretrained overrides the file cannot carry)
TIMM = [
    ("vit_tiny_patch16_224", {}, {}),
    ("deit_tiny_distilled_patch16_224", {}, {}),
    ("deit3_small_patch16_224", {}, {}),
    ("vit_tiny_patch16_224", dict(no_embed_class=True), {}),
    ("vit_tiny_patch16_224", dict(reg_tokens=4), {}),
    ("vit_tiny_patch16_224", dict(global_pool="map"), {}),
    ("vit_small_patch14_dinov2", {}, {}),
    ("vit_small_patch14_reg4_dinov2", {}, {}),
    ("vit_base_patch16_clip_224", {}, {}),
    ("vit_base_patch16_clip_quickgelu_224", {}, {}),  # QuickGELU: read from the file's name (timm's table)
    ("vit_base_patch16_siglip_224", {}, {}),
    ("vit_base_patch32_siglip_256", {}, {}),  # tanh GELU, likewise
]
# timm models of families vitlab cannot express (name, create_model kwargs, what the refusal must name)
TIMM_REFUSED = [("beit_base_patch16_224", {}, "BEiT"), ("eva02_tiny_patch14_224", {}, "EVA"),
                ("vit_small_patch14_dinov2", "swiglu", "SwiGLU")]  # DINOv2 giant's packed SwiGLU MLP, at size S


def timm_rows(tmp: Path, only: str | None):
    import timm

    for name, kwargs, overrides in TIMM:
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
        if only and only not in label:
            continue
        peer = perturb(timm.create_model(name, pretrained=False, **kwargs), seed=len(label))
        x = images(peer.patch_embed.img_size)
        with torch.no_grad():
            ref = peer(x)
        for suffix in (".safetensors", ".pth"):
            path = save_state_dict(peer, tmp / f"{name}{suffix}")
            yield compare("timm", label, suffix, path, ref, x, overrides)
        if not kwargs:  # timm's hub folder (config.json naming the architecture), as hf_hub:timm/... downloads are
            from timm.models._hub import save_for_hf

            save_for_hf(peer, tmp / f"{name}-hub", safe_serialization=True)
            yield compare("timm", label, "hub folder", tmp / f"{name}-hub", ref, x, overrides)
        if "dinov2" in name:  # the 37x37 grid resized to 224 px, as timm's set_input_size does it
            peer.set_input_size(img_size=(224, 224))
            x224 = images((224, 224))
            with torch.no_grad():
                ref224 = peer(x224)
            model = load_pretrained(tmp / f"{name}.safetensors", **overrides)
            model.resize_image_size(224)
            yield row("timm", label, "resized 518->224 px", ref224, model, x224)
    for name, kwargs, family in TIMM_REFUSED:
        if only and only not in name:
            continue
        if kwargs == "swiglu":
            from timm.layers import SwiGLUPacked

            kwargs = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.66667 * 2)
        path = save_state_dict(timm.create_model(name, pretrained=False, **kwargs), tmp / f"{name}.safetensors")
        yield refused("timm", name + (" (SwiGLU MLP)" if family == "SwiGLU" else ""), ".safetensors", path, family)


def torchvision_rows(tmp: Path, only: str | None):
    import torchvision

    for name in ("vit_b_16", "vit_b_32"):
        if only and only not in name:
            continue
        peer = perturb(getattr(torchvision.models, name)(weights=None), seed=7)
        x = images((224, 224))
        with torch.no_grad():
            ref = peer(x)
        path = save_state_dict(peer, tmp / f"{name}.pth")
        yield compare("torchvision", name, ".pth", path, ref, x, {})


def hf_models():
    """(label, model, output to compare, image size): real architectures of each family, from configs."""
    import transformers as T

    vit = T.ViTConfig(num_labels=10)  # google/vit-base-patch16-224's shape
    deit = T.DeiTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768, num_labels=1000)
    dinov2 = T.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518)  # facebook/dinov2-small
    dinov2_reg = T.Dinov2WithRegistersConfig(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14,
                                             num_register_tokens=4)
    clip = T.CLIPVisionConfig(patch_size=32, projection_dim=512)  # openai/clip-vit-base-patch32's image tower
    siglip = T.SiglipVisionConfig()  # google/siglip-base-patch16-224's image tower
    eager = dict(attn_implementation="eager")
    return [
        ("ViTForImageClassification", T.ViTForImageClassification._from_config(vit, **eager), "logits", 224),
        ("DeiTForImageClassificationWithTeacher (deit-tiny-distilled)",
         T.DeiTForImageClassificationWithTeacher._from_config(deit, **eager), "logits", 224),
        ("Dinov2Model (dinov2-small)", T.Dinov2Model._from_config(dinov2, **eager), "pooler_output", 518),
        ("Dinov2WithRegistersModel (small, 4 registers)",
         T.Dinov2WithRegistersModel._from_config(dinov2_reg, **eager), "pooler_output", 518),
        ("CLIPVisionModelWithProjection (B/32)", T.CLIPVisionModelWithProjection._from_config(clip, **eager),
         "image_embeds", 224),
        ("SiglipVisionModel (B/16)", T.SiglipVisionModel._from_config(siglip, **eager), "pooler_output", 224),
        ("CLIPModel (B/32, text tower too)", T.CLIPModel._from_config(T.CLIPConfig(vision_config=clip.to_dict()),
                                                                        **eager), "image_embeds", 224),
    ]


def hf_refused_rows(tmp: Path, only: str | None):
    import transformers as T

    for label, model, family in [("BeitModel", T.BeitModel(T.BeitConfig(num_hidden_layers=2)), "BEiT")]:
        if only and only.lower() not in label.lower():
            continue
        model.save_pretrained(tmp / label)
        yield refused("transformers", label, "save_pretrained", tmp / label, family)


def hf_rows(tmp: Path, only: str | None):
    for i, (label, peer, output, size) in enumerate(hf_models()):
        if only and only.lower() not in label.lower():
            continue
        perturb(peer, seed=100 + i)
        x = images((size, size))
        with torch.no_grad():
            ref = getattr(peer.get_image_features(pixel_values=x) if label.startswith("CLIPModel")
                          else peer(pixel_values=x), "pooler_output" if label.startswith("CLIPModel") else output)
        folder = tmp / f"hf{i}"
        peer.save_pretrained(folder)
        yield compare("transformers", label, "save_pretrained", folder, ref, x, {})
        if label.startswith("Dinov2"):  # interpolate_pos_encoding at 224 px against vitlab's resize
            x224 = images((224, 224))
            with torch.no_grad():
                ref224 = getattr(peer(pixel_values=x224), output)
            model = load_pretrained(folder)
            model.resize_image_size(224)
            yield row("transformers", label, "resized 518->224 px", ref224, model, x224)


# ---------------------------------------------------------------------------- rows

def row(peer: str, model: str, fmt: str, ref: torch.Tensor, ours, x: torch.Tensor) -> dict:
    """Run ``ours`` on ``x`` and compare with the peer's ``ref``."""
    with torch.no_grad():
        out = ours(x)
    diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
    return dict(peer=peer, model=model, format=fmt, result=f"{diff:.2e}", passed=diff <= TOLERANCE)


def compare(peer: str, model: str, fmt: str, path: Path, ref: torch.Tensor, x: torch.Tensor, overrides) -> dict:
    try:
        fmt_detected = detect_format(path)
        ours = load_pretrained(path, **overrides)
    except (CheckpointError, ConfigError) as e:
        return dict(peer=peer, model=model, format=fmt, result=f"ERROR {e}", passed=False)
    out = row(peer, model, f"{fmt} ({fmt_detected})", ref, ours, x)
    return out


def refused(peer: str, model: str, fmt: str, path: Path, family: str) -> dict:
    try:
        load_pretrained(path)
    except CheckpointError as e:
        message = str(e).removeprefix(str(path) + ": ")
        return dict(peer=peer, model=model, format=fmt, result=f"refused: {message}",
                    passed=family in message and "\n" not in message)
    return dict(peer=peer, model=model, format=fmt, result="loaded, but vitlab cannot express it", passed=False)


def machine() -> str:
    import timm
    import transformers

    name = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "avx512_bf16 yes" if "avx512_bf16" in flags else "avx512_bf16 no"
    return (f"{name} ({bf16}), {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}, "
            f"transformers {transformers.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the rows whose model name contains this text")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # vitlab's CLIP activation hint is expected here
    import transformers

    transformers.logging.set_verbosity_error()
    print(machine())
    torch.manual_seed(0)  # the peers' own initialisation too, so that a rerun prints the same numbers
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in (timm_rows, torchvision_rows, hf_rows, hf_refused_rows):
            for r in source(Path(tmp), args.only):
                rows.append(r)
                print(f"| {r['peer']} | {r['model']} | {r['format']} | {r['result']} | "
                      f"{'pass' if r['passed'] else 'FAIL'} |", flush=True)
    passed = sum(r["passed"] for r in rows)
    print(f"{passed} passed, {len(rows) - passed} failed (max abs difference <= {TOLERANCE:g}; "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
