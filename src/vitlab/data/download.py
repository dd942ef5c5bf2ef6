"""``vitlab data download``: fetch CIFAR-10/100, MNIST, Fashion-MNIST from their official addresses.

Each file is streamed to a temporary name beside its destination, checked against the official md5, and
only then renamed into place, so an interrupted or corrupted download never leaves a file that looks valid.
A file already present with the right md5 is not fetched again. ``base_url`` (or ``$VITLAB_DATA_MIRROR``)
replaces the official address, for mirrors and for tests.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vitlab._files import atomic_writer
from vitlab.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its name, the official base address, and the official md5."""

    name: str
    base_url: str
    md5: str


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # the mirror torchvision uses; yann.lecun.com is often down
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

# dataset -> (sub-folder of --root, files); the data spec that reads the result is "<dataset>:<root>"
DATASETS: dict[str, tuple[str, list[RemoteFile]]] = {
    "cifar10": ("", [RemoteFile("cifar-10-python.tar.gz", _CIFAR_URL, "c58f30108f718f92721af3b95e74349a")]),
    "cifar100": ("", [RemoteFile("cifar-100-python.tar.gz", _CIFAR_URL, "eb9058c3a382ffc7106e4002c42a8d85")]),
    "mnist": ("mnist", [
        RemoteFile("train-images-idx3-ubyte.gz", _MNIST_URL, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        RemoteFile("train-labels-idx1-ubyte.gz", _MNIST_URL, "d53e105ee54ea40749a09fcbcd1e9432"),
        RemoteFile("t10k-images-idx3-ubyte.gz", _MNIST_URL, "9fb629c4189551a2d022fa330f9573f3"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", _MNIST_URL, "ec29112dd5afa0611ce80d1b7f02629c"),
    ]),
    "fashion-mnist": ("fashion-mnist", [
        RemoteFile("train-images-idx3-ubyte.gz", _FASHION_URL, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        RemoteFile("train-labels-idx1-ubyte.gz", _FASHION_URL, "25c81989df183df01b3e8a0aad5dffbe"),
        RemoteFile("t10k-images-idx3-ubyte.gz", _FASHION_URL, "bef4ecab320f06d8554ea6380940ec79"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", _FASHION_URL, "bb300cfdad3c16e7a12a480ee83cd310"),
    ]),
}
_CHUNK = 1 << 20


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, check the md5, then rename it to ``dest``."""
    h = hashlib.md5()
    received = 0
    with atomic_writer(dest, suffix=".part") as out:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            expected_len = int(length) if length and length.isdigit() else None
            while True:
                block = resp.read(_CHUNK)
                if not block:
                    break
                out.write(block)
                h.update(block)
                received += len(block)
        if expected_len is not None and received != expected_len:
            raise DataError(f"{dest.name}: download from {url} stopped after {received} of {expected_len} "
                            f"bytes; run the command again")
        if h.hexdigest() != md5:
            raise DataError(f"{dest.name}: wrong checksum after download from {url} (md5 {h.hexdigest()}, "
                            f"expected {md5}); nothing was saved, try again or use another mirror (--base-url)")


def download_dataset(name: str, root: str | os.PathLike, *, base_url: str | None = None,
                     timeout: float = 60.0) -> str:
    """Download dataset ``name`` (cifar10, cifar100, mnist, fashion-mnist) under ``root``; return its data spec.

    Files already present with the official md5 are kept. ``base_url`` (else ``$VITLAB_DATA_MIRROR``)
    replaces the official addresses. Without network the :class:`DataError` says where to put the files.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"cannot download {name!r}; vitlab downloads {', '.join(DATASETS)}")
    sub, files = DATASETS[key]
    root = Path(root).expanduser()
    download_files(files, root / sub if sub else root, base_url=base_url, timeout=timeout)
    return f"{key}:{root}"


def download_files(files: list[RemoteFile], folder: str | os.PathLike, *, base_url: str | None = None,
                   timeout: float = 60.0) -> list[Path]:
    """Fetch each :class:`RemoteFile` into ``folder`` (md5-checked, atomic); keep files already valid.

    ``base_url`` (else ``$VITLAB_DATA_MIRROR``) replaces each file's official base address.
    """
    folder = Path(folder).expanduser()
    base_url = base_url or os.environ.get("VITLAB_DATA_MIRROR") or None
    written = []
    for rf in files:
        dest = folder / rf.name
        written.append(dest)
        if dest.is_file():
            if file_md5(dest) == rf.md5:
                log.info("%s: present, checksum ok", dest)
                continue
            log.warning("%s: present but its checksum is wrong; downloading it again", dest)
        url = (base_url.rstrip("/") + "/" + rf.name) if base_url else rf.base_url + rf.name
        log.info("downloading %s -> %s", url, dest)
        try:
            _fetch(url, dest, rf.md5, timeout)
        except urllib.error.HTTPError as e:
            raise DataError(f"{rf.name}: {url} answered HTTP {e.code} {e.reason}; download it by hand and put it "
                            f"at {dest}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"{rf.name}: cannot reach {url} ({reason}); without network, download it by hand "
                            f"and put it at {dest} (md5 {rf.md5})") from None
        except (http.client.HTTPException, OSError) as e:
            raise DataError(f"{rf.name}: download from {url} failed ({type(e).__name__}: {e}); nothing was "
                            f"saved, run the command again or put the file at {dest} by hand") from None
    return written
