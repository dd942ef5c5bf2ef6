"""CIFAR-10 and CIFAR-100 in the official python format: the ``cifar-10-batches-py/`` folder
(``cifar-100-python/``), or the ``cifar-10-python.tar.gz`` archive read directly without unpacking.

The batches are pickles. vitlab never unpickles a user file freely: :class:`_ArrayUnpickler` only builds
dicts, lists, strings, numbers and NumPy arrays, and refuses anything else (as ``torch.load(weights_only=True)``
does for checkpoints).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vitlab.data.loader import ArrayDataset
from vitlab.errors import DataError

LAYOUT = {
    # kind: (folder inside the archive, archive name, train batches, test batch, meta file, labels key, names key)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", "meta", "fine_labels",
                 "fine_label_names"),
}

# The only globals a CIFAR batch needs: NumPy's array reconstruction, and codecs for Python 2 strings.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")


def read_batch(data: bytes, source: str) -> dict:
    """Unpickle one CIFAR batch (bytes keys, as written by Python 2) safely, naming ``source`` on failure."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            ModuleNotFoundError, MemoryError) as e:
        raise DataError(f"{source}: not a readable CIFAR batch ({e or type(e).__name__}); the file is truncated "
                        f"or corrupt: download it again (vitlab data download)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source}: not a CIFAR batch (holds a {type(obj).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_names(names, source: str) -> list[str]:
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: the class names are malformed ({e})") from None


class _FolderReader:
    def __init__(self, folder: Path):
        self.folder = folder

    def read(self, name: str) -> tuple[bytes, str]:
        path = self.folder / name
        if not path.is_file():
            raise DataError(f"{path}: file not found; the CIFAR folder is incomplete, download it again")
        return path.read_bytes(), str(path)


class _TarReader:
    def __init__(self, archive: Path, inner: str):
        self.archive, self.inner = archive, inner
        # One sequential pass: reading members out of order makes a gzip stream decompress again from the
        # start for every backward seek (the whole archive, several times). The files are all needed anyway.
        self.files: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    f = tar.extractfile(member) if member.isfile() else None
                    if f is not None:
                        self.files[member.name] = f.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{archive}: not a readable tar.gz archive ({e}); it is truncated or corrupt: "
                            f"download it again") from None

    def read(self, name: str) -> tuple[bytes, str]:
        source = f"{self.archive}:{self.inner}/{name}"
        data = self.files.get(f"{self.inner}/{name}")
        if data is None:
            raise DataError(f"{source}: not in the archive; is it the official CIFAR python version?")
        return data, source

    def close(self):
        self.files.clear()


def _open(path: Path, kind: str):
    inner, archive, *_ = LAYOUT[kind]
    if not path.exists():
        raise DataError(f"{path}: not found; put {inner}/ or {archive} there, or run "
                        f"`vitlab data download {kind} --root {path}`")
    if path.is_file():
        return _TarReader(path, inner)
    for candidate in (path, path / inner):
        if (candidate / LAYOUT[kind][4]).is_file():
            return _FolderReader(candidate)
    if (path / archive).is_file():
        return _TarReader(path / archive, inner)
    raise DataError(f"{path}: no {kind.upper()} files here (looked for {path}/{inner}/ and {path}/{archive}); "
                    f"run `vitlab data download {kind} --root {path}`")


def _to_dataset(batches: list[tuple[dict, str]], labels_key: str, classes: list[str]) -> ArrayDataset:
    images, labels = [], []
    for batch, source in batches:
        data, lab = batch.get("data"), batch.get(labels_key)
        if not isinstance(data, np.ndarray) or lab is None:
            raise DataError(f"{source}: a CIFAR batch needs 'data' (an array) and '{labels_key}'")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{source}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        lab = np.asarray(lab, dtype=np.int64)
        if lab.shape != (len(data),):
            raise DataError(f"{source}: {len(data)} images but {lab.size} labels; the file is corrupt")
        if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(f"{source}: labels outside 0..{len(classes) - 1}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane, each 32x32
        labels.append(lab)
    return ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                        list(classes))


def load_cifar(path: str | Path, kind: str = "cifar10") -> dict[str, ArrayDataset]:
    """Read CIFAR-10/100 (``kind``) from a ``cifar-10-batches-py`` folder, its parent, or the .tar.gz.

    Returns ``{"train": 50000 images, "test": 10000 images}``, uint8 (N, 3, 32, 32), with the class names of
    the meta file (the fine labels for CIFAR-100).
    """
    if kind not in LAYOUT:
        raise DataError(f"unknown CIFAR kind {kind!r}; use cifar10 or cifar100")
    _, _, train_names, test_name, meta_name, labels_key, names_key = LAYOUT[kind]
    reader = _open(Path(path).expanduser(), kind)
    try:
        meta_bytes, meta_source = reader.read(meta_name)
        meta = read_batch(meta_bytes, meta_source)
        if names_key not in meta:
            raise DataError(f"{meta_source}: no '{names_key}' in the meta file")
        classes = _decode_names(meta[names_key], meta_source)
        def batches(names):
            out = []
            for n in names:
                data, source = reader.read(n)
                out.append((read_batch(data, source), source))
            return out

        train = _to_dataset(batches(train_names), labels_key, classes)
        test = _to_dataset(batches([test_name]), labels_key, classes)
    finally:
        if isinstance(reader, _TarReader):
            reader.close()
    return {"train": train, "test": test}
