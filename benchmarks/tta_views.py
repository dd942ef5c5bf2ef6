"""Which test-time views help a trained model: its test split scored under several view sets in one pass.

    PYTHONPATH=src python benchmarks/tta_views.py runs/accuracy-cifar10-cpu-.../last [more runs or checkpoints]

For each checkpoint (a run folder, or its ``last``/``best``), loads the test split its run used and prints the
top-1 accuracy with: the image alone; with its mirror image (``tta_hflip``); and with those moved 1 or 2 pixels
diagonally (``tta_shift``, airbench's weights: the moved views half). Each distinct view is run once and shared
between the sets. Scored in fp32 on the CPU (2 threads unless --threads). With --validation, scores the
held-out tenth of the training images instead (the split ``accuracy.py --validation`` trained beside), to choose a
view set without the test split. Not run by CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import machine, validation_split  # noqa: E402  (the CPU line every benchmark prints)


def view_sets(flip: bool) -> dict[str, dict]:
    from vitlab.evaluation import tta_views

    sets = {"image alone": tta_views(False, 0)}
    if flip:
        sets["mirror (tta_hflip)"] = tta_views(True, 0)
    for shift in (1, 2):
        sets[f"{'mirror + ' if flip else ''}moved {shift} px (tta_shift={shift})"] = tta_views(flip, shift)
    return sets


def main() -> int:
    import torch

    import vitlab
    from vitlab.evaluation import evaluate_views, load_like_run, run_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-flip", action="store_true", help="data whose mirror image is another class (digits)")
    parser.add_argument("--validation", action="store_true",
                        help="score the 10%% of the training images that accuracy.py --validation held out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.checkpoints:
        loaded = vitlab.load(path, device="cpu")
        splits = load_like_run(loaded, None, run_config(loaded), None, None)
        held_out, split = (validation_split(splits).val, "validation") if args.validation else (splits.test, "test")
        sets = view_sets(not args.no_flip)
        pre = loaded.preprocess
        t0 = time.perf_counter()
        results = evaluate_views(loaded.model, held_out, list(sets.values()), mean=pre.mean, std=pre.std,
                                 image_size=pre.image_size, batch_size=500, classes=loaded.labels)
        seconds = time.perf_counter() - t0
        print(f"{path}: {len(held_out)} {split} images, {seconds:.0f} s for "
              f"{len({v for s in sets.values() for v in s})} distinct views")
        for (name, views), result in zip(sets.items(), results):
            print(f"  {name:42s} {100 * result['top1']:6.2f}%  ({len(views)} views)")
    print(f"machine: {machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
