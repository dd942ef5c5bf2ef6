"""Single-image prediction latency on CPU: end to end (decode a JPEG, preprocess, forward, top-5) and the
forward pass alone, for the CIFAR tiny and the ViT-S/16 presets, measured side by side in one run.

    PYTHONPATH=src python benchmarks/predict_latency.py [--threads N] [--repeats 30] [--image PHOTO.jpg]

Weights are freshly initialised (latency does not depend on their values). The photo defaults to a fruit
photo from ../shared/data when present, else a generated 100x100 JPEG. Prints the median and the 10-90%
range of each, in milliseconds, and the ratios between them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlab import create_model
from vitlab._files import write_json
from vitlab import load
from vitlab.api import predict

PRESETS = ("vit-cifar-tiny-p4", "vit-s16")
SHARED_PHOTO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fruits360-subset" / "Test" / "apple"


def _photo(tmp: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    if SHARED_PHOTO.is_dir():
        found = sorted(SHARED_PHOTO.glob("*.jpg"))
        if found:
            return found[0]
    path = tmp / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _times(fns, repeats: int, warmup: int = 3) -> list[list[float]]:
    """Milliseconds per call of each function, the functions interleaved call by call so that a busy
    machine slows them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, out):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return out


def _summary(ms: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(ms, n=10)
    return statistics.median(ms), qs[0], qs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--image", help="a photo to predict (default: a fruit photo or a generated JPEG)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo = _photo(tmp, args.image)
        for name in PRESETS:
            model = create_model(name)
            ckpt = model.save_pretrained(tmp / name)
            c = model.config
            write_json(ckpt / "preprocess.json", {"mean": [0.5] * c.in_channels, "std": [0.25] * c.in_channels,
                                                  "image_size": list(c.image_size), "channels": c.in_channels})
            loaded = load(ckpt)
            x = torch.randn(1, c.in_channels, *c.image_size)

            def forward():
                with torch.inference_mode():
                    loaded.model(x)

            end_to_end, forward_only = _times([lambda: predict(loaded, [photo], top_k=5, batch_size=1), forward],
                                              args.repeats)
            rows.append((name, c.image_size, model.num_parameters(), _summary(end_to_end), _summary(forward_only)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, photo {photo.name}, "
          f"{args.repeats} repeats, batch 1")
    print(f"{'model':<20}{'input':>6}{'params':>12}  {'predict ms, median (p10-p90)':<30}"
          f"{'forward ms, median (p10-p90)':<30}{'forward share':>13}")
    for name, size, params, e2e, fwd in rows:
        print(f"{name:<20}{size[0]:>6}{params:>12,}  {f'{e2e[0]:.2f} ({e2e[1]:.2f}-{e2e[2]:.2f})':<30}"
              f"{f'{fwd[0]:.2f} ({fwd[1]:.2f}-{fwd[2]:.2f})':<30}{fwd[0] / e2e[0]:>13.0%}")
    (a, *_, ea, fa), (b, *_, eb, fb) = rows[0], rows[1]
    print(f"ratio {b} / {a}: predict {eb[0] / ea[0]:.1f}x, forward {fb[0] / fa[0]:.1f}x")


if __name__ == "__main__":
    main()
