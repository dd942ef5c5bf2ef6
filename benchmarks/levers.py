"""Speed levers of the training step, side by side in one process: which ones make `vitlab train` faster here.

    PYTHONPATH=src python benchmarks/levers.py                              # the recipe presets and the tiny model
    PYTHONPATH=src python benchmarks/levers.py vit-cifar-hybrid:128 --precision fp32 --repeats 7
    PYTHONPATH=src python benchmarks/levers.py vit-cifar-hybrid:128 --precision bf16 --patch-dropout 0.25 \
        --levers channels_last "NCHW stem"            # cifar10-cpu-20min's model and precision

For each case PRESET:BATCH, the training step `vitlab train` runs (`vitlab.bench.make_step`, the default
TrainConfig) is built once per lever on the same initial weights, and the levers' steps are interleaved repeat by
repeat (`vitlab.bench.time_alternating`), so they share the machine's load; the table gives each lever's images/s
and its speed relative to the baseline (median over repeats of baseline step time / lever step time, per image).

Levers: `channels_last` (the whole model, weights too, in NHWC memory order, the oneDNN convolutions' preferred
layout; the images in NHWC as well), `NCHW stem` (the conv stem's input left in NCHW order: vitlab's conv stem
converts it to NHWC itself, `PatchEmbed.channels_last`, so this lever measures what that gives; the weights stay
contiguous either way),
`compile` (`torch.compile` of the model, inductor: fused elementwise kernels; compile time kept out),
`batch x2` (twice the images per step), `threads 1` (one intra-op thread instead of all), `patch_dropout 0.25`
and `0.5` (that fraction of the patch tokens left out in training; ViTConfig.patch_dropout). A lever that changes
what is computed (patch dropout, batch) must also be judged by accuracy at an equal time budget: see
docs/training.md. Not run by CI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import machine  # noqa: E402

from vitlab import create_model  # noqa: E402
from vitlab.bench import make_step, time_alternating  # noqa: E402
from vitlab.config import TrainConfig  # noqa: E402

DEFAULT_CASES = ["vit-cifar-tiny-p4:256", "vit-mnist-hybrid:128", "vit-cifar-hybrid:128"]
LEVERS = ["baseline", "channels_last", "NCHW stem", "compile", "batch x2", "threads 1", "patch_dropout 0.25",
          "patch_dropout 0.5"]


class _OneThread:
    """Wrap a step so it runs with one intra-op thread and puts the old count back."""

    def __init__(self, step):
        self.step = step

    def __call__(self, *args):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.step(*args)
        finally:
            torch.set_num_threads(old)


def lever_step(lever: str, preset: str, batch: int, precision: str, state: dict, patch_dropout: float | None = None):
    """(step, (images, labels), images per step) of ``lever`` on ``preset``'s model with weights ``state``
    (and ``patch_dropout``, where given, for every lever but the patch_dropout ones)."""
    overrides = {} if patch_dropout is None else {"patch_dropout": patch_dropout}
    if lever.startswith("patch_dropout"):
        overrides = {"patch_dropout": float(lever.split()[1])}
    model = create_model(preset, **overrides)
    model.load_state_dict(state)
    cfg = model.config
    n = 2 * batch if lever == "batch x2" else batch
    images = torch.randint(0, 256, (n, cfg.in_channels, *cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, cfg.num_classes, (n,))
    forward = None
    if lever == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    elif lever == "NCHW stem":
        model.patch_embed.channels_last = False
    elif lever == "compile":
        forward = torch.compile(model)
    step = make_step(model.train(), mode="train", precision=precision, device=torch.device("cpu"),
                     image_size=tuple(cfg.image_size), channels=cfg.in_channels, num_classes=cfg.num_classes,
                     config=TrainConfig(precision=precision), generator=torch.Generator().manual_seed(0),
                     forward=forward)
    return (_OneThread(step) if lever == "threads 1" else step), (images, labels), n


def run_case(preset: str, batch: int, precision: str, levers: list[str], repeats: int,
             patch_dropout: float | None = None) -> list[tuple]:
    torch.manual_seed(0)
    state = create_model(preset).state_dict()
    built = {lever: lever_step(lever, preset, batch, precision, state, patch_dropout) for lever in levers}
    times = time_alternating({k: v[0] for k, v in built.items()}, {k: v[1] for k, v in built.items()},
                             repeats=repeats, warmup=2)
    per_image = {k: [t / built[k][2] for t in ts] for k, ts in times.items()}
    base = per_image["baseline"]
    rows = []
    for lever in levers:
        ratio = statistics.median(b / t for b, t in zip(base, per_image[lever]))
        rows.append((lever, 1 / statistics.median(per_image[lever]), ratio))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES, help="PRESET:BATCH")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--levers", nargs="*", default=LEVERS, help=f"a subset of: {', '.join(LEVERS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patch-dropout", type=float, help="ViTConfig.patch_dropout of every lever's model "
                        "(default: the preset's), e.g. 0.25 as in cifar10-cpu-20min")
    args = parser.parse_args()
    levers = ["baseline"] + [lever for lever in args.levers if lever != "baseline"]
    print(f"machine: {machine()}; precision {args.precision}; {args.repeats} interleaved repeats"
          + ("" if args.patch_dropout is None else f"; patch_dropout {args.patch_dropout}"))
    for case in args.cases:
        preset, _, batch = case.partition(":")
        print(f"\n{preset}, batch {batch or 128}:\n| lever | images/s | x baseline |\n|---|---|---|")
        for lever, ips, ratio in run_case(preset, int(batch or 128), args.precision, levers, args.repeats,
                                          args.patch_dropout):
            print(f"| {lever} | {ips:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
