"""Hugging Face datasets on disk: a dataset saved with ``save_to_disk`` (a ``DatasetDict`` of splits, or one
``Dataset``), or a local folder ``datasets.load_dataset`` reads (Parquet, Arrow, an image folder).

The spec is ``hf:PATH``, optionally ``hf:PATH?image=COLUMN&label=COLUMN``; by default the image column is the
first of type ``Image`` and the label column the first ``ClassLabel`` (else one named ``label``), whose names are
the class names. The Arrow files are memory-mapped by ``datasets``; the images are decoded once, by worker
processes, into vitlab's image cache (keyed by the Arrow files, the split, the column, the size and channels) and
memory-mapped from it, as an image folder's are. Needs the ``hf`` extra: ``pip install "vitlab[hf]"``.
"""

from __future__ import annotations

import io
import logging
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from vitlab.data.cache import cache_key, cached_images, file_stamp
from vitlab.data.images import decode_image
from vitlab.data.loader import ArrayDataset, LoadRequest, hold_out
from vitlab.data.sources.folder import checked_dataset
from vitlab.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": ("train", "training"), "val": ("validation", "valid", "val"), "test": ("test", "testing")}
LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError('hf: reading Hugging Face datasets needs the datasets package: pip install "vitlab[hf]"') \
            from None
    return datasets


def parse_hf_path(path: Path) -> tuple[Path, dict[str, str]]:
    """``PATH?image=img&label=fine_label`` -> (PATH, {"image": "img", "label": "fine_label"})."""
    text, _, query = str(path).partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"image", "label"}
    if unknown:
        raise DataError(f"hf:{path}: unknown option(s) {', '.join(sorted(unknown))}; use image=COLUMN and label=COLUMN")
    return Path(text).expanduser(), options


def open_dataset(root: Path):
    """The ``DatasetDict`` (or ``Dataset``) at ``root``: ``load_from_disk`` for a saved dataset, else
    ``load_dataset`` on the local folder."""
    datasets = _datasets()
    if not root.exists():
        raise DataError(f"{root}: not found; pass the folder a Hugging Face dataset was saved to (save_to_disk)")
    saved = any((root / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    try:
        if saved:
            return datasets.load_from_disk(str(root))
        return datasets.load_dataset(str(root))
    except (FileNotFoundError, ValueError, OSError, TypeError) as e:
        raise DataError(f"{root}: not a readable Hugging Face dataset ({str(e).splitlines()[0][:200]}); save it with "
                        "dataset.save_to_disk(PATH)") from None


def _splits(ds) -> dict:
    """{"train": Dataset, "val"?: ..., "test"?: ...} of a DatasetDict (or a lone Dataset: its train split)."""
    datasets = _datasets()
    if isinstance(ds, datasets.Dataset):
        return {"train": ds}
    found = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if name in ds:
                found[split] = ds[name]
                break
    if "train" not in found:
        raise DataError(f"the dataset has splits {', '.join(ds)} but no train split; name one 'train'")
    return found


def _columns(root: Path, ds, options: dict[str, str]) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names from a ClassLabel feature or None), checked."""
    datasets = _datasets()
    features = ds.features
    have = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
    image = options.get("image") or next((k for k, v in features.items() if isinstance(v, datasets.Image)), None)
    label = options.get("label") or next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)),
                                         None) or next((k for k in LABEL_NAMES if k in features), None)
    for what, column in (("image", image), ("label", label)):
        if column is None or column not in features:
            named = f"no column {column!r}" if column else f"no {what} column"
            raise DataError(f"{root}: {named}; its columns are {have}; name it with hf:{root}?{what}=COLUMN")
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, names


def _labels(root: Path, ds, column: str, names: list[str] | None, encoded: bool) -> tuple[torch.Tensor, list[str]]:
    """A split's labels as class indices and the class names: a ClassLabel column holds indices (``encoded``);
    plain values are named by their text, the classes being the training split's sorted distinct values."""
    values = ds.data.column(column).to_pylist()
    if not encoded:
        if names is None:
            names = sorted({str(v) for v in values}, key=lambda v: (len(v), v))
        index = {n: i for i, n in enumerate(names)}
        unknown = [v for v in values if str(v) not in index]
        if unknown:
            raise DataError(f"{root}: label {unknown[0]!r} in column {column!r} is not a class of the training split")
        values = [index[str(v)] for v in values]
    bad = [v for v in values if v is None or not 0 <= int(v) < len(names)]
    if bad:
        raise DataError(f"{root}: label {bad[0]!r} in column {column!r} is not one of its {len(names)} classes")
    return torch.tensor(values, dtype=torch.int64), list(names)


_OPEN: dict = {}  # in a worker process: the datasets it has opened


def _decode_rows(rows: range, root: str, split: str, column: str, image_size, channels):
    """Cache task: decode the images of rows ``rows`` of ``split`` (run in a worker process)."""
    key = (root, split, column)
    table = _OPEN.get(key)
    if table is None:
        table = _OPEN[key] = _splits(open_dataset(Path(root)))[split].cast_column(column, _datasets().Image(decode=False))
    cells = table[rows.start:rows.stop][column]
    h, w = image_size
    out = np.zeros((len(cells), channels, h, w), dtype=np.uint8)
    errors = []
    for i, cell in enumerate(cells):
        name = f"{root} ({split} row {rows.start + i})"
        try:
            if cell is None or (cell.get("bytes") is None and not cell.get("path")):
                raise DataError(f"{name}: no image in column {column!r}; fix or drop that row")
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
            out[i] = decode_image(source, image_size, channels, name=name)
        except DataError as e:
            errors.append((i, str(e)))
    return out, errors


def _native_format(root: Path, table, column: str, request: LoadRequest) -> tuple[tuple[int, int], int]:
    if request.image_size is not None and request.channels is not None:
        return tuple(request.image_size), request.channels
    cell = table.cast_column(column, _datasets().Image(decode=False))[0][column]
    from PIL import Image

    with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]) as im:
        channels = request.channels or (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
        size = request.image_size or (im.height, im.width)
    return (int(size[0]), int(size[1])), int(channels)


def load_hf(path: Path, request: LoadRequest) -> tuple[dict[str, ArrayDataset], str, list[str]]:
    """The splits of the Hugging Face dataset at ``path`` (see the module docstring), the dataset's name and the
    messages about skipped bad images."""
    root, options = parse_hf_path(path)
    splits = _splits(open_dataset(root))
    image, label, names = _columns(root, splits["train"], options)
    size, channels = _native_format(root, splits["train"], image, request)
    out, skipped, classes = {}, [], None
    for split, table in splits.items():
        if split != "train":
            _columns(root, table, {"image": image, "label": label})
        labels, classes = _labels(root, table, label, names or classes, encoded=names is not None)
        files = sorted({f["filename"] for f in table.cache_files})
        key = cache_key("hf", file_stamp(files), split, image, list(size), channels)
        decode = partial(_decode_rows, root=str(root), split=split, column=image, image_size=size, channels=channels)
        cached = cached_images(key, (len(table), channels, *size), decode, range(len(table)),
                               cache_dir=request.cache_dir, workers=request.workers, what=f"{root} ({split})")
        out[split], errors = checked_dataset(cached, labels, classes, None, skip_bad_files=request.skip_bad_files,
                                             what=f"{root} ({split})")
        skipped += errors
    return hold_out(out, request), root.name or str(root), skipped


__all__ = ["load_hf", "open_dataset", "parse_hf_path"]
