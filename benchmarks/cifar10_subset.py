"""Make a small CIFAR-10 image folder (``train/<class>/``, ``test/<class>/``) from the unpacked
``cifar10-jpeg.tar.gz`` of ../shared/data: the first N training and M test files of every class, by name.

    mkdir -p /tmp/cifar10-jpeg && tar xzf ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    python benchmarks/cifar10_subset.py /tmp/cifar10-jpeg /tmp/cifar10-1k --train 1000 --test 250

docs/calibration.md trains on the folder this writes (a run that overfits in about ten minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the unpacked cifar10-jpeg folder (train/ and test/ inside)")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--train", type=int, default=1000, help="training images per class")
    parser.add_argument("--test", type=int, default=250, help="test images per class")
    args = parser.parse_args()
    for split, per_class in (("train", args.train), ("test", args.test)):
        classes = sorted(p for p in (args.source / split).iterdir() if p.is_dir())
        if not classes:
            raise SystemExit(f"{args.source / split}: no class folders; unpack cifar10-jpeg.tar.gz there first")
        for folder in classes:
            target = args.out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for file in sorted(folder.glob("*.jpg"))[:per_class]:
                shutil.copyfile(file, target / file.name)
        print(f"{split}: {len(classes)} classes x {per_class} images -> {args.out / split}")


if __name__ == "__main__":
    main()
