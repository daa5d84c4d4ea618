import random

import numpy as np
import pytest
import torch

from ddpm import device as dev

# torch.cuda.get_arch_list() of the torch 2.14.1+cu130 wheel the project is tested with
ARCH_LIST = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
GPUS = {
    "P100": ("Tesla P100-PCIE-16GB", (6, 0)),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0)),
    "T4": ("Tesla T4", (7, 5)),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0)),
    "L4": ("NVIDIA L4", (8, 9)),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0)),
}


def fake_gpu(monkeypatch, gpu, arch_list=ARCH_LIST):
    """Pretend one CUDA GPU of GPUS[gpu] is present, under a torch build with kernels for `arch_list`."""
    name, capability = GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))

    def emulation_counts(including_emulation=True):  # True on a T4 too: autocast_dtype must not ask it
        raise AssertionError("torch.cuda.is_bf16_supported() was consulted")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulation_counts)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("DDPM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert dev.get_device() == torch.device("cpu")
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert dev.get_device("auto") == torch.device("mps")
    fake_gpu(monkeypatch, "A100")
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
    assert dev.autocast_dtype("cpu", "fp16") is torch.float16  # slow on a CPU, but asked for: it computes
    assert dev.needs_grad_scaler("cpu", "fp16") and not dev.needs_grad_scaler("cpu", "bf16")
    with pytest.raises(ValueError, match="precision='fp8' is not one of 'auto', 'bf16', 'fp16', 'fp32'"):
        dev.autocast_dtype("cpu", "fp8")
    assert dev.PRECISIONS == ("auto", "bf16", "fp16", "fp32")


@pytest.mark.parametrize(
    "gpu, dtype",
    [
        ("P100", torch.float16),
        ("V100", torch.float16),
        ("T4", torch.float16),
        ("A100", torch.bfloat16),
        ("L4", torch.bfloat16),
        ("H100", torch.bfloat16),
    ],
)
def test_auto_precision_on_cuda_follows_the_compute_capability(monkeypatch, gpu, dtype):
    # bf16 from sm_80 (Ampere) on; below it fp16, which needs a GradScaler
    fake_gpu(monkeypatch, gpu)
    assert dev.autocast_dtype("cuda") is dtype
    assert dev.needs_grad_scaler("cuda") == (dtype is torch.float16)
    assert dev.autocast_dtype("cuda", "fp16") is torch.float16
    assert dev.autocast_dtype("cuda", "fp32") is None and not dev.needs_grad_scaler("cuda", "fp32")


@pytest.mark.parametrize("gpu", ["T4", "V100"])
def test_forced_bf16_on_a_gpu_without_fast_bf16_is_refused(monkeypatch, gpu):
    fake_gpu(monkeypatch, gpu)
    name, (major, minor) = GPUS[gpu]
    with pytest.raises(ValueError, match=rf"precision='bf16' on {name} \(sm_{major}{minor}\).*use precision='fp16'"):
        dev.autocast_dtype("cuda", "bf16")
    fake_gpu(monkeypatch, "A100")
    assert dev.autocast_dtype("cuda", "bf16") is torch.bfloat16


def test_forced_precisions_on_mps_and_cpu(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    for device in ("mps", "cpu"):
        assert dev.autocast_dtype(device, "bf16") is torch.bfloat16
        assert dev.autocast_dtype(device, "fp16") is torch.float16
        assert dev.autocast_dtype(device, "fp32") is None
        assert dev.autocast_dtype(device, "auto") is None


def test_describe_precision(monkeypatch):
    fake_gpu(monkeypatch, "T4")
    assert dev.describe_precision("cuda") == "fp16 autocast + GradScaler (Tesla T4, sm_75: no fast bf16)"
    assert dev.describe_precision("cuda", "fp32") == "fp32 (Tesla T4, sm_75: no fast bf16; precision='fp32' asked for)"
    fake_gpu(monkeypatch, "H100")
    assert dev.describe_precision("cuda:0") == "bf16 autocast (NVIDIA H100 80GB HBM3, sm_90)"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.describe_precision("cpu") == "fp32 (CPU without native bf16: it would be emulated)"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.describe_precision("cpu") == "bf16 autocast (CPU with native bf16)"
    assert dev.describe_precision("mps").startswith("fp32 (MPS: ")


def test_cpu_autocast_really_computes_in_bf16():
    a = torch.randn(8, 8)
    with dev.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with dev.autocast("cpu", "fp16"):
        assert (a @ a).dtype == torch.float16
    with dev.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize(
    "capability, arch_list, supported",
    [
        ((6, 0), ARCH_LIST, False),
        ((7, 0), ARCH_LIST, False),  # P100, V100: dropped by CUDA 13 wheels
        ((7, 5), ARCH_LIST, True),
        ((8, 0), ARCH_LIST, True),
        ((9, 0), ARCH_LIST, True),  # T4, A100, H100
        ((8, 9), ARCH_LIST, True),  # L4: no sm_89 in the list, but sm_86 (and sm_80) code runs on 8.9
        ((10, 3), ARCH_LIST, True),
        ((12, 1), ARCH_LIST, True),  # B300 on sm_100, GB10 on sm_120
        ((7, 5), ["sm_80", "sm_90"], False),  # older than anything in the build
        ((9, 0), ["sm_80", "compute_80"], True),  # PTX: compiled at load time for newer GPUs
        ((12, 0), ["sm_80", "compute_80"], True),
        ((7, 0), ["sm_80", "compute_80"], False),  # ... never for older ones
        ((7, 0), ["sm_60", "compute_60"], True),
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a", "compute_90a"], False),  # arch-specific: 9.0 only
        ((10, 3), ["sm_100f"], True),
        ((12, 0), ["sm_100f"], False),  # family: 10.x
        ((7, 0), [], True),
        ((7, 0), ["gfx90a", "gfx942"], True),  # no CUDA list: nothing to say
    ],
)
def test_cuda_arch_supported(capability, arch_list, supported):
    assert dev.cuda_arch_supported(capability, arch_list) == supported


@pytest.mark.parametrize("gpu", ["P100", "V100"])
def test_a_gpu_this_build_cannot_run_is_an_error_when_asked_for(monkeypatch, gpu):
    fake_gpu(monkeypatch, gpu)
    name, (major, minor) = GPUS[gpu]
    for prefer in ("cuda", "cuda:0"):
        with pytest.raises(RuntimeError) as err:
            dev.get_device(prefer)
        message = str(err.value)
        for part in (
            name,
            f"sm_{major}{minor}",
            torch.__version__,
            ", ".join(ARCH_LIST),
            "pip install torch==2.7.1 torchvision==0.22.1 --index-url https://download.pytorch.org/whl/cu126",
            "https://pytorch.org/get-started/locally/",
            "--train.device cpu",
        ):
            assert part in message, (part, message)


@pytest.mark.parametrize("gpu", ["P100", "V100"])
def test_auto_warns_and_falls_back_from_a_gpu_this_build_cannot_run(monkeypatch, gpu):
    monkeypatch.delenv("DDPM_DEVICE", raising=False)
    fake_gpu(monkeypatch, gpu)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    with pytest.warns(UserWarning) as record:
        assert dev.get_device() == torch.device("cpu")
    assert [str(w.message) for w in record] == [dev.unsupported_gpu_message("cuda")]  # the same message
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    with pytest.warns(UserWarning, match=GPUS[gpu][0]):
        assert dev.get_device("auto") == torch.device("mps")


@pytest.mark.parametrize("gpu", ["T4", "A100", "L4", "H100"])
def test_gpus_this_build_covers_are_used(monkeypatch, gpu, recwarn):
    monkeypatch.delenv("DDPM_DEVICE", raising=False)
    fake_gpu(monkeypatch, gpu)
    assert dev.get_device() == dev.get_device("cuda") == torch.device("cuda")
    assert dev.unsupported_gpu_message("cuda") is None and not recwarn.list


def test_a_gpu_newer_than_the_build_asks_for_a_newer_build(monkeypatch):
    fake_gpu(monkeypatch, "H100", arch_list=["sm_75", "sm_80"])
    message = dev.unsupported_gpu_message("cuda")
    assert "sm_90" in message and "arch list includes sm_90" in message and "torch==2.7.1" not in message


class FakeTensor:
    """Records how to_device copies it."""

    def __init__(self, device="cpu"):
        self.device, self.calls = torch.device(device), []

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append((torch.device(device).type, "non_blocking" if non_blocking else "blocking"))
        return self


@pytest.mark.parametrize(
    "device, calls",
    [
        ("cuda", ["pin_memory", ("cuda", "non_blocking")]),  # overlaps with GPU work; safe from pinned memory
        ("cuda:1", ["pin_memory", ("cuda", "non_blocking")]),
        ("mps", [("mps", "blocking")]),  # the pageable source must outlive the copy
        ("cpu", [("cpu", "blocking")]),
    ],
)
def test_to_device_copies_as_each_device_needs(device, calls):
    t = FakeTensor()
    assert dev.to_device(t, device) is t and t.calls == calls
    on_gpu = FakeTensor("cuda")  # already off the host: nothing to pin, a plain .to()
    dev.to_device(on_gpu, device)
    assert on_gpu.calls == [(torch.device(device).type, "blocking")]
    real = torch.randn(3)
    assert dev.to_device(real, "cpu") is real


def test_seed_everything_repeats():
    dev.seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    dev.seed_everything(7)
    assert first == (random.random(), np.random.rand(), torch.rand(1).item())


def test_keep_freed_memory_in_a_fresh_process():
    # process-wide malloc setting: run it where it cannot leak into the test session
    import subprocess
    import sys

    code = (
        "from ddpm.device import keep_freed_memory; import torch; r = keep_freed_memory(); "
        "x = [torch.ones(2**23) for _ in range(3)]; del x; print(r)"
    )
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
    assert saved_tensor_bytes(lambda: x * 2) == 0  # a scalar multiply keeps nothing
    assert saved_tensor_bytes(lambda: x.exp()) == x.nbytes  # exp keeps its output
    assert saved_tensor_bytes(lambda: x * y) == x.nbytes + y.nbytes  # a product keeps both factors
    assert saved_tensor_bytes(lambda: x * x) == x.nbytes  # the same storage, counted once
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x * y) == 0  # no graph, nothing kept
