"""MNIST-style IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``): MNIST, Fashion-MNIST,
KMNIST and any other set stored that way."""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from vitlab.data.loader import ArrayDataset
from vitlab.errors import DataError

KNOWN_CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
# Sub-folders where the files commonly live: ours (vitlab data download), torchvision's.
_SUBFOLDERS = {"mnist": ["mnist", "MNIST/raw"], "fashion-mnist": ["fashion-mnist", "FashionMNIST/raw"],
               "kmnist": ["kmnist", "KMNIST/raw"], "idx": []}
_FILE_RE = re.compile(r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<what>images|labels)[-.]"
                      r"idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$")
_DTYPES = {0x08: np.uint8}


def read_idx(path: str | Path, expect_ndim: int) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes with ``expect_ndim`` dimensions.

    Raises :class:`DataError` naming the file for a wrong magic number, a wrong type, or a truncated file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt") from None
    expected_magic = 0x0800 | expect_ndim
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic >> 16 != 0 or (magic >> 8) & 0xFF not in _DTYPES or magic & 0xFF != expect_ndim:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x} (expected 0x{expected_magic:08x} for "
                        f"{'labels' if expect_ndim == 1 else 'images'}); not an MNIST-style IDX file of that kind")
    header = 4 + 4 * expect_ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{expect_ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{path}: holds {len(raw) - header} data bytes but its header says {dims} "
                        f"({count} bytes); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_files(root: Path, kind: str) -> dict[str, tuple[Path, Path]]:
    """``{"train": (images, labels), "test": (images, labels)}`` found in ``root`` or its usual sub-folders."""
    if not root.exists():
        raise DataError(f"{root}: folder not found; put the *-idx3-ubyte.gz / *-idx1-ubyte.gz files there"
                        + (f" or run `vitlab data download {kind} --root {root}`" if kind != "idx" else ""))
    if not root.is_dir():
        raise DataError(f"{root}: is a file; {kind}: expects the folder that holds the IDX files")
    for folder in [root] + [root / s for s in _SUBFOLDERS.get(kind, [])]:
        if not folder.is_dir():
            continue
        found: dict[tuple[str, str, str], Path] = {}
        for p in sorted(folder.iterdir()):
            m = _FILE_RE.match(p.name)
            if not m or not p.is_file():
                continue
            if (m["what"] == "images") != (m["ndim"] == "3"):
                continue
            split = "train" if m["split"] == "train" else "test"
            key = (m["prefix"], split, m["what"])
            if key not in found or not m["gz"]:  # prefer the uncompressed copy when both are present
                found[key] = p
        prefixes = sorted({k[0] for k in found})
        if not prefixes:
            continue
        complete = [pre for pre in prefixes
                    if all((pre, s, w) in found for s in ("train", "test") for w in ("images", "labels"))]
        if len(complete) > 1:
            raise DataError(f"{folder}: holds several IDX datasets ({', '.join(repr(p) for p in complete)}); "
                            f"move each into its own folder")
        if not complete:
            missing = [f"{s}-{w}" for s in ("train", "test") for w in ("images", "labels")
                       if (prefixes[0], s, w) not in found]
            raise DataError(f"{folder}: incomplete IDX dataset, missing {', '.join(missing)} "
                            f"(e.g. t10k-labels-idx1-ubyte.gz)")
        pre = complete[0]
        return {s: (found[(pre, s, "images")], found[(pre, s, "labels")]) for s in ("train", "test")}
    raise DataError(f"{root}: no IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                    f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])")


def load_idx(path: str | Path, kind: str = "idx") -> dict[str, ArrayDataset]:
    """Read the train and test IDX files under ``path`` -> ``{"train": ..., "test": ...}``, uint8 (N, 1, H, W).

    Class names are the known ones for ``mnist``, ``fashion-mnist`` and ``kmnist``, else ``"0", "1", ...``.
    """
    files = find_idx_files(Path(path).expanduser(), kind)
    arrays = {}
    for split, (img_path, lab_path) in files.items():
        images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
        if len(images) != len(labels):
            raise DataError(f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels; "
                            f"the files do not belong together")
        arrays[split] = (images, labels.astype(np.int64), img_path, lab_path)
    num_classes = int(max(a[1].max(initial=0) for a in arrays.values())) + 1
    classes = KNOWN_CLASSES.get(kind) or [str(i) for i in range(num_classes)]
    out = {}
    for split, (images, labels, img_path, lab_path) in arrays.items():
        if len(labels) and labels.max() >= len(classes):
            raise DataError(f"{lab_path}: label {labels.max()} but {kind} has {len(classes)} classes; the labels "
                            "file is corrupt or belongs to another dataset")
        if images.shape[1:] != arrays["train"][0].shape[1:]:
            raise DataError(f"{img_path}: images are {images.shape[1:]}, the train images "
                            f"{arrays['train'][0].shape[1:]}")
        out[split] = ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels),
                                  list(classes))
    return out
