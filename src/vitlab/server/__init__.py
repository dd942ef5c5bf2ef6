"""The web page and JSON API over a trained model (``vitlab serve``): :func:`serve`, :func:`create_app`.

The web stack (Starlette, uvicorn, python-multipart) is the ``serve`` extra, imported on first use: without it,
``import vitlab`` and every other command work, and :func:`serve` says in one line what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitlab.errors import MissingExtraError
from vitlab.server.limits import Limits

if TYPE_CHECKING:
    from vitlab.server.app import RunningServer, create_app, serve
    from vitlab.server.model import ServedModel, Upload, model_card

__all__ = ["serve", "create_app", "Limits", "RunningServer", "ServedModel", "Upload", "model_card"]

_LAZY = {"serve": "app", "create_app": "app", "RunningServer": "app",
         "ServedModel": "model", "Upload": "model", "model_card": "model"}
_WEB = ("starlette", "uvicorn", "multipart", "python_multipart")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vitlab.server' has no attribute {name!r}")
    from importlib import import_module

    try:
        module = import_module(f"vitlab.server.{_LAZY[name]}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _WEB:
            raise
        raise MissingExtraError(f"vitlab serve needs the web packages ({e.name} is not installed): "
                                'pip install "vitlab[serve]"') from e
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
