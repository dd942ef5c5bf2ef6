"""``vitlab serve``: a web page and a JSON API over a trained model, on Starlette and uvicorn.

Routes: ``GET /`` the page (one static HTML file, no build step, nothing from the network); ``POST /api/predict``
(multipart upload, field ``image``, repeatable; options ``top_k``, ``attention`` = none | png | grid, ``heads``);
``GET /api/model``; ``GET /healthz``; ``GET /openapi.json``. Uploads are parsed by Starlette's multipart parser
(python-multipart) and kept in memory: the request is capped and every file is checked against the limits, and a
bad upload gets a 4xx with a one-line ``{"error": ...}``. Inference runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from importlib import resources
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from vitlab._version import __version__
from vitlab.errors import ConfigError, DataError, ImageTooLargeError
from vitlab.loaded import LoadedModel
from vitlab.server.limits import Limits
from vitlab.server.model import ATTENTION, ServedModel, Upload

log = logging.getLogger(__name__)

FIELD = "image"  # the form field that carries the images
OPTIONS = ("top_k", "attention", "heads")


class Refused(Exception):
    """A request the server answers with ``status`` and the one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _mb(n: int) -> str:
    return f"{n / 2**20:.3g} MB"


async def _capped(stream: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it passes ``cap`` bytes (a chunked upload says no length)."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > cap:
            raise Refused(413, f"the request is over the {_mb(cap)} this server takes")
        yield chunk


async def read_form(request: Request, limits: Limits) -> FormData:
    """The multipart form of ``request``, parsed by Starlette's parser under ``limits``, with every file in memory."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise Refused(415, f"send the image as multipart/form-data in field '{FIELD}' (got {kind or 'no body'}), "
                      f"e.g. curl -F {FIELD}=@photo.jpg URL")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_request_bytes:
        raise Refused(413, f"the request is {_mb(int(length))}, over the {_mb(limits.max_request_bytes)} this "
                      f"server takes ({limits.max_files} files of at most {_mb(limits.max_bytes)})")
    parser = MultiPartParser(request.headers, _capped(request.stream(), limits.max_request_bytes),
                             max_files=limits.max_files, max_fields=len(OPTIONS), max_part_size=1024)
    parser.spool_max_size = limits.max_request_bytes  # uploads stay in memory: none is ever written to disk
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise Refused(400, f"{e.message} (send at most {limits.max_files} files in field '{FIELD}')") from None


async def read_uploads(form: FormData, limits: Limits) -> list[Upload]:
    """The files of field ``image``, checked: present, none empty, none over ``limits.max_bytes``."""
    uploads = []
    for name, value in form.multi_items():
        if not isinstance(value, UploadFile):
            continue
        if name != FIELD:
            raise Refused(400, f"a file came in field '{name}'; send images in field '{FIELD}' "
                          f"(curl -F {FIELD}=@photo.jpg)")
        data = await value.read()
        label = value.filename or FIELD
        if not data:
            raise Refused(400, f"{label}: empty upload (0 bytes); choose an image file")
        if len(data) > limits.max_bytes:
            raise Refused(413, f"{label}: {_mb(len(data))} is over the {_mb(limits.max_bytes)} limit per file; "
                          "send a smaller image")
        uploads.append(Upload(name=label, data=data))
    if not uploads:
        raise Refused(400, f"no image in the request; send one in field '{FIELD}' (curl -F {FIELD}=@photo.jpg)")
    return uploads


def read_options(form: FormData, query: Any) -> dict[str, Any]:
    """``top_k``, ``attention`` and ``heads`` from the form's text fields, else the query string."""
    given = {**query, **{k: v for k, v in form.multi_items() if isinstance(v, str)}}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise Refused(400, f"unknown field '{unknown[0]}'; /api/predict takes {FIELD} (files) and "
                      f"{', '.join(OPTIONS)}")
    top_k = given.get("top_k", "5")
    if not top_k.isdigit() or int(top_k) < 1:
        raise Refused(400, f"top_k={top_k!r} must be a whole number, at least 1")
    attention = given.get("attention", "none")
    if attention not in ATTENTION:
        raise Refused(400, f"attention={attention!r} is not one of {', '.join(ATTENTION)}")
    heads = given.get("heads", "false").lower()
    if heads not in ("true", "false", "1", "0"):
        raise Refused(400, f"heads={heads!r} must be true or false")
    return {"top_k": int(top_k), "attention": attention, "heads": heads in ("true", "1")}


def _error(status: int, message: str) -> JSONResponse:
    log.info("refused (%d): %s", status, message)
    return JSONResponse({"error": message}, status_code=status)


def predict_endpoint(served: ServedModel, limits: Limits):
    """``POST /api/predict`` over ``served``: the uploads read under ``limits``, predicted in a worker thread;
    each refusal is a status and a one-line JSON error."""

    async def predict(request: Request) -> JSONResponse:
        """
        summary: Top-k classes of uploaded images, and their attention maps when asked.
        requestBody:
          content:
            multipart/form-data:
              schema:
                type: object
                properties:
                  image: {type: array, items: {type: string, format: binary}}
                  top_k: {type: integer, default: 5}
                  attention: {type: string, enum: [none, png, grid], default: none}
                  heads: {type: boolean, default: false}
        responses:
          200: {description: '{"model", "results": [{"file", "top": [{"label", "probability"}], "attention"}],
            "seconds"}'}
          400: {description: 'a malformed request: {"error": reason}'}
          413: {description: 'a file, an image or the request over the limits'}
          415: {description: 'not multipart, or a file that is not a readable image'}
        """
        start = time.perf_counter()
        try:
            form = await read_form(request, limits)
            try:
                uploads = await read_uploads(form, limits)
                options = read_options(form, request.query_params)
            finally:
                await form.close()
            results = await run_in_threadpool(served.predict, uploads, **options)
        except Refused as e:
            return _error(e.status, str(e))
        except ImageTooLargeError as e:
            return _error(413, str(e))
        except ConfigError as e:
            return _error(400, str(e))
        except DataError as e:
            return _error(415, str(e))
        return JSONResponse({"model": served.card["name"], "results": results,
                             "seconds": round(time.perf_counter() - start, 6)})

    return predict


def create_app(loaded: LoadedModel, *, limits: Limits | None = None) -> Starlette:
    """The ASGI app that serves ``loaded`` (a model :func:`vitlab.load` loaded): the page, ``POST /api/predict``
    (:func:`predict_endpoint`), ``GET /api/model``, ``GET /healthz`` and ``GET /openapi.json``."""
    limits = limits or Limits()
    served = ServedModel(loaded, max_pixels=limits.max_pixels)
    log.info("serving %s (%d classes, %s px) from %s", served.card["name"], len(loaded.labels),
             "x".join(map(str, loaded.preprocess.image_size)), loaded.path)
    page = resources.files("vitlab.server").joinpath("static/index.html").read_text(encoding="utf-8")
    schemas = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "vitlab serve", "version": __version__}})

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def model(request: Request) -> JSONResponse:
        """
        summary: The model served, its classes, input size, normalisation and its run's test metrics.
        responses:
          200: {description: "name, classes, image_size, channels, normalization, metrics"}
        """
        return JSONResponse(served.card)

    async def healthz(request: Request) -> JSONResponse:
        """
        summary: Liveness.
        responses:
          200: {description: '{"status": "ok"}'}
        """
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(schemas.get_schema(routes=routes))  # from the YAML in the endpoints' docstrings

    routes = [Route("/", index), Route("/api/predict", predict_endpoint(served, limits), methods=["POST"]), Route("/api/model", model),
              Route("/healthz", healthz), Route("/openapi.json", openapi, include_in_schema=False)]
    app = Starlette(routes=routes)
    app.state.served = served  # the model, its card and its lock, for whoever holds the app
    return app


class RunningServer:
    """``app`` served by uvicorn in a background thread (``serve(..., background=True)``, tests, notebooks):
    ``url``, ``stop()``; a context manager. ``port=0`` takes a free port."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # bound here, so that port 0 gives a free port and `url` names it
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="vitlab-serve")
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped while starting; see its log")
            time.sleep(0.01)

    def stop(self) -> None:
        """Finish the requests in flight, then stop the server and its thread."""
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(loaded: LoadedModel, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, background: bool = False, log_level: str = "info") -> RunningServer | None:
    """Serve ``loaded`` (a model :func:`vitlab.load` loaded; ``vitlab.serve`` takes a checkpoint path) on
    ``http://host:port``: the page at ``/`` and the JSON API (see :func:`create_app`). Binds 127.0.0.1 unless
    ``host`` says otherwise. Blocks until Ctrl-C; with ``background=True`` (a notebook, a test) returns a
    :class:`RunningServer` at once (``port=0``: a free port)."""
    app = create_app(loaded, limits=limits)
    if background:
        return RunningServer(app, host, port, log_level)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return None
