"""Measure a recipe's test accuracy and wall time on the real datasets in ../shared/data.

    PYTHONPATH=src python benchmarks/accuracy.py fruits
    PYTHONPATH=src python benchmarks/accuracy.py mnist --set time_limit_minutes=10
    PYTHONPATH=src python benchmarks/accuracy.py cifar10-cpu --data-root /path/to/shared/data
    PYTHONPATH=src python benchmarks/accuracy.py cifar10-cpu --set precision=fp32 --target 80 85 --at 20 60
    PYTHONPATH=src python benchmarks/accuracy.py cifar10-cpu --validation --set threads=1   # choosing a setting

Runs `vitlab.train` with the recipe, its data spec replaced by the copy under --data-root (CIFAR-10's
JPEG tarball is unpacked once into --cache-dir and read as an image folder), then prints the test accuracy per
epoch with the wall time, the final and best accuracy, the accuracy reached by given minutes (--at), the
minutes it took to first reach given accuracies (--target: time to accuracy), and the machine with its CPU's
matmul flags. Accuracies within a run come from its evaluations (every ``eval_every`` epochs, the first and the
last), so "reached by" is the last evaluation before that minute and "minutes to" the first evaluation at or
above the target. With --validation the run trains on 90% of the training images and is scored on the other
10% (seeded and stratified: vitlab.data.with_val_split), never on the test split: for comparing settings, so
that the test split is used only for the figures of the setting chosen. Not run by CI.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data"


def _unpack_cifar(root: Path, cache_dir: Path) -> Path:
    tarball = root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    dest = cache_dir / "cifar10-jpeg"
    if not (dest / ".complete").is_file():
        if not tarball.is_file():
            sys.exit(f"accuracy.py: {tarball} not found; pass --data-root")
        tmp = cache_dir / f".cifar10-jpeg.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".complete").write_text("ok\n")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        tmp.rename(dest)
    return dest


def data_spec(recipe: str, root: Path, cache_dir: Path) -> str:
    """The data spec of ``recipe`` on the shared copy of its dataset."""
    if recipe.startswith("mnist"):
        return f"mnist:{root / 'mnist'}"
    if recipe.startswith(("cifar10", "tintn-cifar10")):
        return f"folder:{_unpack_cifar(root, cache_dir)}"
    if recipe.startswith("fruits"):
        return f"folder:{root / 'fruits360-subset'}"
    if recipe.startswith("digits"):
        return "digits"
    sys.exit(f"accuracy.py: no shared dataset known for recipe {recipe!r}")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads{gpu}")


def cpu_flags() -> str:
    """The CPU's matmul-relevant flags (bf16 speed depends on them): e.g. ``avx2 avx512f avx512_bf16 amx_bf16``,
    or ``avx2, no AVX-512``."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "flags unknown"
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join(wanted) + ("" if "avx512f" in flags else ", no AVX-512")


def validation_split(splits):
    """``splits``' held-out tenth of the training images (seeded, stratified), the split ``--validation`` scores
    (tta_views.py --validation scores the same images)."""
    from vitlab.data import with_val_split

    return with_val_split(splits, 0.1, seed=0)


def time_to_accuracy(history: list[dict], targets: list[float], ats: list[float], wall_time: float) -> list[str]:
    """Lines "by M min: A%" (the last evaluation finished by minute M) and "to T%: M min" (the first evaluation at
    or above T percent), from a run's history rows (``epoch``, ``wall_time`` in seconds, ``top1`` in [0, 1] or
    None where the epoch was not evaluated)."""
    scored = [r for r in history if r["top1"] is not None]
    lines = []
    for minutes in ats:
        done = [r for r in scored if r["wall_time"] <= minutes * 60]
        if done and minutes * 60 < wall_time + 1:
            where = "the last epoch" if done[-1] is history[-1] else "mid-schedule"
            lines.append(f"by {minutes:g} min: {100 * done[-1]['top1']:.2f}% (epoch {done[-1]['epoch']}, {where})")
    for target in targets:
        hit = next((r for r in scored if 100 * r["top1"] >= target), None)
        lines.append(f"to {target:g}%: {hit['wall_time'] / 60:.2f} min (epoch {hit['epoch']})" if hit else
                     f"to {target:g}%: not reached in {wall_time / 60:.2f} min")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe name or YAML file")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vitlab")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="run folder (default runs/accuracy-<recipe>-<time>)")
    parser.add_argument("--at", type=float, nargs="*", default=[5, 10, 20, 60],
                        help="also report the accuracy of the last epoch finished by these minutes")
    parser.add_argument("--target", type=float, nargs="*", default=[],
                        help="also report the minutes to the first evaluation at or above these accuracies (%%)")
    parser.add_argument("--validation", action="store_true",
                        help="train on 90%% of the training images and score the other 10%%, not the test split")
    args = parser.parse_args()

    import vitlab
    from vitlab.config import load_train_config
    from vitlab.training.progress import ProgressBar

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name = Path(args.recipe).stem
    spec = data_spec(name, args.data_root.resolve(), args.cache_dir)
    out = args.out or f"runs/accuracy-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_train_config(args.recipe, args.set, data=spec, out=out)
    t0 = time.perf_counter()
    data, split = None, "validation" if args.validation else "test"
    if args.validation:  # the held-out tenth of the training images stands where the test split was
        from dataclasses import replace

        from vitlab.data import load_data
        from vitlab.training.engine import input_spec

        image_size, channels = input_spec(config)  # as the run would load it
        splits = validation_split(load_data(spec, image_size=image_size, channels=channels,
                                            cache_dir=config.cache_dir, val_fraction=config.val_fraction,
                                            seed=config.seed))
        data = replace(splits, test=splits.val, val=None, spec=f"{spec} (validation: 10% of train)")
    result = vitlab.train(config, data=data, progress=ProgressBar(sys.stdout))
    total = time.perf_counter() - t0

    print(f"\nrecipe {name}: {config.model} on {data.spec if data is not None else spec}")
    loss_column = "val loss" if args.validation else "test loss"
    print(f"{'epoch':>5} {'minutes':>8} {'train loss':>11} {loss_column:>10} {'top-1':>8}")
    for row in result.history:
        if row["top1"] is not None:
            print(f"{row['epoch']:>5} {row['wall_time'] / 60:>8.2f} {row['train_loss']:>11.4f} "
                  f"{row['test_loss']:>10.4f} {100 * row['top1']:>7.2f}%")
    for line in time_to_accuracy(result.history, args.target, args.at, result.wall_time):
        print(line)
    print(f"final {split} accuracy: {100 * result.top1:.2f}%  best: {100 * result.best_top1:.2f}% (epoch "
          f"{result.best_epoch})  epochs: {len(result.history)}  stopped: {result.stopped}")
    if config.tta_shift and result.history[-1]["top1"] is not None:  # the curve's views: no moved ones
        print(f"final {split} accuracy without the moved views of tta_shift: {100 * result.history[-1]['top1']:.2f}%")
    if (config.tta_hflip or config.tta_shift) and not args.validation:  # the final model on the images alone
        plain = vitlab.evaluate(result.run_dir / "last", spec, tta_hflip=False, tta_shift=0,
                                cache_dir=config.cache_dir)
        print(f"final test accuracy on the images alone (no test-time augmentation): {100 * plain['top1']:.2f}%")
    print(f"training wall time: {result.wall_time / 60:.2f} min (with data loading: {total / 60:.2f} min)")
    print(f"machine: {machine()}")
    print(f"command: PYTHONPATH=src python benchmarks/accuracy.py {' '.join(sys.argv[1:])}")
    print(f"run folder: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
