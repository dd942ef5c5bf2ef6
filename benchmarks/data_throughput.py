"""Throughput of the training input pipeline beside the training throughput of a small ViT, in one run.

For MNIST (IDX), CIFAR-10 (the JPEG folders of ../shared/data/cifar10-jpeg, unpacked once into the cache
folder, never into the repository) and the Fruits-360 folder, it measures in images/s:

- cold:  load_data with an empty decode cache (reading + decoding every file) + one epoch of batches
         through the training transform;
- warm:  load_data again (the decoded arrays come from the cache) + one epoch, as the next run would;
- epoch: the steady-state pipeline alone (cut batch by index + augment + normalise), data in memory,
         as every epoch after the first runs;
- train: the training step `vitlab train` runs (vitlab.bench.make_step: the same augmentation inside it, then
         forward, loss, backward, clipping, AdamW, the schedule) of the small ViT (vit-cifar-tiny-p4 at the
         dataset's size and channels), on the same batches.

It prints the ratio epoch/train: the goal is >= 10 for CIFAR-10, so the model is always the bottleneck.

    PYTHONPATH=src python benchmarks/data_throughput.py [--data-root ../shared/data] [--device cpu]
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from vitlab import TrainConfig, create_model
from vitlab.bench import make_step
from vitlab.data import BatchLoader, TrainTransform, load_data
from vitlab.data.transforms import Mixing
from vitlab.data.cache import default_cache_dir

REPO = Path(__file__).resolve().parent.parent

AUGMENT = {
    # crop + flip: the usual CIFAR recipe
    "basic": dict(crop_padding=4, hflip=True),
    # everything on: RandAugment, random erasing, Mixup/CutMix, label smoothing
    "full": dict(crop_padding=4, hflip=True, auto_augment="rand-m9-n2", random_erasing=0.25,
                 mixing=Mixing(mixup_alpha=0.8, cutmix_alpha=1.0), label_smoothing=0.1),
}


def unpack_cifar(data_root: Path) -> Path:
    """Unpack cifar10-jpeg.tar.gz once into the vitlab cache folder; return the folder holding train/, test/."""
    archive = data_root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    dest = default_cache_dir() / "bench" / "cifar10-jpeg"
    marker = dest / ".complete"
    if not marker.exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".cifar10-jpeg.", dir=dest.parent))
        with tarfile.open(archive) as tar:  # holds train/<class>/N.jpg and test/<class>/N.jpg
            tar.extractall(tmp, filter="data")
        tmp.replace(dest)  # appears complete or not at all
        marker.touch()
    return dest


def run_epoch(data, transform, batch_size, device, seed=0, max_batches=None) -> int:
    loader = BatchLoader(data.train, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    n = 0
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i == max_batches:
            break
        x, t = transform(images, labels, g)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def train_throughput(data, augment: dict, batch_size, device, steps) -> float:
    model = create_model("vit-cifar-tiny-p4", image_size=data.image_size, in_channels=data.channels,
                         num_classes=len(data.classes)).to(device).train()
    g = torch.Generator(device=device).manual_seed(0)
    step = make_step(model, mode="train", precision="fp32", device=device, image_size=data.image_size,
                     channels=data.channels, num_classes=len(data.classes), config=TrainConfig(**augment),
                     normalization=(data.mean, data.std), generator=g)
    loader = BatchLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=True, device=device)
    batches = []
    for images, labels in loader:
        batches.append((images, labels))
        if len(batches) == steps + 2:
            break

    for x, t in batches[:2]:  # warm-up
        step(x, t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, t in batches[2:]:
        step(x, t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def measure(name, spec, image_size, args, device):
    cache = Path(tempfile.mkdtemp(prefix="vitlab-bench-cache-"))
    try:
        kw = dict(image_size=image_size, cache_dir=str(cache), workers=args.workers)
        start = time.perf_counter()
        data = load_data(spec, **kw)
        load_cold = time.perf_counter() - start
        start = time.perf_counter()
        data = load_data(spec, **kw)
        load_warm = time.perf_counter() - start
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    n_train = len(data.train)
    rows = []
    for aug_name, aug in AUGMENT.items():
        tf = TrainTransform(mean=data.mean, std=data.std, image_size=data.image_size, num_classes=len(data.classes),
                            **aug)
        run_epoch(data, tf, args.batch_size, device, max_batches=5)  # warm-up (allocator, kernels)
        start = time.perf_counter()
        n = run_epoch(data, tf, args.batch_size, device, seed=1)
        epoch = time.perf_counter() - start
        train = train_throughput(data, aug, args.batch_size, device, args.steps)
        rows.append(dict(dataset=name, aug=aug_name, images=n_train, size=f"{data.image_size[0]}x{data.image_size[1]}",
                         cold=n_train / (load_cold + epoch), warm=n_train / (load_warm + epoch), epoch=n / epoch,
                         train=train, load_cold=load_cold, load_warm=load_warm))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per dataset")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(8, cores))")
    parser.add_argument("--datasets", default="mnist,cifar10,fruits")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data_root)
    device = torch.device(args.device)
    wanted = args.datasets.split(",")
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    rows = []
    if "mnist" in wanted:
        rows += measure("mnist", f"mnist:{root / 'mnist'}", None, args, device)
    if "cifar10" in wanted:
        rows += measure("cifar10-jpeg", f"folder:{unpack_cifar(root)}", (32, 32), args, device)
    if "fruits" in wanted:
        rows += measure("fruits360", f"folder:{root / 'fruits360-subset'}", (32, 32), args, device)
    print(f"{'dataset':<14}{'aug':<7}{'images':>8}{'size':>7}{'load cold s':>13}{'load warm s':>13}"
          f"{'cold img/s':>12}{'warm img/s':>12}{'epoch img/s':>13}{'train img/s':>13}{'epoch/train':>13}")
    for r in rows:
        print(f"{r['dataset']:<14}{r['aug']:<7}{r['images']:>8}{r['size']:>7}{r['load_cold']:>13.2f}"
              f"{r['load_warm']:>13.2f}{r['cold']:>12,.0f}{r['warm']:>12,.0f}{r['epoch']:>13,.0f}"
              f"{r['train']:>13,.0f}{r['epoch'] / r['train']:>12.1f}x")


if __name__ == "__main__":
    main()
