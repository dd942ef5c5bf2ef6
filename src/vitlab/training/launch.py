"""``vitlab.train(config, devices=N)``: N DistributedDataParallel processes started from this one (a notebook's
kernel, a script), as ``torchrun --standalone --nproc_per_node N`` would start them.

The launcher only makes the processes and the rendezvous environment torchrun gives its workers (``MASTER_ADDR``
127.0.0.1 and a free ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, and
``OMP_NUM_THREADS=1`` unless it is set); each process then runs the same :func:`~vitlab.training.engine.fit` a
torchrun worker runs, which joins the process group (gloo on CPU, NCCL on GPUs), shards every global batch and
lets rank 0 write the run. Processes are spawned (``torch.multiprocessing.start_processes``, start method
"spawn"): a notebook's kernel cannot be forked safely, and spawn is the method CUDA needs.

Rank 0 sends its progress calls and its :class:`TrainResult` back through a queue; this process replays the
progress on its own display while it waits, so a notebook shows the same bar as one process. A worker that
raises fails the call with its own exception (its traceback attached), and the other workers are stopped.

Not ``torch.distributed.launcher.api.elastic_launch`` (what torchrun runs): its agent blocks the calling thread
in a monitoring loop, so progress would need a second thread, and a worker's error reaches the caller as a
``ChildFailedError`` whose traceback needs the worker wrapped in ``@record``; the workers' environment is the
same either way.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import sys
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from vitlab.config import TrainConfig
from vitlab.errors import ConfigError
from vitlab.training.engine import TrainResult, fit

POLL_SECONDS = 0.05


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: TrainConfig, devices: int, *, data=None, model=None, normalization=None,
           progress=None) -> TrainResult:
    """Train ``config`` on ``devices`` processes of this machine (one a GPU when it has them, else gloo on the
    CPU); return rank 0's :class:`TrainResult`. ``data``: a ready ``DatasetSplits``, ``model`` and
    ``normalization``: as :func:`fit` takes them, sent to every process; ``progress``: as :func:`fit`'s, driven
    here by rank 0's calls."""
    _check_devices(config, devices)
    _check_picklable(config, data, devices)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(devices),
           "LOCAL_WORLD_SIZE": str(devices), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    messages = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(_worker, args=(env, config, data, model, normalization, messages), nprocs=devices,
                               join=False, start_method="spawn")
    inbox = _Inbox(progress)
    try:
        while not _join(procs, messages, inbox):
            pass
    finally:
        _stop(procs)
    if inbox.result is None:
        raise RuntimeError(f"the {devices} training processes ended without rank 0's result")
    return inbox.result


def _check_devices(config: TrainConfig, devices: int) -> None:
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(f"devices={devices!r} must be a positive number of processes")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"devices={devices} inside a process that torchrun started: torchrun already made the "
                          "processes; call vitlab.train without devices")
    gpus = torch.cuda.device_count() if config.device in ("auto", "cuda") else 0
    if gpus and devices > gpus:
        raise ConfigError(f"devices={devices} but this machine has {gpus} GPU(s): use devices={gpus} or fewer, "
                          "or device=cpu")


def _check_picklable(config: TrainConfig, data, devices: int) -> None:
    """Name the config field (or ``data``) that the spawned processes could not receive, before starting them."""
    values = [(f"TrainConfig.{f.name}", getattr(config, f.name)) for f in dataclasses.fields(config)]
    for name, value in values + [("data", data)]:
        why = _unpicklable(value)
        if why:
            raise ConfigError(f"{name} cannot be sent to the {devices} training processes ({why}): use plain values "
                              "(numbers, strings, lists, dicts) or things defined in an importable module, not a "
                              "lambda or a function or class defined in the notebook")


class _SpawnPickler(pickle.Pickler):
    """A pickler that also refuses what only the interactive ``__main__`` defines: a spawned process starts a
    fresh interpreter, which cannot import a notebook's cells."""

    def persistent_id(self, obj: Any) -> None:
        if getattr(obj, "__module__", None) == "__main__" and not hasattr(sys.modules["__main__"], "__file__"):
            raise pickle.PicklingError(f"{getattr(obj, '__qualname__', type(obj).__qualname__)} is defined in "
                                       "the interactive session")
        return None


def _unpicklable(value: Any) -> str | None:
    """Why ``value`` cannot be pickled for a spawned process, naming the inner key or index; None if it can."""
    if isinstance(value, dict):
        inner = ((f"[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        inner = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        try:
            _SpawnPickler(_Discard()).dump(value)
        except Exception as e:  # pickling raises PicklingError, TypeError or AttributeError
            return str(e)
        return None
    for where, item in inner:
        why = _unpicklable(item)
        if why:
            return f"at {where}: {why}"
    return None


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _worker(index: int, env: dict[str, str], config: TrainConfig, data, model, normalization, messages) -> None:
    """One process: torchrun's environment for rank ``index``, then :func:`fit`; rank 0 reports through
    ``messages``, a rank that fails sends its exception before it exits."""
    os.environ.update(env, RANK=str(index), LOCAL_RANK=str(index))
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # as torchrun's OMP_NUM_THREADS would before torch starts
    try:
        result = fit(config, data=data, model=model, normalization=normalization,
                     progress=_QueueProgress(messages) if index == 0 else None)
    except Exception as e:
        messages.put(("error", (index, _picklable_error(e), traceback.format_exc())))
        raise
    if index == 0:
        messages.put(("result", result))


def _picklable_error(e: Exception) -> Exception | None:
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return None
    return e


class _QueueProgress:
    """Rank 0's progress: each call becomes a message the launching process replays."""

    def __init__(self, messages):
        self.messages = messages

    def start(self, *args) -> None:
        self.messages.put(("start", args))

    def update(self, *args) -> None:
        self.messages.put(("update", args))

    def end(self) -> None:
        self.messages.put(("end", ()))

    def epoch_done(self, row: dict) -> None:
        self.messages.put(("epoch_done", (row,)))


class _Inbox:
    """What the processes sent: rank 0's progress calls (replayed on ``progress`` as they come), its result, and
    the errors of the ranks that failed."""

    def __init__(self, progress):
        self.progress, self.result, self.errors = progress, None, []

    def take(self, messages) -> None:
        while not messages.empty():
            kind, payload = messages.get()
            if kind == "result":
                self.result = payload
            elif kind == "error":
                self.errors.append(payload)
            elif hasattr(self.progress, kind):  # epoch_done is optional
                getattr(self.progress, kind)(*payload)

    def raise_error(self, failure: ProcessException, processes: int):
        """Raise the first failed rank's own error, its traceback attached (or torch's report of a process that
        died before it could send one)."""
        if not self.errors:
            raise RuntimeError(f"training process {failure.error_index} failed before it could report ({failure}); "
                               "its output is above (a notebook's is in the terminal running Jupyter). A script "
                               "must call vitlab.train(devices=N) under `if __name__ == \"__main__\":`") from failure
        rank, error, trace = self.errors[0]
        if error is None:
            raise RuntimeError(f"training process {rank} failed:\n{trace}") from None
        raise error from WorkerError(f"training process {rank} of {processes} failed:\n{trace}")


def _join(procs, messages, inbox: _Inbox) -> bool:
    """Wait a moment for the processes, taking in their messages; whether every one has ended well."""
    try:
        finished = procs.join(timeout=POLL_SECONDS)
    except ProcessException as failure:
        inbox.take(messages)
        inbox.raise_error(failure, len(procs.processes))
    inbox.take(messages)
    return finished


class WorkerError(RuntimeError):
    """The traceback of a training process, attached as the cause of the error it raised."""


def _stop(procs) -> None:
    """End the processes still running (the call failed or was interrupted); no-op after a clean finish."""
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    for p in procs.processes:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


__all__ = ["launch", "free_port", "WorkerError"]
