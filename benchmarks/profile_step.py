"""Where a training step spends its time: `torch.profiler` per operator, grouped, for given presets.

    PYTHONPATH=src python benchmarks/profile_step.py                      # the recipe presets and the seed tiny model
    PYTHONPATH=src python benchmarks/profile_step.py vit-cifar-hybrid:128 --precision fp32 --recipe cifar10-cpu

Each case is PRESET:BATCH. The step is the one `vitlab train` runs (`vitlab.bench.make_step`: the TrainStep of
the recipe's TrainConfig, or of the default one), on synthetic uint8 images already in memory. After --warmup
steps, --steps steps run under the profiler; the table gives each group's share of the summed self CPU time of
all operators (shares stay meaningful on a shared machine where absolute times do not), the top operators, and
the median step time. Then, for each case, the matmul ceiling: every linear layer's forward matmul shape
((batch x tokens) x in x out) timed alone, its FLOP/s against the square-matmul peak (`vitlab.bench.matmul_peak`,
2048 x 2048) of the same threads: a step cannot use more of the peak than its own matmuls do alone. Not run by CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import machine  # noqa: E402

from vitlab import create_model  # noqa: E402
from vitlab.bench import make_step, matmul_peak  # noqa: E402
from vitlab.config import TrainConfig, load_train_config  # noqa: E402

DEFAULT_CASES = {"vit-cifar-tiny-p4:256": None, "vit-mnist-hybrid:128": "mnist",
                 "vit-cifar-hybrid:128": "cifar10-cpu"}

# operator name (substring, first match wins) -> group
GROUPS = [
    ("convolution", "stem convolutions"), ("conv", "stem convolutions"), ("mkldnn_conv", "stem convolutions"),
    ("batch_norm", "BatchNorm"), ("native_batch_norm", "BatchNorm"),
    ("flash_attention", "attention kernel (SDPA)"), ("scaled_dot_product", "attention kernel (SDPA)"),
    ("_softmax", "softmax"), ("softmax", "softmax"),
    ("bmm", "attention matmuls (bmm)"), ("baddbmm", "attention matmuls (bmm)"),
    ("addmm", "linear matmuls"), ("::mm", "linear matmuls"), ("matmul", "linear matmuls"),
    ("layer_norm", "LayerNorm"), ("gelu", "GELU"), ("relu", "ReLU"), ("threshold_backward", "ReLU"),
    ("adamw", "optimizer"), ("_foreach", "optimizer / clipping (foreach)"),
    ("copy_", "copies and casts"), ("_to_copy", "copies and casts"), ("clone", "copies and casts"),
    ("contiguous", "copies and casts"),
    ("cross_entropy", "loss"), ("log_softmax", "loss"), ("nll_loss", "loss"),
    ("add", "elementwise (add, mul, ...)"), ("mul", "elementwise (add, mul, ...)"),
    ("div", "elementwise (add, mul, ...)"), ("sub", "elementwise (add, mul, ...)"),
    ("sum", "reductions"), ("mean", "reductions"), ("norm", "reductions"),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for key, group in GROUPS:
        if key in lowered:
            return group
    return "other"


def case_config(recipe: str | None, precision: str) -> TrainConfig:
    return TrainConfig(precision=precision) if recipe is None else load_train_config(recipe, precision=precision)


def profile_case(preset: str, batch: int, recipe: str | None, precision: str, warmup: int, steps: int):
    torch.manual_seed(0)
    model = create_model(preset)
    cfg = model.config
    config = case_config(recipe, precision)
    step = make_step(model, mode="train", precision=precision, device=torch.device("cpu"),
                     image_size=tuple(cfg.image_size), channels=cfg.in_channels, num_classes=cfg.num_classes,
                     config=config, generator=torch.Generator().manual_seed(0))
    images = torch.randint(0, 256, (batch, cfg.in_channels, *cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, cfg.num_classes, (batch,))
    for _ in range(warmup):
        step(images, labels)
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            step(images, labels)
            times.append(time.perf_counter() - t0)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return sorted(times)[len(times) // 2], {g: v / total for g, v in groups.items()}, \
        [(e.key, e.self_cpu_time_total / total) for e in top]


def matmul_ceiling(preset: str, batch: int, repeats: int = 5) -> list[tuple[str, float]]:
    """(shape, fraction of the square-matmul peak) of each distinct linear-layer matmul of ``preset`` at
    ``batch``, timed alone in fp32 (best of ``repeats``)."""
    model = create_model(preset)
    tokens = model.config.num_patches + model.config.num_prefix_tokens
    shapes = sorted({(batch * tokens, m.in_features, m.out_features) for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m.out_features > model.config.num_classes})
    peak = matmul_peak("cpu", "fp32")
    out = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(5):
                a @ b
            best = min(best, (time.perf_counter() - t0) / 5)
        out.append((f"{m}x{k}x{n}", 2 * m * k * n / best / peak))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="PRESET:BATCH (default: the recipe presets and the seed tiny model)")
    parser.add_argument("--recipe", default=None, help="the TrainConfig of this recipe for every case given")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {c: args.recipe for c in args.cases} if args.cases else DEFAULT_CASES
    print(f"machine: {machine()}; precision {args.precision}; {args.steps} profiled steps after {args.warmup}")
    for case, recipe in cases.items():
        preset, _, batch = case.partition(":")
        median, groups, top = profile_case(preset, int(batch or 128), recipe, args.precision, args.warmup,
                                           args.steps)
        print(f"\n{preset}, batch {batch}, TrainConfig of {recipe or 'the default'}: {median * 1e3:.0f} ms a step")
        print("| group | share |\n|---|---|")
        for group, share in sorted(groups.items(), key=lambda kv: -kv[1]):
            if share >= 0.005:
                print(f"| {group} | {share:.0%} |")
        print("top operators: " + ", ".join(f"{name} {share:.0%}" for name, share in top))
        print("matmul ceiling (each linear layer's forward matmul alone, of the fp32 square-matmul peak): " +
              ", ".join(f"{shape} {frac:.0%}" for shape, frac in matmul_ceiling(preset, int(batch or 128))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
