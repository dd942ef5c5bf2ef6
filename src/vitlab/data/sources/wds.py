"""WebDataset tar shards, streamed: ``wds:DIR`` (the folder ``vitlab data pack`` writes: ``train-000000.tar``, ...,
``test-000000.tar``, ``dataset.json``) or ``wds:PATTERN`` (``DIR/train-{000000..000099}.tar``, brace-expanded; the
evaluation split is the same pattern with ``val``, ``validation`` or ``test`` for ``train`` where those shards exist).

A sample is the files of one key in a shard: an image (``jpg``, ``jpeg``, ``png``, ``webp``, ...) and its class
index (``cls``, as text). The tar members are read by the ``webdataset`` library (the ``wds`` extra:
``pip install "vitlab[wds]"``); vitlab adds what training needs on top:

- an index of every shard (the number of samples, their labels; a truncated shard or a sample without an image
  or a label is found here), read once and kept in the cache folder, so an epoch has a known number of steps;
- an order that is a function of (seed, epoch): the shards are shuffled, dealt to the ranks
  (``order[rank::world_size]``) and to each rank's loader workers (``[worker::workers]``), and each worker's
  samples pass a shuffle buffer seeded from (seed, epoch, rank, worker). Every rank takes the same number of
  batches (the global sample count over the ranks, cut into batches), going round its shards again if it must;
- images decoded in the loader workers at the model's size, batched there as uint8, pinned for a GPU.

Resume: vitlab checkpoints at epoch ends, and an epoch's order depends on (seed, epoch) only, so a resumed run
sees exactly the batches an uninterrupted one would (tested); a run killed inside an epoch repeats that epoch from
its first shard.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from vitlab._files import atomic_write_text
from vitlab.data.cache import cache_key, default_cache_dir, file_stamp
from vitlab.data.images import decode_image
from vitlab.data.loader import LoadRequest, hold_out, prefetched
from vitlab.errors import DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
LABEL_KEYS = ("cls", "label", "class")
EVAL_NAMES = ("val", "validation", "test")
INDEX_VERSION = 1
_META = re.compile(r"__[^/]*__($|/)")
STREAMS = 8  # the streams a rank's shards are dealt to (each a loader process's, or several in one)
SHUFFLE_BUFFER = 2000  # samples a worker shuffles among: timm's and WebDataset's usual size
MEAN_STD_IMAGES = 2000  # the first images of the stream give the mean and std (pack shuffles before writing)


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise DataError('wds: reading WebDataset shards needs the webdataset package: pip install "vitlab[wds]"') \
            from None
    return webdataset


# ---------------------------------------------------------------- which shards
def expand_pattern(pattern: str) -> list[str]:
    """``DIR/train-{000000..000002}.tar`` -> the three paths (brace expansion, as WebDataset does)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def find_shards(path: Path) -> tuple[dict[str, list[str]], list[str] | None]:
    """({"train": [shard, ...], "test"?: [...], "val"?: [...]}, class names from ``dataset.json`` or None)."""
    text = str(path)
    if path.is_dir():
        meta_file = path / "dataset.json"
        meta = _read_pack_meta(meta_file) if meta_file.is_file() else {}
        if meta:
            return {split: [str(path / name) for name in info["shards"]] for split, info in meta["splits"].items()}, \
                meta.get("classes")
        shards = {"train": sorted(str(p) for p in path.glob("*train*.tar"))}
        for name in EVAL_NAMES:
            found = sorted(str(p) for p in path.glob(f"*{name}*.tar") if "train" not in p.name)
            if found:
                shards["val" if name != "test" else "test"] = found
        if not shards["train"]:
            raise DataError(f"{path}: no dataset.json and no *train*.tar shards; write them with "
                            f"`vitlab data pack SOURCE {path}` or give a pattern, wds:{path}/train-{{000000..000009}}.tar")
        return shards, _classes_file(path)
    files = expand_pattern(text)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{missing[0]}: shard not found ({len(missing)} of the {len(files)} shards of {text} are "
                        "missing); check the pattern")
    shards = {"train": files}
    name = os.path.basename(text)
    if "train" in name:
        for other in EVAL_NAMES:  # the same pattern, or the same name with any shard numbers
            candidate = os.path.join(os.path.dirname(text), name.replace("train", other))
            found = [f for f in expand_pattern(candidate) if os.path.isfile(f)]
            found = found or sorted(glob.glob(re.sub(r"\{[^}]*\}", "*", candidate)))
            if found:
                shards["test" if other == "test" else "val"] = found
    return shards, _classes_file(Path(os.path.dirname(text) or "."))


def _classes_file(folder: Path) -> list[str] | None:
    meta = folder / "dataset.json"
    if meta.is_file():
        return _read_pack_meta(meta).get("classes")
    names = folder / "classes.txt"
    return [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if names.is_file() else None


def _read_pack_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta.get("splits"), dict) or "train" not in meta["splits"]:
            raise ValueError("no splits.train")
        return meta
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a dataset.json that `vitlab data pack` writes ({e}); write the shards again "
                        "or remove it") from None


# ---------------------------------------------------------------- the index of a shard
@dataclass
class ShardIndex:
    """One shard's samples in order: their keys and labels (-1: no label), and what is wrong with any."""

    path: str
    keys: list[str]
    labels: list[int]
    problems: list[str] = field(default_factory=list)  # samples without an image or label, a truncated end

    @property
    def good(self) -> list[int]:
        """Positions of the samples with an image and a label."""
        return [i for i, label in enumerate(self.labels) if label >= 0]


def _split_name(name: str) -> tuple[str, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``): WebDataset's rule (the key ends at the first dot of
    the file name)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(path: str) -> ShardIndex:
    """Read the headers of ``path`` (and its small label members) into a :class:`ShardIndex`."""
    size = os.path.getsize(path)
    keys: list[str] = []
    labels: list[int] = []
    has_image: list[bool] = []
    problems: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or _META.match(member.name) or "." not in member.name.rpartition("/")[2]:
                    continue  # what WebDataset's reader skips too
                if member.offset_data + member.size > size:
                    problems.append(f"{path}: truncated inside sample {_split_name(member.name)[0]} (the file ends "
                                    f"at {size:,} bytes); write the shard again")
                    break
                key, ext = _split_name(member.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                    labels.append(-1)
                    has_image.append(False)
                if ext in IMAGE_KEYS:
                    has_image[-1] = True
                elif ext in LABEL_KEYS:
                    labels[-1] = _parse_label(tar.extractfile(member).read(), path, key)
    except tarfile.TarError as e:
        problems.append(f"{path}: not a readable tar shard ({e}); it is truncated or corrupt: write it again")
    for i, key in enumerate(keys):
        if not has_image[i] or labels[i] < 0:
            missing = "image (jpg, png, ...)" if not has_image[i] else "label (cls)"
            problems.append(f"{path}: sample {key} has no {missing}")
            labels[i] = -1
    return ShardIndex(path=path, keys=keys, labels=labels, problems=problems)


def _parse_label(data: bytes, path: str, key: str) -> int:
    try:
        value = int(data.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path}: sample {key} has label {data[:20]!r}, not a class index; write cls as a "
                        "number") from None
    if value < 0:
        raise DataError(f"{path}: sample {key} has label {value}; class indices start at 0")
    return value


def index_shards(shards: Sequence[str], cache_dir) -> list[ShardIndex]:
    """The index of every shard, read once and kept in ``CACHE/shards/KEY.json`` (keyed by the shards' paths,
    sizes and modification times)."""
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "shards"
    key = cache_key("wds-index", INDEX_VERSION, file_stamp(shards))
    path = root / f"{key}.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [ShardIndex(**row) for row in rows]
    except (OSError, ValueError, TypeError):
        pass
    found = [index_shard(s) for s in shards]
    try:
        atomic_write_text(path, json.dumps([vars(i) for i in found]))
    except OSError as e:
        log.warning("%s: could not keep the shard index (%s)", path, e.strerror or e)
    return found


# ---------------------------------------------------------------- the dataset
@dataclass
class ShardDataset:
    """A split stored as WebDataset shards: what its index says (counts, labels), decoded at ``image_size`` and
    ``channels`` as it streams. ``keep`` selects samples by their place in the stream (a held-out split)."""

    shards: list[ShardIndex]
    classes: list[str]
    image_size: tuple[int, int]
    channels: int
    skip_bad_files: bool = False
    workers: int | None = None
    keep: torch.Tensor | None = None  # bool over the good samples in shard order; None: all
    files = None  # no file names: samples are named SHARD#KEY
    cache_file = None

    def __post_init__(self):
        self._offsets = np.cumsum([0] + [len(s.good) for s in self.shards])

    def __repr__(self) -> str:
        return (f"ShardDataset({len(self)} images in {len(self.shards)} shards, {self.channels}x{self.image_size[0]}x"
                f"{self.image_size[1]}, {len(self.classes)} classes)")

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self.keep is None else int(self.keep.sum())

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the samples, in shard order (int64)."""
        labels = torch.tensor([s.labels[i] for s in self.shards for i in s.good], dtype=torch.int64)
        return labels if self.keep is None else labels[self.keep]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def _keep_of(self, shard: int) -> np.ndarray | None:
        """Which of shard ``shard``'s good samples this dataset holds (None: all)."""
        if self.keep is None:
            return None
        return self.keep[int(self._offsets[shard]):int(self._offsets[shard + 1])].numpy()

    def subset(self, indices) -> "ShardDataset":
        """The samples at ``indices`` (into this dataset's order) as a dataset of the same shards, streamed with a
        filter: :func:`~vitlab.data.loader.hold_out` uses it for a stratified validation split."""
        base = torch.nonzero(self.keep).flatten() if self.keep is not None else torch.arange(int(self._offsets[-1]))
        keep = torch.zeros(int(self._offsets[-1]), dtype=torch.bool)
        keep[base[torch.as_tensor(indices, dtype=torch.int64)]] = True
        return replace(self, keep=keep)

    def part(self, rank: int, world_size: int) -> "ShardDataset":
        """Every ``world_size``-th shard from ``rank`` on (an evaluation's share: each image on one rank)."""
        if world_size == 1:
            return self
        chosen = list(range(rank, len(self.shards), world_size))
        keep = None if self.keep is None else torch.cat([self.keep[int(self._offsets[i]):int(self._offsets[i + 1])]
                                                         for i in chosen] or [torch.zeros(0, dtype=torch.bool)])
        return replace(self, shards=[self.shards[i] for i in chosen], keep=keep)

    def samples(self, shard: int) -> Iterator[tuple[np.ndarray, int]]:
        """Shard ``shard``'s held samples in order: (uint8 image (C, H, W), label)."""
        yield from _stream_shard(self, shard)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images of the stream (in shard order)."""
        images = []
        for shard in range(len(self.shards)):
            for image, _ in self.samples(shard):
                if len(images) >= n:
                    break
                images.append(torch.from_numpy(image))
            if len(images) >= n:
                break
        c, (h, w) = self.channels, self.image_size
        return torch.stack(images) if images else torch.zeros(0, c, h, w, dtype=torch.uint8)

    def take(self, indices) -> torch.Tensor:
        """The images at ``indices`` (into the stream's order), read by streaming up to the last of them."""
        wanted = torch.as_tensor(indices, dtype=torch.int64).tolist()
        if not wanted:
            return torch.zeros(0, self.channels, *self.image_size, dtype=torch.uint8)
        found: dict[int, torch.Tensor] = {}
        targets, position = set(wanted), 0
        for shard in range(len(self.shards)):
            for image, _ in self.samples(shard):
                if position in targets:
                    found[position] = torch.from_numpy(image)
                position += 1
                if position > max(wanted):
                    break
            if position > max(wanted):
                break
        return torch.stack([found[i] for i in wanted])

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the first :data:`MEAN_STD_IMAGES` images of the stream (a sample: reading
        every image of a stream for them would cost an epoch; ``vitlab data pack`` shuffles, so it is a fair
        one); set ``normalize`` to a named normalisation for the published one."""
        from vitlab.data.loader import channel_mean_std

        return channel_mean_std(self.head(MEAN_STD_IMAGES))

    def loader(self, *, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool, device="cpu", rank: int = 0,
               world_size: int = 1) -> "ShardLoader":
        """A :class:`ShardLoader` over this dataset."""
        return ShardLoader(self, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           device=device, rank=rank, world_size=world_size)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(json.dumps([[s.path, len(s.keys)] for s in self.shards]).encode())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    def source_info(self) -> dict:
        return {"kind": "shards", "shards": len(self.shards),
                "bytes": sum(os.path.getsize(s.path) for s in self.shards)}


def _stream_shard(ds: ShardDataset, shard: int) -> Iterator[tuple[np.ndarray, int]]:
    """Decode shard ``shard`` of ``ds`` in order: (image, label) of each held sample (see :func:`_raw_samples`)."""
    for raw in _raw_samples(ds, shard):
        image = _decode(ds, raw)
        if image is not None:
            yield image, raw[2]


def _decode(ds: ShardDataset, raw: tuple[str, bytes, int]) -> np.ndarray | None:
    """A raw sample's image at the dataset's size and channels (None: undecodable, skipped)."""
    name, data, _ = raw
    try:
        return decode_image(io.BytesIO(data), ds.image_size, ds.channels, name=name)
    except DataError as e:
        if not ds.skip_bad_files:
            raise DataError(f"{e}; or pass skip_bad_files=True (--skip-bad-files) to leave it out") from None
        log.warning("skipped %s", e)
        return None


def _raw_samples(ds: ShardDataset, shard: int) -> Iterator[tuple[str, bytes, int]]:
    """Shard ``shard`` of ``ds`` read in order with WebDataset's tar reader: (``SHARD#KEY``, the image file's
    bytes, the label) of each held sample, not yet decoded (a shuffle buffer holds these, a few KB each).

    A sample without an image or label and a truncated end are skipped (with a log line) when
    ``ds.skip_bad_files``, else a :class:`DataError` names the shard and the key."""
    wds = _webdataset()
    index = ds.shards[shard]
    keep = ds._keep_of(shard)
    good = set(index.good)
    position = -1  # among the shard's good samples

    def handler(exn: Exception) -> bool:
        if isinstance(exn, DataError):
            raise exn
        reason = exn.args[0] if exn.args else type(exn).__name__  # webdataset appends the stream and url to args
        message = f"{index.path}: not a readable tar shard ({reason}); it is truncated or corrupt: write it again"
        if ds.skip_bad_files:
            log.warning("skipped the rest of %s", message)
            return False  # stop reading this shard
        raise DataError(message)

    stream = wds.tarfile_samples([{"url": index.path}], handler=handler)
    for number, sample in enumerate(stream):
        if number not in good:
            if not ds.skip_bad_files:
                raise DataError(f"{index.problems[0] if index.problems else index.path}; or pass skip_bad_files=True "
                                "(--skip-bad-files) to leave such samples out")
            continue
        position += 1
        if keep is not None and not keep[position]:
            continue
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        yield f"{index.path}#{sample.get('__key__')}", data, index.labels[number]


# ---------------------------------------------------------------- batches
class ShardLoader:
    """Batches of (uint8 images (B, C, H, W), int64 labels (B,)) on ``device`` from a :class:`ShardDataset`, in
    the order the module docstring describes; ``len()`` batches an epoch on every rank. Training
    (``shuffle=True``) takes the rank's share of the global sample count, going round its shards again if they
    hold fewer; evaluation reads each of the rank's shards once, in order. Call :meth:`set_epoch` before each
    epoch. Decoding runs in ``dataset.workers`` processes (a ``torch.utils.data.DataLoader``), or in a background
    thread of this process with ``workers=0``."""

    def __init__(self, dataset: ShardDataset, *, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool,
                 device="cpu", rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        if len(dataset) == 0:
            raise DataError("the dataset is empty: there is nothing to batch")
        if shuffle and len(dataset.shards) < world_size:
            raise DataError(f"{len(dataset.shards)} shards for {world_size} processes: each process reads whole "
                            f"shards; write at least {world_size} (vitlab data pack --shard-size)")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.device, self.rank, self.world_size = drop_last, torch.device(device), rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.shuffle:
            per_rank = len(self.dataset) // self.world_size
            return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        return sum(math.ceil(n / self.batch_size) for n in self._eval_counts())

    def _eval_counts(self) -> list[int]:
        """Samples each worker of an evaluation yields (its shards, in order)."""
        shards = self.rank_shards()
        return [sum(self._held(s) for s in shards[w::self.streams()]) for w in range(self.streams())]

    def _held(self, shard: int) -> int:
        keep = self.dataset._keep_of(shard)
        return len(self.dataset.shards[shard].good) if keep is None else int(keep.sum())

    def rank_shards(self) -> list[int]:
        """The shards this rank reads this epoch, in order."""
        order = list(range(len(self.dataset.shards)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank::self.world_size]

    def streams(self) -> int:
        """How many streams the rank's shards are dealt to (``[stream::streams]``): a function of the data and
        the number of ranks only, so that the batches do not depend on the number of loader processes."""
        return max(1, min(STREAMS, len(self.rank_shards())))

    def processes(self) -> int:
        """Loader processes: up to ``dataset.workers`` (default up to 8), a divisor of the streams (so that taking
        a batch from each process in turn takes one from each stream in turn); 0 decodes in a thread."""
        wanted = self.dataset.workers if self.dataset.workers is not None else min(8, os.cpu_count() or 1)
        streams = self.streams()
        return max([p for p in range(1, streams + 1) if streams % p == 0 and p <= wanted], default=0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _WorkerStream(self)
        if stream.processes == 0:
            batches = prefetched(lambda b: b, stream.batches_of(range(stream.streams)), 2)
        else:
            batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stream.processes,
                                                       pin_memory=self.device.type == "cuda",
                                                       multiprocessing_context=_context(), prefetch_factor=2))
        try:
            for _ in range(len(self)):
                try:
                    images, labels = next(batches)
                except StopIteration:
                    break
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        finally:
            del batches


def _context():
    import multiprocessing

    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


class _WorkerStream(torch.utils.data.IterableDataset):
    """What the loader processes yield: process ``p`` the batches of streams ``p, p + P, ...``, interleaved one
    from each in turn. A DataLoader takes one batch from each process in turn, so any number of processes gives
    the batches of the streams in the same order: stream 0, 1, ..., S - 1, 0, 1, ..."""

    def __init__(self, loader: ShardLoader):
        super().__init__()
        self.dataset, self.batch_size, self.train = loader.dataset, loader.batch_size, loader.shuffle
        self.shards, self.streams, self.processes = loader.rank_shards(), loader.streams(), loader.processes()
        self.seed = (loader.seed * 1_000_003 + loader.epoch * 7919 + loader.rank * 104_729)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = range(info.id, self.streams, info.num_workers) if info is not None else range(self.streams)
        yield from self.batches_of(mine)

    def batches_of(self, streams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the given streams, one from each in turn."""
        streams = [self._batches(w) for w in streams]
        while streams:
            for s in list(streams):
                try:
                    yield next(s)
                except StopIteration:
                    streams.remove(s)

    def _batches(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = [], []
        for image, label in self._samples(worker):
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                yield torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)
                images, labels = [], []
        if images and not self.train:
            yield torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)

    def _samples(self, worker: int) -> Iterator[tuple[np.ndarray, int]]:
        mine = self.shards[worker::self.streams]
        if not self.train:
            for shard in mine:
                yield from self.dataset.samples(shard)
            return
        rng = random.Random(self.seed * 31 + worker)
        while True:  # round after round of the stream's shards, each in a new order through the shuffle buffer
            order = list(mine)
            rng.shuffle(order)
            raw = (sample for shard in order for sample in _raw_samples(self.dataset, shard))
            for name, data, label in _shuffled(raw, SHUFFLE_BUFFER, rng):  # decoded after shuffling
                image = _decode(self.dataset, (name, data, label))
                if image is not None:
                    yield image, label


def _shuffled(items: Iterator, size: int, rng: random.Random, initial: int = 100) -> Iterator:
    """Items through a shuffle buffer of up to ``size`` (WebDataset's shuffle: output starts once ``initial``
    items are in, the buffer grows by two items for each one out until it is full, and each output is a random
    pick of it)."""
    items = iter(items)
    buffer: list = []

    def pick():
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return buffer.pop()

    for item in items:
        buffer.append(item)
        if len(buffer) < size:
            extra = next(items, _NONE)
            if extra is not _NONE:
                buffer.append(extra)
        if len(buffer) >= min(initial, size):
            yield pick()
    while buffer:
        yield pick()


_NONE = object()


# ---------------------------------------------------------------- loading
def load_wds(path: Path, request: LoadRequest) -> tuple[dict[str, ShardDataset], str, list[str]]:
    """The splits of the shards at ``path`` (see the module docstring), their name and the problems found in
    their index (skipped with ``skip_bad_files``)."""
    _webdataset()
    shards, classes = find_shards(path)
    out, problems = {}, []
    indexes = {split: index_shards(files, request.cache_dir) for split, files in shards.items()}
    for split, index in indexes.items():
        found = [p for shard in index for p in shard.problems]
        if found and not request.skip_bad_files:
            more = f" ({len(found) - 1} more)" if len(found) > 1 else ""
            raise DataError(f"{found[0]}{more}; or pass skip_bad_files=True (--skip-bad-files) to leave such samples "
                            "out")
        problems += found
    top = max((label for index in indexes.values() for s in index for label in s.labels), default=-1)
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
    elif top >= len(classes):
        raise DataError(f"{path}: label {top} is not one of the {len(classes)} classes its dataset.json names")
    size, channels = _native_format(indexes["train"], request)
    for split, index in indexes.items():
        out[split] = ShardDataset(shards=index, classes=list(classes), image_size=size, channels=channels,
                                  skip_bad_files=request.skip_bad_files, workers=request.workers)
        if len(out[split]) == 0:
            raise DataError(f"{shards[split][0]}: the {split} shards hold no sample with an image and a label")
    name = path.name if path.is_dir() else os.path.basename(os.path.dirname(str(path))) or "wds"
    return hold_out(out, request), name, problems


def _native_format(index: list[ShardIndex], request: LoadRequest) -> tuple[tuple[int, int], int]:
    """The asked size and channels, else those of the first image of the stream."""
    if request.image_size is not None and request.channels is not None:
        return tuple(request.image_size), int(request.channels)
    from PIL import Image

    for number, sample in enumerate(_webdataset().tarfile_samples([{"url": s.path} for s in index[:1]])):
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            continue
        with Image.open(io.BytesIO(data)) as im:
            channels = request.channels or (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
            size = request.image_size or (im.height, im.width)
        return (int(size[0]), int(size[1])), int(channels)
    raise DataError(f"{index[0].path}: no readable image in the first shard; check the shards")


# ---------------------------------------------------------------- writing shards
def pack(spec: str, out: str | os.PathLike, *, shard_size: int = 5000, seed: int = 0, image_size=None,
         channels: int | None = None, cache_dir=None, workers: int | None = None) -> dict:
    """Write the dataset ``spec`` as WebDataset shards in the folder ``out``: ``SPLIT-000000.tar``, ... (at most
    ``shard_size`` samples each, in a seeded random order so that a shuffle buffer mixes the classes), and
    ``dataset.json`` (the classes, each split's shards and sample count), written last. An image folder's files
    go in as they are (a JPEG stays the same JPEG); other sources are written as PNG at the size they load at.
    Returns what ``dataset.json`` holds."""
    wds = _webdataset()
    if shard_size < 1:
        raise DataError(f"shard_size={shard_size} must be at least 1")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    classes, splits = _pack_source(spec, image_size, channels, cache_dir, workers)
    meta = {"format": "vitlab-wds", "version": 1, "source": str(spec), "classes": classes, "splits": {}}
    for split, (count, sample_of) in splits.items():
        order = list(range(count))
        random.Random(seed).shuffle(order)
        names = []
        for start in range(0, count, shard_size):
            name = f"{split}-{len(names):06d}.tar"
            tmp = out / f".{name}.tmp"
            with open(tmp, "wb") as f:
                writer = wds.TarWriter(f, encoder=False)
                for i in order[start:start + shard_size]:
                    writer.write(sample_of(i))
                writer.close()
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / name)
            names.append(name)
        meta["splits"][split] = {"shards": names, "samples": count}
        log.info("%s: %d %s samples in %d shards", out, count, split, len(names))
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1) + "\n")
    return meta


def _pack_source(spec, image_size, channels, cache_dir, workers):
    """(classes, {split: (count, sample_of(i) -> the sample's files)}) of the dataset to pack."""
    from vitlab.data.specs import load_data, parse_data_spec

    kind, path = parse_data_spec(spec)
    if kind == "folder" and image_size is None and channels is None:
        from vitlab.data.sources.folder import list_splits

        classes, listings = list_splits(path)
        splits = {}
        for split, listing in listings.items():
            def sample_of(i, listing=listing):
                f = listing.files[i]
                ext = os.path.splitext(f)[1].lower().lstrip(".")
                ext = "jpg" if ext in ("jpeg", "jfif") else ext
                return {"__key__": f"{i:08d}", ext: Path(f).read_bytes(), "cls": str(listing.labels[i]).encode()}
            splits["train" if split == "all" else split] = (len(listing.files), sample_of)
        return classes, splits
    data = load_data(spec, image_size=image_size, channels=channels, cache_dir=cache_dir, workers=workers)
    named = {"train": data.train, "val": data.val, "test": data.test}
    if data.test is data.val:
        named = {"train": data.train, "test": data.test}
    splits = {}
    for split, ds in named.items():
        if ds is None:
            continue

        def sample_of(i, ds=ds):
            from PIL import Image

            pixels = ds.take([i])[0].numpy()
            image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return {"__key__": f"{i:08d}", "png": buf.getvalue(), "cls": str(int(ds.labels[i])).encode()}
        splits[split] = (len(ds), sample_of)
    return list(data.classes), splits


__all__ = ["ShardDataset", "ShardLoader", "load_wds", "pack", "index_shards", "find_shards"]
