"""Device choice, mixed precision, seeding and memory: the few lines every other module needs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import sys

import numpy as np
import torch


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """CUDA, then MPS, then CPU; an explicit choice wins and must exist.

    `prefer` may be None or "auto" (pick the best), or "cuda", "cuda:1", "mps", "cpu".
    The environment variable DDPM_DEVICE stands in for `prefer` when it is None.
    """
    prefer = prefer if prefer is not None else os.environ.get("DDPM_DEVICE")
    if prefer is None or str(prefer) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(prefer)
    except RuntimeError as err:
        raise ValueError(f"device={prefer!r} is not a device name; use 'auto', 'cuda', 'mps' or 'cpu'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={prefer!r} was asked for but CUDA is not available on this machine "
                               "(torch.cuda.is_available() is False); use device='auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={prefer!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not mps_available():
        raise RuntimeError(f"device={prefer!r} was asked for but MPS is not available "
                           "(needs Apple silicon and a macOS build of torch); use device='auto' or 'cpu'")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={prefer!r} is not supported; use 'auto', 'cuda', 'mps' or 'cpu'")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    # torch.cpu's private probes (the same cpuinfo queries oneDNN uses); torch._C._cpu lost them in 2.14,
    # which silently turned bf16 off: keep both places, and test that it is on where /proc/cpuinfo says so.
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        probes = [getattr(module, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(callable(p) for p in probes):
            return any(bool(p()) for p in probes if callable(p))
    return False


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain fp32.

    precision: "auto" (bf16 on CUDA that supports it and on CPUs with native bf16, fp32 on MPS),
    "bf16" (force it, where the device can), or "fp32".
    """
    device = torch.device(device)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={precision!r} is not one of 'auto', 'bf16', 'fp32'")
    if precision == "fp32" or device.type == "mps":
        # MPS autocast to bf16 is incomplete and often slower; fp32 is the safe choice there.
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, precision: str = "auto"):
    """A torch.autocast context for `device` in the dtype autocast_dtype picks (a no-op for fp32)."""
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not just its launch (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    glibc serves allocations above 32 MiB with mmap and unmaps them on free, so each new tensor that
    large (a 64-channel 128x128 activation at batch 16 is 33.5 MB) is fresh memory that page-faults
    on first touch, at every step. With mmap off and no trimming, a step reuses the previous step's
    memory: ~6% faster at 64 px, ~18% at 128 px, for a few hundred MB more peak RSS (fragmentation).
    A process-wide setting, so entry points call it (python -m ddpm.train, the benchmarks), not the library.
    Returns whether it took effect (False off Linux/glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def saved_tensor_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of what fn() computes: the activation
    memory a training step holds between forward and backward (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
