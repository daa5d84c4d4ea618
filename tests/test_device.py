import random

import numpy as np
import pytest
import torch

from ddpm import device as dev


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("DDPM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert dev.get_device() == torch.device("cpu")
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert dev.get_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.get_device() == torch.device("cuda")


def test_explicit_choice_wins_and_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert dev.get_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        dev.get_device("cuda")
    with pytest.raises(RuntimeError, match="MPS is not available"):
        dev.get_device("mps")
    with pytest.raises(ValueError, match="not a device name"):
        dev.get_device("gpu0")
    monkeypatch.setenv("DDPM_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="device='cuda'"):
        dev.get_device()


def test_autocast_dtype_per_device(monkeypatch):
    assert dev.autocast_dtype("mps") is None
    assert dev.autocast_dtype("cpu", "fp32") is None
    assert dev.autocast_dtype("cpu", "bf16") is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.autocast_dtype("cpu") is None  # emulated bf16 is slower than fp32
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.autocast_dtype("cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="precision='fp16'"):
        dev.autocast_dtype("cpu", "fp16")


def test_cpu_autocast_really_computes_in_bf16():
    a = torch.randn(8, 8)
    with dev.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with dev.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32


def test_seed_everything_repeats():
    dev.seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    dev.seed_everything(7)
    assert first == (random.random(), np.random.rand(), torch.rand(1).item())


def test_keep_freed_memory_in_a_fresh_process():
    # process-wide malloc setting: run it where it cannot leak into the test session
    import subprocess
    import sys

    code = "from ddpm.device import keep_freed_memory; import torch; r = keep_freed_memory(); " \
           "x = [torch.ones(2**23) for _ in range(3)]; del x; print(r)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("True" if sys.platform.startswith("linux") else "False")


def test_native_bf16_is_detected_where_the_cpu_has_it():
    # On Linux the kernel lists the CPU's features; bf16 autocast must be on where they include bf16 maths.
    # (A silent False here makes every "auto" run fp32: ~1.8x slower training on such CPUs.)
    import pathlib
    import sys

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not sys.platform.startswith("linux") or not cpuinfo.exists():
        pytest.skip("needs /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert dev.cpu_has_native_bf16() == native
    assert dev.autocast_dtype("cpu") == (torch.bfloat16 if native else None)


def test_saved_tensor_bytes_counts_what_autograd_keeps_once_per_storage():
    from ddpm.device import saved_tensor_bytes
    x = torch.randn(64, 32, requires_grad=True)
    y = torch.randn(64, 32, requires_grad=True)
    assert saved_tensor_bytes(lambda: x * 2) == 0                     # a scalar multiply keeps nothing
    assert saved_tensor_bytes(lambda: x.exp()) == x.nbytes            # exp keeps its output
    assert saved_tensor_bytes(lambda: x * y) == x.nbytes + y.nbytes   # a product keeps both factors
    assert saved_tensor_bytes(lambda: x * x) == x.nbytes              # the same storage, counted once
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x * y) == 0                 # no graph, nothing kept
