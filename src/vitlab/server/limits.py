"""What one request to ``vitlab serve`` may send. Apart from the app so that the command line can show the
defaults without importing the web stack."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from vitlab.errors import ConfigError

_SLACK = 64 * 1024  # a request's multipart headers and option fields, beside its files


@dataclass(frozen=True)
class Limits:
    """What one request may send: ``max_bytes`` per file, ``max_files`` files, ``max_pixels`` per image
    (default PIL's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``, refused rather than warned about)."""

    max_bytes: int = 8 * 1024 * 1024
    max_files: int = 16
    max_pixels: int = Image.MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_files", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_bytes + _SLACK
