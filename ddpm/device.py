"""Device choice, mixed precision, seeding and memory: the few lines every other module needs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import re
import sys
import warnings

import numpy as np
import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # what `precision` may be, here and in every config and CLI
_FORCED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
_OLD_GPU_TORCH = "pip install torch==2.7.1 torchvision==0.22.1 --index-url https://download.pytorch.org/whl/cu126"


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """CUDA, then MPS, then CPU; an explicit choice wins and must exist.

    `prefer` may be None or "auto" (pick the best), or "cuda", "cuda:1", "mps", "cpu".
    The environment variable DDPM_DEVICE stands in for `prefer` when it is None.
    A GPU this torch build has no kernels for (see cuda_arch_supported) is an error when CUDA was asked
    for, and a warning and a fall back to MPS or the CPU under "auto".
    """
    prefer = prefer if prefer is not None else os.environ.get("DDPM_DEVICE")
    if prefer is None or str(prefer) == "auto":
        return _auto_device()
    try:
        device = torch.device(prefer)
    except RuntimeError as err:
        raise ValueError(f"device={prefer!r} is not a device name; use 'auto', 'cuda', 'mps' or 'cpu'") from err
    if device.type == "cuda":
        _check_cuda(device, prefer)
    elif device.type == "mps" and not mps_available():
        raise RuntimeError(
            f"device={prefer!r} was asked for but MPS is not available "
            "(needs Apple silicon and a macOS build of torch); use device='auto' or 'cpu'"
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={prefer!r} is not supported; use 'auto', 'cuda', 'mps' or 'cpu'")
    return device


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        problem = unsupported_gpu_message(torch.device("cuda"))
        if problem is None:
            return torch.device("cuda")
        warnings.warn(problem, stacklevel=3)  # a GPU we cannot use is not worth stopping "auto" for
    return torch.device("mps") if mps_available() else torch.device("cpu")


def _check_cuda(device: torch.device, prefer) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device={prefer!r} was asked for but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device='auto' or 'cpu'"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={prefer!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    problem = unsupported_gpu_message(device)
    if problem is not None:
        raise RuntimeError(problem)


def cuda_arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with kernels for `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of `capability`.

    CUDA's rules: a cubin sm_XY runs on X.Z for Z >= Y (sm_80 code runs on an sm_89 L4: binary compatibility
    within a major version) and sm_XYa only on X.Y itself; PTX compute_XY is compiled at load time for any
    GPU >= X.Y. The torch 2.14.1+cu130 wheel this project is tested with lists sm_75, sm_80, sm_86, sm_90,
    sm_100 and sm_120 and no PTX: a T4 (7.5) and anything newer runs, a P100 (6.0) or V100 (7.0) does not.
    A list with no sm_/compute_ entry (ROCm's gfx names, a CPU build) says nothing: taken as supported.
    """
    archs = [m.groups() for m in (re.fullmatch(r"(sm|compute)_(\d+)([af]?)", a) for a in arch_list) if m]
    if not archs:
        return True
    gpu = tuple(capability)
    for kind, number, suffix in archs:
        arch = divmod(int(number), 10)  # "sm_120" -> (12, 0)
        if suffix == "a":  # architecture-specific code: that exact GPU only
            if gpu == arch:
                return True
        elif kind == "compute" and not suffix:  # PTX: JIT-compiled for any newer GPU
            if gpu >= arch:
                return True
        elif gpu[0] == arch[0] and gpu[1] >= arch[1]:  # a cubin (or family code): its major, same or newer minor
            return True
    return False


def unsupported_gpu_message(device: torch.device | str) -> str | None:
    """None when this torch build has kernels for the GPU `device`; else what is wrong and what to do."""
    device = torch.device(device)
    capability = tuple(torch.cuda.get_device_capability(device))
    arch_list = list(torch.cuda.get_arch_list())
    if cuda_arch_supported(capability, arch_list):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    oldest = min((divmod(int(n), 10) for n in re.findall(r"(?:sm|compute)_(\d+)", " ".join(arch_list))), default=None)
    if oldest is not None and capability < oldest:  # the usual case: a GPU newer wheels dropped (P100, V100)
        fix = (
            "install a torch build that still covers it, e.g. for sm_60/sm_70 a CUDA 12.6 wheel of torch 2.7: "
            f"`{_OLD_GPU_TORCH}`"
        )
    else:
        fix = f"install a torch build whose arch list includes {sm}"
    return (
        f"Found {torch.cuda.get_device_name(device)} ({sm}), but this torch build (torch {torch.__version__}, "
        f"arch list {', '.join(arch_list)}) has no kernels for it. To use it, {fix} (check the install "
        "matrix at https://pytorch.org/get-started/locally/); or use the CPU: --train.device cpu (device='cpu')."
    )


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    # torch.cpu's private probes (the same cpuinfo queries oneDNN uses); torch._C._cpu lost them in 2.14,
    # which silently turned bf16 off: keep both places, and test that it is on where /proc/cpuinfo says so.
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        probes = [getattr(module, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(callable(p) for p in probes):
            return any(bool(p()) for p in probes if callable(p))
    return False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")


def _cuda_has_fast_bf16(device: torch.device) -> bool:
    # Ampere (sm_80) and newer compute bf16 in hardware. Not torch.cuda.is_bf16_supported(): it counts
    # emulation by default (including_emulation=True) and so says True on a T4, V100 or P100, which have
    # no bf16 tensor cores: there bf16 gains nothing over fp32, while fp16 runs on their tensor cores.
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain fp32.

    precision (one of PRECISIONS): "auto" picks bf16 on CUDA GPUs from sm_80 (Ampere) on, fp16 on older
    ones (T4 sm_75, V100 sm_70: they have fast fp16 but no fast bf16; train with a GradScaler, see
    needs_grad_scaler), bf16 on CPUs with native bf16, else fp32 on the CPU, and fp32 on MPS (its bf16
    autocast is incomplete and often slower). "bf16", "fp16", "fp32" force that dtype (fp16 on the CPU
    is slow but computes); bf16 on a CUDA GPU below sm_80 is refused.
    """
    device = torch.device(device)
    check_precision(precision)
    if precision == "auto":
        return _auto_dtype(device)
    if precision == "bf16" and device.type == "cuda" and not _cuda_has_fast_bf16(device):
        raise ValueError(
            f"precision='bf16' on {torch.cuda.get_device_name(device)} ({_sm(device)}): this GPU has "
            "no fast bf16 (no bf16 tensor cores before sm_80): it would be emulated; "
            "use precision='fp16' (with a GradScaler) or 'auto', which picks it"
        )
    return _FORCED[precision]


def _auto_dtype(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_has_fast_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None  # MPS, and CPUs that would emulate bf16 (slower than fp32)


def needs_grad_scaler(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether training in this precision needs a GradScaler: fp16's narrow range underflows small gradients
    to zero unless the loss is scaled up first; bf16 has fp32's range and needs none."""
    return autocast_dtype(device, precision) == torch.float16


def describe_precision(device: torch.device | str, precision: str = "auto") -> str:
    """One line for the log: what autocast_dtype picks and why, e.g.
    "fp16 autocast + GradScaler (Tesla T4, sm_75: no fast bf16)"."""
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    what = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[dtype]
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, {_sm(device)}"
        where += "" if _cuda_has_fast_bf16(device) else ": no fast bf16"
    elif device.type == "cpu":
        where = "CPU " + ("with native bf16" if cpu_has_native_bf16() else "without native bf16: it would be emulated")
    else:
        where = device.type.upper() + (": its bf16 autocast is incomplete and often slower" if dtype is None else "")
    return f"{what} ({where}{'' if precision == 'auto' else f'; precision={precision!r} asked for'})"


def _sm(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


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


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor (a batch, noise) to `device` the way that device wants it.

    CUDA: from pinned memory, non-blocking, so the copy overlaps with queued GPU work; a pageable source
    would make the host wait for it. The pinned copy is torch's: its caching host allocator keeps the
    block until the copy has run, so `t` may be freed or changed as soon as this returns.
    MPS: blocking. A non-blocking copy may read the source after this function returns, when a pageable
    temporary has been freed (pytorch/pytorch issues report MPS non_blocking copies reading released
    memory), and MPS shares memory with the CPU, so there is little to overlap anyway.
    CPU, or `t` already off the host: a plain .to().
    """
    device = torch.device(device)
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
