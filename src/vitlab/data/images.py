"""Decoding one image file of any mode into a uint8 (C, H, W) array at a given size.

Deliberately free of torch: folder datasets call :func:`decode_image` in worker processes.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import BinaryIO, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitlab.errors import DataError, ImageTooLargeError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".jfif")

# Modes that carry no colour: they become 1-channel images when the caller asks for native channels.
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}
# What PIL raises for a file that is not an image, is truncated, or is corrupt.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (case-insensitive) and is not hidden."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The image files under ``folder``, recursively: ``(images, ignored)``, where ``ignored`` are the
    visible files without an image extension (callers decide whether to warn about them).

    The one folder walk of vitlab (folder datasets, ``vitlab predict`` / ``attention``): symlinked folders
    are followed (a link back to a folder being walked is skipped, so a loop ends), hidden files and folders
    (``.name``) are skipped, a file is an image by its extension (:func:`is_image_file`). Order: each folder's
    files sorted by name, then its sub-folders in name order. Paths are ``os.path.join(folder, ...)`` strings.
    """
    images: list[str] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(n for n in dirnames if not n.startswith(".")):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and _links_to_ancestor(path, dirpath):
                log.warning("%s: links to a folder that contains it; not followed", path)
                continue
            keep.append(name)
        dirnames[:] = keep  # os.walk descends into what is left, in this order
        for name in sorted(filenames):
            if is_image_file(name):
                images.append(os.path.join(dirpath, name))
            elif not name.startswith("."):
                ignored.append(os.path.join(dirpath, name))
    return images, ignored


def _links_to_ancestor(link: str, parent: str) -> bool:
    """True when the folder ``link`` points to is ``parent`` or contains it (following it would loop)."""
    target, here = os.path.realpath(link), os.path.realpath(parent)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def native_channels(path: str | os.PathLike) -> int:
    """1 for a grayscale file (L, 1, LA, 16-bit, float), else 3. Raises :class:`DataError` for a bad file."""
    try:
        with Image.open(path) as im:
            return 1 if im.mode in _GRAY_MODES else 3
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.replace(os.linesep, " ")[:200]


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float images -> 8-bit 'L' by scaling their range (PIL's own convert would clip at 255)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        a = np.clip(np.nan_to_num(a) / top * 255.0, 0, 255)
    else:
        # 'I;16*' holds 0..65535; 'I' (32-bit) is how PIL opens 16-bit PNGs too.
        a = np.clip(a.astype(np.float64) / 257.0, 0, 255)
    return Image.fromarray(np.round(a).astype(np.uint8), mode="L")


def _convert(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 'RGB' (channels=3) or 'L' (channels=1). Transparency is composited onto white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def decode_image(path: str | os.PathLike | BinaryIO, image_size: Sequence[int] | None = None, channels: int = 3, *,
                 name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file into a uint8 array (C, H, W), C = ``channels`` (1 or 3).

    Any mode works (RGB, L, RGBA and P with transparency on white, CMYK, 16-bit, float); EXIF orientation
    is applied. With ``image_size=(H, W)`` the image is resized to exactly that size (antialiased).
    A file that is not an image, or is corrupt or truncated, raises :class:`DataError` naming it (``name``
    where ``path`` is an in-memory file such as an upload). An image of more than ``max_pixels`` pixels
    (default: twice PIL's ``Image.MAX_IMAGE_PIXELS``, PIL's own decompression-bomb error) raises
    :class:`ImageTooLargeError` before it is decoded.
    """
    in_memory = not isinstance(path, (str, os.PathLike))
    name = str(path) if name is None else name
    if channels not in (1, 3):
        raise DataError(f"{name}: channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    try:
        with warnings.catch_warnings():
            # PIL warns about huge or odd files; the error path below reports what matters.
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise ImageTooLargeError(f"{name}: {im.width}x{im.height} pixels is more than the "
                                             f"{max_pixels:,} allowed (a decompression bomb?); send a smaller image")
                a = _decode(im, image_size, channels)
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {_reason(e).rstrip('.')}; send a smaller image") from None
    except _DECODE_ERRORS as e:
        reason = _reason(e).replace(repr(path), repr(name)) if in_memory else _reason(e)  # PIL names the object
        what = "send a JPEG, PNG or other image file" if in_memory else "replace or delete it"
        raise DataError(f"{name}: not a readable image ({reason}); the file is corrupt, truncated or "
                        f"not an image: {what}") from None
    # (H, W) or (H, W, C) -> (C, H, W)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return np.ascontiguousarray(a)


def _decode(im: Image.Image, image_size: Sequence[int] | None, channels: int) -> np.ndarray:
    """An opened image -> uint8 (H, W) or (H, W, C) in the given channels, at ``image_size`` when given."""
    if image_size is not None and im.format == "JPEG":
        # Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding (never below the target;
        # max side both ways because EXIF may rotate): a large photo decodes several times faster.
        side = max(int(image_size[0]), int(image_size[1]))
        im.draft(None, (side, side))
    im.load()  # decode now: a truncated file fails here, not later
    im = ImageOps.exif_transpose(im)
    im = _convert(im, channels)
    if image_size is not None:
        h, w = int(image_size[0]), int(image_size[1])
        if im.size != (w, h):
            im = im.resize((w, h), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)
