"""Devices and precisions: which device ``auto`` means, and whether bf16 pays on it (bottom layer)."""

from __future__ import annotations

import contextlib
import os

import torch

from vitlab.errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda (this process's local GPU), else mps, else cpu; otherwise the named device, checked."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    name = str(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"TrainConfig.device={name!r} but CUDA is not available here: use device=auto or cpu")
        return torch.device(name) if ":" in name else torch.device("cuda", local_rank)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("TrainConfig.device='mps' but MPS is not available here: use device=auto or cpu")
    return torch.device(name)


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 matmul has no native instructions
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matmul instructions (AVX512-BF16 or AMX), where bf16 autocast pays, and
    oneDNN may use them (``ONEDNN_MAX_CPU_ISA=AVX2``, which makes a CPU behave as one without them, says no)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return any(flag in _cpuinfo() for flag in (" avx512_bf16", " amx_bf16"))


def _cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what TrainConfig.precision, --precision and bench accept


def resolve_precision(precision: str | None, device: str | torch.device, *, field: str = "precision") -> str:
    """The one rule for a precision: "auto" (or None) is :func:`default_precision` of ``device``; a name that is
    not one of :data:`PRECISIONS`, or fp16 off a CUDA GPU (CPU fp16 matmul runs at a fraction of fp32's speed), is
    a :class:`~vitlab.errors.ConfigError` naming ``field``. Returns "fp32", "bf16" or "fp16"."""
    dev = torch.device(device)
    if precision is None or precision == "auto":
        return default_precision(dev)
    if precision not in PRECISIONS:
        raise ConfigError(f"{field}={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"{field}='fp16' needs a CUDA GPU (device is {dev.type}): use bf16 or fp32")
    return precision


def default_precision(device: str | torch.device) -> str:
    """The fast default: bf16 on a GPU that supports it and on CPUs with native bf16 matmul, else fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_fast_bf16() else "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device``: none for "fp32", else bf16 or fp16 autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def sum_dtype(device: str | torch.device) -> torch.dtype:
    """float64 for running sums (exact enough over an epoch), float32 where the device has no float64 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
