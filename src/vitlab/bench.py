"""Throughput, achieved FLOP/s and utilisation of a ViT's training steps or inference batches.

:func:`benchmark` times real training steps (the step ``fit()`` runs, :class:`~vitlab.training.TrainStep`:
on-device normalisation and augmentation, forward, soft-target loss with label smoothing, backward, clipping,
AdamW, the schedule, EMA, as a :class:`~vitlab.config.TrainConfig` says) or inference batches, on synthetic data
that lives on the device, after warm-up, and reports images/s (median over repeats, with min and max), the
step time, peak memory, FLOPs per image (counted analytically by :meth:`ViTConfig.flops_per_image`), the
achieved FLOP/s and the utilisation: achieved / the device's matmul peak measured in the same run and the
same precision (:func:`matmul_peak`).

It also times any ``nn.Module`` that maps images to logits (a Hugging Face ``ViTForImageClassification``
too), which is how ``benchmarks/compare_peers.py`` runs the peer under exactly the same loop.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import weakref
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vitlab._device import (AUTOCAST_DTYPES, autocast, cpu_has_fast_bf16, default_precision, resolve_device,
                            resolve_precision)
from vitlab.config import TrainConfig, ViTConfig
from vitlab.errors import ConfigError
from vitlab.models import create_model
from vitlab.training.step import logits_of, make_train_step

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, **AUTOCAST_DTYPES}  # a precision's matmul dtype
MODES = ("train", "infer")

# Training costs forward + backward; the backward of a matmul is two matmuls of the same size, so a training
# step is counted as 3x the forward FLOPs (the usual convention, e.g. in the PaLM/MFU accounting).
TRAIN_FLOPS_FACTOR = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32", *, size: int | None = None,
                repeats: int = 5) -> float:
    """The device's measured matmul rate in FLOP/s: the best of ``repeats`` square matmuls of ``size``.

    The reference for utilisation, measured in the same process and precision as the model, so a busy or
    throttled machine lowers both. ``size`` defaults to 2048 on CPU and 8192 on GPU (large enough to run at
    full rate, short enough to take well under a second).
    """
    dev = resolve_device(device)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    n = size or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    out = torch.empty(n, n, device=dev, dtype=dt)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernels, clocks
    _sync(dev)
    inner = 10 if dev.type == "cuda" else 1
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(dev)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * n**3 / best


# ---------------------------------------------------------------------------------------------- memory
class LiveTensorBytes:
    """Peak bytes of tensor storages created while active (CPU): a dispatch mode that counts every new
    storage an operator returns and a finaliser that uncounts it when it is freed.

    This sees exactly what the caching-free CPU allocator is asked for by PyTorch operators (activations
    saved for backward, gradients, optimizer state created in the step, temporaries), independent of other
    processes and of the allocator's page reuse, so two models measured one after the other in one process
    compare fairly. Storages that existed before (parameters, the batch) are not counted: add them.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        self._mode = None

    def _free(self, key: int, nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def _count(self, func, args, kwargs, out) -> None:
        from torch.utils._pytree import tree_flatten

        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            # Views and in-place results share an input's storage: nothing new was allocated.
            if nbytes == 0 or key in inputs or key in self._seen:
                continue
            self._seen[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                tracker._count(func, args, kwargs, out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._mode = None


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _tensor_bytes(tensors)


# ---------------------------------------------------------------------------------------------- steps
def make_step(model: nn.Module, *, mode: str, precision: str, device: torch.device, image_size: tuple[int, int],
              channels: int, num_classes: int, config: TrainConfig | None = None, steps_per_epoch: int = 1000,
              normalization: tuple[Sequence[float], Sequence[float]] | None = None,
              generator: torch.Generator | None = None, forward: Callable | None = None) -> Callable:
    """A closure ``step(images, labels)`` doing one training step or one inference batch, without host syncs.

    ``train``: the :class:`~vitlab.training.TrainStep` that ``fit()`` runs for ``config`` (default: the default
    TrainConfig: AdamW, warmup + cosine over ``config.epochs`` x ``steps_per_epoch`` steps, clipping, label
    smoothing; EMA and augmentation when the config has them), on uint8 images ``(B, channels, *image_size)`` and
    int labels, normalised with ``normalization`` (mean, std; default 0.5 per channel), drawing its augmentation from ``generator``; the
    closure's ``train_step`` attribute is that step.
    ``infer``: the forward under autocast and ``inference_mode`` on float images. ``forward`` replaces ``model``
    for the forward call (a ``torch.compile``-d model).
    """
    fwd = model if forward is None else forward  # (a compiled module has no truth value: it asks len())
    if mode == "infer":
        def infer(images, labels):
            with torch.inference_mode(), autocast(device, precision):
                return logits_of(fwd(images))
        return infer
    mean, std = normalization or ((0.5,) * channels, (0.5,) * channels)
    train_step = make_train_step(model, config or TrainConfig(), device=device, precision=precision,
                                 steps_per_epoch=steps_per_epoch, num_classes=num_classes, image_size=image_size,
                                 mean=mean, std=std, forward=fwd)

    def train(images, labels):
        return train_step([(images, labels)], generator)
    train.train_step = train_step
    return train


def _threads(threads: int | None):
    """Context that sets torch's intra-op threads for the run and puts the old value back."""
    class _Ctx:
        def __enter__(self):
            self.old = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _Ctx()


def time_alternating(steps: dict[str, Callable], inputs: dict[str, tuple], *, repeats: int = 5,
                     steps_per_repeat: int = 1, warmup: int = 2, device: str | torch.device = "cpu"
                     ) -> dict[str, list[float]]:
    """Seconds per step of several step closures, interleaved: one repeat of each in turn, ``repeats`` times.

    On a shared machine the load changes from second to second; interleaving exposes every contender to
    the same load, so the ratio of their times is far steadier than either time (report the ratio).
    ``inputs[name]`` is the ``(images, labels)`` for ``steps[name]``.
    """
    dev = torch.device(device)
    for name, step in steps.items():
        for _ in range(warmup):
            step(*inputs[name])
    _sync(dev)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_repeat):
                step(*inputs[name])
            _sync(dev)
            times[name].append((time.perf_counter() - t0) / steps_per_repeat)
    return times


# ---------------------------------------------------------------------------------------------- benchmark
def _resolve_model(model_or_preset, overrides: dict[str, Any]) -> tuple[nn.Module, str, ViTConfig | None]:
    if isinstance(model_or_preset, nn.Module):
        config = getattr(model_or_preset, "config", None)
        cfg = config if isinstance(config, ViTConfig) else None
        return model_or_preset, type(model_or_preset).__name__, cfg
    if isinstance(model_or_preset, ViTConfig):
        model = create_model(model_or_preset, **overrides)
        return model, "custom", model.config
    model = create_model(str(model_or_preset), **overrides)
    return model, str(model_or_preset), model.config


def _input_spec(model: nn.Module, cfg: ViTConfig | None, flops_per_image, image_size, in_channels,
                num_classes) -> tuple[tuple[int, int], int, int, float]:
    """(image size, channels, classes, forward FLOPs per image) of a vitlab model or, from the arguments and its
    Hugging Face-style config, of another module."""
    if cfg is not None:
        flops = flops_per_image if flops_per_image is not None else cfg.flops_per_image()
        return tuple(cfg.image_size), cfg.in_channels, cfg.num_classes, flops
    hf = getattr(model, "config", None)
    size = image_size or getattr(hf, "image_size", None)
    classes = num_classes or getattr(hf, "num_labels", None)
    if size is None or classes is None or flops_per_image is None:
        raise ConfigError("benchmark of a non-vitlab module needs image_size, num_classes and flops_per_image")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size, in_channels or getattr(hf, "num_channels", 3), classes, flops_per_image


def deit_augmentation(image_size: tuple[int, int], channels: int) -> dict[str, Any]:
    """TrainConfig fields of DeiT-style augmentation (pad-and-crop instead of random resized crop for small
    images): flip, RandAugment m9 n2 (RGB), random erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1."""
    small = max(image_size) <= 64
    return dict(crop_padding=4 if small else 0, hflip=True, random_resized_crop=None if small else [0.08, 1.0],
                auto_augment="rand-m9-n2" if channels == 3 else None, random_erasing=0.25, mixup_alpha=0.8,
                cutmix_alpha=1.0, label_smoothing=0.1)


@dataclass(frozen=True)
class BenchOptions:
    """What :func:`benchmark` times and how (each field is also a keyword of :func:`benchmark`).

    ``precision``: "fp32", "bf16" or "fp16" autocast (``None`` or "auto": :func:`resolve_precision`'s rule, as
    training; fp16 needs a CUDA GPU). ``compile``: ``torch.compile`` the model (compile time is reported
    separately, not in the timings). ``steps_per_repeat``: ``None`` picks enough steps for ~0.3 s per repeat (GPU
    steps take milliseconds). ``gradient_checkpointing``: recompute each block in backward (vitlab models) to save
    memory. ``check_syncs`` (GPU): make a host-device sync inside a timed step an error. ``config`` (train): the
    :class:`~vitlab.config.TrainConfig` whose training step is timed (default: the defaults); ``augment`` adds
    DeiT-style augmentation to it (:func:`deit_augmentation`), so the figures include the on-device input
    pipeline. ``peak_flops``: reuse a measured :func:`matmul_peak` instead of measuring it again.
    ``flops_per_image``, ``image_size``, ``in_channels``, ``num_classes``: what a module that is not a vitlab
    model cannot say itself (a Hugging Face-style ``config.image_size`` etc. is read when it has one).
    """

    batch: int = 32
    mode: str = "train"
    precision: str | None = "fp32"
    compile: bool = False
    device: str | None = "cpu"
    repeats: int = 5
    warmup: int = 2
    steps_per_repeat: int | None = None
    threads: int | None = None
    gradient_checkpointing: bool = False
    measure_peak: bool = True
    measure_memory: bool = True
    seed: int = 0
    peak_flops: float | None = None
    check_syncs: bool = False
    augment: bool = False
    config: TrainConfig | None = None
    flops_per_image: float | None = None
    image_size: Any = None
    in_channels: int | None = None
    num_classes: int | None = None


def benchmark(model_or_preset: str | ViTConfig | nn.Module, options: BenchOptions | None = None,
              **settings: Any) -> dict[str, Any]:
    """Time ``repeats`` x ``steps_per_repeat`` training steps or inference batches; return the figures.

    ``model_or_preset``: a preset name (``vitlab models``), a :class:`ViTConfig`, or any module mapping
    ``(B, C, H, W)`` images to logits. ``settings``: :class:`BenchOptions` fields (``batch=8, mode="infer"``),
    over ``options``; any other keyword is a ViTConfig field of the preset (``depth=2``).
    Returns a dict: model, mode, batch, precision, device, threads, compile, images_per_s (median),
    images_per_s_min, images_per_s_max, step_time_s, flops_per_image (per image per step: x3 in training),
    achieved_flops, peak_flops, utilisation, peak_memory_bytes, memory_method, compile_time_s,
    num_parameters, repeats, steps_per_repeat, torch.
    """
    known = {f.name for f in fields(BenchOptions)}
    o = replace(options or BenchOptions(), **{k: v for k, v in settings.items() if k in known})
    overrides = {k: v for k, v in settings.items() if k not in known}
    if o.mode not in MODES:
        raise ConfigError(f"mode={o.mode!r} is not one of {', '.join(MODES)}")
    dev = resolve_device(o.device)
    precision = resolve_precision(o.precision, dev)
    if o.repeats < 1 or o.batch < 1:
        raise ConfigError(f"repeats={o.repeats} and batch={o.batch} must be >= 1")
    model, name, cfg = _resolve_model(model_or_preset, overrides)
    size, chans, classes, flops_fwd = _input_spec(model, cfg, o.flops_per_image, o.image_size, o.in_channels,
                                                  o.num_classes)
    config = o.config or TrainConfig()
    if o.augment and o.mode == "train":
        config = config.replace(**deit_augmentation(size, chans))
    with _threads(o.threads):
        measured = _measure(model, name, o, config, dev, precision, size, chans, classes)
    step_time = statistics.median(measured["times"])
    flops = (TRAIN_FLOPS_FACTOR if o.mode == "train" else 1) * float(flops_fwd)
    ips = [o.batch / t for t in measured["times"]]
    achieved = flops * o.batch / step_time
    augmented = o.mode == "train" and bool(config.hflip or config.crop_padding or config.random_resized_crop
                                           or config.auto_augment or config.mixup_alpha or config.cutmix_alpha)
    peak = measured["peak"]
    return dict(
        model=name, mode=o.mode, batch=o.batch, precision=precision, device=str(dev),
        device_name=_device_name(dev), threads=measured["threads"] if dev.type == "cpu" else None,
        compile=o.compile, gradient_checkpointing=o.gradient_checkpointing, augment=augmented,
        images_per_s=statistics.median(ips), images_per_s_min=min(ips), images_per_s_max=max(ips),
        step_time_s=step_time, flops_per_image=flops, achieved_flops=achieved, peak_flops=peak,
        utilisation=(achieved / peak) if peak else None, peak_memory_bytes=measured["memory"],
        memory_method=measured["memory_method"], compile_time_s=measured["first"] if o.compile else None,
        num_parameters=sum(p.numel() for p in model.parameters()), repeats=o.repeats,
        steps_per_repeat=measured["steps_per_repeat"], torch=torch.__version__)


def _measure(model: nn.Module, name: str, o: BenchOptions, config: TrainConfig, dev: torch.device, precision: str,
             size: tuple[int, int], chans: int, classes: int) -> dict[str, Any]:
    """Run and time the steps :func:`benchmark` asks for: the per-repeat times, the first call's time, the peak
    memory, the device's matmul peak (before and after the timed steps: the larger) and the threads used."""
    torch.manual_seed(o.seed)
    model = model.to(dev)
    model.train(o.mode == "train")
    if o.gradient_checkpointing:
        if not hasattr(model, "set_gradient_checkpointing"):
            raise ConfigError(f"{name} has no gradient checkpointing switch")
        model.set_gradient_checkpointing(True)
    gen = torch.Generator(device=dev).manual_seed(o.seed)
    step = make_step(model, mode=o.mode, precision=precision, device=dev, image_size=size, channels=chans,
                     num_classes=classes, config=config, generator=gen,
                     forward=torch.compile(model) if o.compile else None)
    if o.mode == "train":  # uint8 images, as the loader gives them; the step normalises and augments them
        images = torch.randint(0, 256, (o.batch, chans, *size), device=dev, generator=gen, dtype=torch.uint8)
    else:
        images = torch.randn(o.batch, chans, *size, device=dev, generator=gen)
    labels = torch.randint(0, max(classes, 1), (o.batch,), device=dev, generator=gen)
    peak_before = matmul_peak(dev, precision) if o.peak_flops is None and o.measure_peak else None
    times, steps_per_repeat, first = _time_steps(step, images, labels, dev, repeats=o.repeats, warmup=o.warmup,
                                                 steps_per_repeat=o.steps_per_repeat, check_syncs=o.check_syncs)
    memory, method = _peak_memory(model, step, images, labels, dev) if o.measure_memory else (None, None)
    peak = o.peak_flops
    if peak is None and o.measure_peak:  # the larger is the device's peak (load changes the other)
        peak = max(peak_before, matmul_peak(dev, precision))
    if o.gradient_checkpointing:
        model.set_gradient_checkpointing(False)
    return dict(times=times, steps_per_repeat=steps_per_repeat, first=first, memory=memory, memory_method=method,
                peak=peak, threads=torch.get_num_threads())


def _time_steps(step: Callable, images, labels, dev: torch.device, *, repeats: int, warmup: int,
                steps_per_repeat: int | None, check_syncs: bool) -> tuple[list[float], int, float]:
    """(seconds per step of each repeat, steps per repeat, seconds of the first call) after warm-up steps."""
    t0 = time.perf_counter()
    step(images, labels)  # first call: compile, lazy init, optimizer state
    _sync(dev)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step(images, labels)
    _sync(dev)
    if steps_per_repeat is None:
        t0 = time.perf_counter()
        step(images, labels)
        _sync(dev)
        steps_per_repeat = max(1, min(200, int(0.3 / max(time.perf_counter() - t0, 1e-6))))
    if dev.type == "cuda" and check_syncs:
        torch.cuda.set_sync_debug_mode("error")
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps_per_repeat):
                step(images, labels)
            _sync(dev)
            times.append((time.perf_counter() - t0) / steps_per_repeat)
    finally:
        if dev.type == "cuda" and check_syncs:
            torch.cuda.set_sync_debug_mode("default")
    return times, steps_per_repeat, first


def _peak_memory(model, step, images, labels, dev) -> tuple[int, str]:
    """Peak memory of one more step: CUDA allocator peak on GPU; live tensor bytes on CPU (see
    :class:`LiveTensorBytes`), both including parameters, gradients, optimizer (and EMA, Lookahead) state and the
    batch."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step(images, labels)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
    train_step = getattr(step, "train_step", None)
    before = _state_bytes(model, train_step.optimizer if train_step else None) + _tensor_bytes([images, labels])
    for copy_ in (train_step.ema, train_step.slow) if train_step is not None else ():
        if copy_ is not None:
            before += _state_bytes(copy_, None)
    with LiveTensorBytes() as tracker:
        step(images, labels)
    return before + tracker.peak, "live tensor bytes (dispatch-mode tracker)"


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def format_result(r: dict[str, Any]) -> str:
    """A benchmark result as a few human-readable lines (what ``vitlab bench`` prints)."""
    mem = r["peak_memory_bytes"]
    lines = [
        f"{r['model']}  {r['mode']}  batch {r['batch']}  {r['precision']}  {r['device']} "
        f"({r['device_name']}{', %d threads' % r['threads'] if r['threads'] else ''})"
        f"{'  compiled' if r['compile'] else ''}{'  checkpointing' if r['gradient_checkpointing'] else ''}"
        f"{'  with augmentation' if r.get('augment') else ''}",
        f"  images/s        {r['images_per_s']:.1f}  (min {r['images_per_s_min']:.1f}, max {r['images_per_s_max']:.1f}, "
        f"{r['repeats']} repeats x {r['steps_per_repeat']} steps)",
        f"  step time       {r['step_time_s'] * 1e3:.1f} ms",
        f"  FLOPs/image     {r['flops_per_image'] / 1e9:.3f} G ({'3x forward' if r['mode'] == 'train' else 'forward'})",
        f"  achieved        {r['achieved_flops'] / 1e9:.1f} GFLOP/s",
    ]
    if r["peak_flops"]:
        lines.append(f"  matmul peak     {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['precision']}, measured now)")
        lines.append(f"  utilisation     {100 * r['utilisation']:.1f}%")
    if mem is not None:
        lines.append(f"  peak memory     {mem / 2**20:.1f} MiB ({r['memory_method']})")
    if r["compile_time_s"] is not None:
        lines.append(f"  compile + 1st   {r['compile_time_s']:.1f} s")
    return "\n".join(lines)


__all__ = ["benchmark", "matmul_peak", "time_alternating", "make_step", "deit_augmentation", "LiveTensorBytes",
           "default_precision", "cpu_has_fast_bf16", "format_result", "resolve_device"]
