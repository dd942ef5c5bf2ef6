"""A dataset larger than memory: the fruit benchmark's size (85,000 training and 25,000 validation photos) at 224 px.

It writes a synthetic photo folder of that size (smooth JPEG "photos" about 256 px, 15 classes, on local disk
under ``--root``: never committed), then measures, each phase in a process of its own while this one samples
the anonymous resident memory (RssAnon, summed over the phase's process tree every 0.1 s; a memory map's file
pages are the page cache's and are not counted; Pss_Anon beside it counts a page that forked worker processes
share with their parent once, not once in each):

- build:  ``load_data(folder, image_size=224)`` with an empty cache: decode every photo into the memory-mapped
          cache (16.5 GB of pixels), images/s and images/s per core;
- read:   the data alone, from the page cache: a shuffled epoch of batches gathered by the prefetching loader
          (index + copy, into pinned memory where there is a GPU), images/s;
- train:  ``vit-s16`` at 224 px, the training step ``vitlab train`` runs, on batches from the map: img/s and the
          peak memory of training;
- side by side: the same steps alternating, in blocks, between the map and an in-memory copy of the first
          images (the gather's source is the only difference), and the ratio;
- wds:    the same folder packed into WebDataset shards (``vitlab data pack``): the index, the read rate (every
          image decoded again: a stream has no decode cache) and training from the stream.

    PYTHONPATH=src python benchmarks/data_scale.py --root /tmp/vitlab-scale [--train 85000 --val 25000]
        [--steps 200 --batch 16] [--phases generate,build,read,train,side,pack,wds_read,wds_train]
        [--src OTHER_CHECKOUT/src]   # measure another version (the same phases) for a baseline

Needs about 20 GB free under --root (1.6 GB of photos, 16.5 GB of cache, 1.6 GB of shards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLASSES = 15  # fruit and vegetables, say
SOURCE = [str(REPO / "src")]  # the vitlab the phases import (--src: another checkout's, to compare)


# ---------------------------------------------------------------- memory of a process tree
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _field_kib(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, Pss_Anon) summed over ``pid`` and its descendants. RssAnon counts a page that forked processes
    share (copy-on-write: the parent's torch, model and data structures) once in each of them; Pss_Anon divides
    it among them, so it is what the tree holds."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        rss += _field_kib(f"/proc/{p}/status", "RssAnon:")
        pss += _field_kib(f"/proc/{p}/smaps_rollup", "Pss_Anon:")
        todo += _children(p)
    return rss, pss


def run_phase(name: str, args: list[str]) -> dict:
    """Run ``data_scale.py --phase-worker NAME ...`` in a new process; return its JSON result with the peak
    anonymous memory of its process tree and its wall time."""
    env = {**os.environ, "PYTHONPATH": SOURCE[0]}
    proc = subprocess.Popen([sys.executable, __file__, "--phase-worker", name, *args], stdout=subprocess.PIPE,
                            env=env, text=True)
    peak = peak_pss = 0
    start = time.perf_counter()
    while proc.poll() is None:
        rss, pss = tree_memory_kib(proc.pid)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"phase {name} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_anon_mib=round(peak / 1024), peak_pss_anon_mib=round(peak_pss / 1024),
                  wall_s=round(time.perf_counter() - start, 1))
    return result


# ---------------------------------------------------------------- the phases (run in their own process)
def _photo(rng, label: int, side: int):
    """A smooth synthetic photo: a coloured gradient, a few blobs whose colour and count depend on the class."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    h, w = side, side + int(rng.integers(-side // 8, side // 8))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    tilt = rng.uniform(-0.4, 0.4, (2, 3))
    pixels = base + y[..., None] * tilt[0] + x[..., None] * tilt[1]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    hue = np.array([(label * 53) % 256, (label * 97 + 80) % 256, (label * 31 + 160) % 256])
    for _ in range(1 + label % 4):
        r = int(rng.integers(side // 10, side // 4))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        colour = tuple(int(v) for v in np.clip(hue + rng.normal(0, 20, 3), 0, 255))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def _write_photos(args: tuple) -> int:
    root, split, start, stop, side, seed = args
    import numpy as np

    rng = np.random.default_rng(seed * 1_000_003 + start)
    for i in range(start, stop):
        label = i % CLASSES
        folder = Path(root) / split / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        _photo(rng, label, side).save(folder / f"{i:06d}.jpg", quality=85)
    return stop - start


def phase_generate(o) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    photos = Path(o.root) / "photos"
    marker = photos / f".complete-{o.train}-{o.val}-{o.side}"
    if marker.exists():
        return {"generated": 0, "note": "already there"}
    tasks = [(str(photos), split, s, min(n, s + 1000), o.side, i)
             for i, (split, n) in enumerate((("train", o.train), ("val", o.val))) for s in range(0, n, 1000)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        done = sum(pool.map(_write_photos, tasks))
    marker.touch()
    size = sum(f.stat().st_size for f in photos.rglob("*.jpg"))
    return {"generated": done, "bytes": size}


def _load(o, spec=None, **kw):
    from vitlab.data import load_data

    return load_data(spec or f"folder:{Path(o.root) / 'photos'}", image_size=o.size, channels=3,
                     cache_dir=str(Path(o.root) / "cache"), **kw)


def phase_build(o) -> dict:
    import shutil

    shutil.rmtree(Path(o.root) / "cache", ignore_errors=True)
    start = time.perf_counter()
    data = _load(o, workers=o.workers)
    seconds = time.perf_counter() - start
    n = len(data.train) + len(data.test)
    cached = sum(f.stat().st_size for f in (Path(o.root) / "cache").rglob("*") if f.is_file())
    return {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 1),
            "images_per_s_per_core": round(n / seconds / o.workers, 1), "cache_bytes": cached}


def phase_read(o) -> dict:
    import torch

    data = _load(o)
    loader = data.train.loader(batch_size=256, shuffle=True, seed=0, drop_last=True,
                               device="cuda" if torch.cuda.is_available() else "cpu")
    batches = min(len(loader), o.read_batches)
    it = iter(loader)
    next(it)  # the thread is running
    start = time.perf_counter()
    checksum = 0
    for _ in range(batches - 1):
        images, _ = next(it)
        checksum += int(images[0, 0, 0, 0])
    seconds = time.perf_counter() - start
    it.close()
    return {"images": (batches - 1) * 256, "seconds": round(seconds, 2),
            "images_per_s": round((batches - 1) * 256 / seconds, 1)}


def _trainer(o, data):
    import torch

    from vitlab import create_model
    from vitlab.bench import make_step
    from vitlab._device import default_precision

    torch.manual_seed(0)
    model = create_model("vit-s16", num_classes=len(data.classes))
    device = torch.device("cpu")
    precision = default_precision(device)
    step = make_step(model, mode="train", precision=precision, device=device, image_size=(o.size, o.size),
                     channels=3, num_classes=len(data.classes), normalization=(data.mean, data.std),
                     generator=torch.Generator().manual_seed(0))
    return step, precision


def _timed_steps(step, batches, n: int) -> float:
    """Seconds for ``n`` steps on the batches (the loss read back at the end, so all the work is counted)."""
    start = time.perf_counter()
    loss = None
    for _ in range(n):
        images, labels = next(batches)
        loss = step(images, labels)
    float(loss)
    return time.perf_counter() - start


def phase_train(o) -> dict:
    data = _load(o, spec=o.spec)
    step, precision = _trainer(o, data)
    batches = iter(_forever(data.train, o.batch))
    _timed_steps(step, batches, 3)  # warm-up
    seconds = _timed_steps(step, batches, o.steps)
    return {"steps": o.steps, "batch": o.batch, "precision": precision,
            "images_per_s": round(o.steps * o.batch / seconds, 2)}


def _forever(dataset, batch):
    epoch = 0
    loader = dataset.loader(batch_size=batch, shuffle=True, seed=0, drop_last=True)
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def phase_side(o) -> dict:
    """Alternate blocks of steps between the map and an in-memory copy of the first images."""
    import torch

    from vitlab.data import ArrayDataset

    data = _load(o)
    first = torch.arange(min(len(data.train), o.ram_images))
    in_ram = ArrayDataset(data.train.take(first).clone(), data.train.labels[first], data.train.classes)
    mapped = data.train
    step, precision = _trainer(o, data)
    sources = {"map": iter(_forever(mapped, o.batch)), "ram": iter(_forever(in_ram, o.batch))}
    for it in sources.values():
        _timed_steps(step, it, 2)
    seconds = {"map": 0.0, "ram": 0.0}
    block = max(1, o.steps // 8)
    for _ in range(4):
        for name, it in sources.items():
            seconds[name] += _timed_steps(step, it, block)
    rate = {k: 4 * block * o.batch / v for k, v in seconds.items()}
    return {"steps_each": 4 * block, "batch": o.batch, "precision": precision, "ram_images": len(in_ram),
            "map_images_per_s": round(rate["map"], 2), "ram_images_per_s": round(rate["ram"], 2),
            "map_over_ram": round(rate["map"] / rate["ram"], 3)}


def phase_pack(o) -> dict:
    import shutil

    from vitlab.data.sources.wds import pack

    out = Path(o.root) / "shards"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    meta = pack(f"folder:{Path(o.root) / 'photos'}", out, shard_size=5000)
    seconds = time.perf_counter() - start
    index_start = time.perf_counter()
    data = _load(o, spec=f"wds:{out}")
    return {"pack_seconds": round(seconds, 1), "shards": len(meta["splits"]["train"]["shards"]),
            "load_and_index_seconds": round(time.perf_counter() - index_start, 1), "train": len(data.train)}


def phase_wds_read(o) -> dict:
    data = _load(o, spec=f"wds:{Path(o.root) / 'shards'}", workers=o.workers)
    loader = data.train.loader(batch_size=64, shuffle=True, seed=0, drop_last=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(o.wds_batches):
        images, _ = next(it)
        n += len(images)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
            "loader_processes": loader.processes()}


PHASES = {"generate": phase_generate, "build": phase_build, "read": phase_read, "train": phase_train,
          "side": phase_side, "pack": phase_pack, "wds_read": phase_wds_read, "wds_train": phase_train}


def cpu_line() -> str:
    model = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = " ".join(f for f in line.split(":", 1)[1].split()
                                 if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))
    except OSError:
        pass
    return f"{model or platform.processor()} ({os.cpu_count()} logical CPUs; {flags})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/vitlab-scale")
    p.add_argument("--train", type=int, default=85_000)
    p.add_argument("--val", type=int, default=25_000)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--read-batches", type=int, default=200)
    p.add_argument("--wds-batches", type=int, default=40)
    p.add_argument("--ram-images", type=int, default=6000)
    p.add_argument("--phases", default="generate,build,read,train,side,pack,wds_read,wds_train")
    p.add_argument("--src", default=None, help="the src/ folder of another vitlab checkout to measure (a baseline)")
    p.add_argument("--phase-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    o = p.parse_args()
    if o.phase_worker:
        print(json.dumps(PHASES[o.phase_worker](o)))
        return
    import torch

    if o.src:
        SOURCE[0] = str(Path(o.src).resolve())
    print(f"vitlab from {SOURCE[0]}")
    print(f"machine: {cpu_line()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"data: {o.train:,} train + {o.val:,} val synthetic JPEG photos (~{o.side} px) in {o.root}, read at "
          f"{o.size} px: {(o.train + o.val) * 3 * o.size * o.size / 1e9:.1f} GB of pixels")
    passed = ["--root", o.root, "--train", str(o.train), "--val", str(o.val), "--side", str(o.side), "--size",
              str(o.size), "--steps", str(o.steps), "--batch", str(o.batch), "--workers", str(o.workers),
              "--read-batches", str(o.read_batches), "--wds-batches", str(o.wds_batches), "--ram-images",
              str(o.ram_images)]
    results = {}
    for name in o.phases.split(","):
        # training from the stream: a quarter of the steps (its rate is the decode rate's or the model's)
        extra = ["--spec", f"wds:{Path(o.root) / 'shards'}", "--steps", str(max(1, o.steps // 4))] \
            if name == "wds_train" else []
        results[name] = run_phase(name, passed + extra)
        print(f"{name:<10} {json.dumps(results[name])}", flush=True)
    out = Path(o.root) / "results.json"
    out.write_text(json.dumps({"machine": cpu_line(), "results": results}, indent=1))
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
