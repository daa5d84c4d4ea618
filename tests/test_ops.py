"""ddpm.ops: the fused GroupNorm node against PyTorch's ops (values, gradients, gradcheck, memory, autocast),
the plain path against the fused one, and fp32 statistics on both under bf16 and fp16 autocast."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm.device import saved_tensor_bytes
from ddpm.ops import group_norm_act


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation, and when other jobs share the
    # CPU its spin-waits make these tests several times slower. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the fused node (fused=True, the CPU's path) ----------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "act,scale_shift,conv",
    [
        (True, True, None),
        (True, False, None),
        (False, False, None),
        (True, True, "bias"),
        (True, False, "bias"),
        (True, True, "no bias"),
    ],
)
def test_group_norm_equals_unfused_ops(channels_last, act, scale_shift, conv):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12).double()
    conv = torch.nn.Conv2d(12, 8, 3, padding=1, bias=conv == "bias").double() if conv else None
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 12, 5, 5, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ss = [torch.randn(3, 12, dtype=torch.float64, requires_grad=True) for _ in range(2)] if scale_shift else []
    inputs = [x, norm.weight, norm.bias, *ss, *(conv.parameters() if conv else [])]

    h = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    if ss:
        h = h * (1 + ss[0][:, :, None, None]) + ss[1][:, :, None, None]
    h = F.silu(h) if act else h
    ref = conv(h) if conv else h
    out = group_norm_act(x, norm, scale=ss[0] if ss else None, shift=ss[1] if ss else None, act=act, conv=conv)
    assert torch.allclose(out, ref, atol=1e-12)
    go = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, inputs, go), torch.autograd.grad(out, inputs, go)):
        assert torch.allclose(a, b, atol=1e-10)


def test_group_norm_gradcheck():
    norm = torch.nn.GroupNorm(2, 4).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fused = lambda x, w, b, s, sh: group_norm_act(x, norm, scale=s, shift=sh, act=True)
    assert torch.autograd.gradcheck(fused, (x, norm.weight, norm.bias, scale, shift))


def test_group_norm_bf16_close_to_fp32():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32)
    x = (torch.randn(2, 32, 8, 8) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    s = torch.randn(2, 32) * 0.1
    ref = group_norm_act(x, norm, scale=s, shift=s, act=True)
    out = group_norm_act(x.bfloat16(), norm, scale=s.bfloat16(), shift=s.bfloat16(), act=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - ref).abs().max() < 0.03


def test_group_norm_conv_gradcheck():
    norm = torch.nn.GroupNorm(2, 4).double()
    conv = torch.nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fused = lambda x, w, b, s, sh, cw, cb: group_norm_act(x, norm, scale=s, shift=sh, act=True, conv=conv)
    assert torch.autograd.gradcheck(fused, (x, norm.weight, norm.bias, scale, shift, conv.weight, conv.bias))


def test_group_norm_conv_saves_one_activation_and_autocasts_like_conv2d():
    torch.manual_seed(0)
    norm, conv = torch.nn.GroupNorm(8, 32), torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(4, 32, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    one = x.numel() * 2  # one bf16 activation of x's size
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16()
        unfused = saved_tensor_bytes(lambda: conv(group_norm_act(xb, norm, act=True)))
        fused = saved_tensor_bytes(lambda: group_norm_act(xb, norm, act=True, conv=conv))
        out = group_norm_act(xb, norm, act=True, conv=conv)
        ref = conv(group_norm_act(xb, norm, act=True))
    assert one * 2 <= unfused < one * 2.5 and one <= fused < one * 1.5, (unfused, fused, one)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    out.float().square().mean().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# --- the plain path (fused=False, CUDA's and MPS's) against the fused one ---------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "act,scale_shift,conv", [(True, True, None), (False, False, None), (True, True, "bias"), (True, False, "no bias")]
)
def test_plain_path_equals_fused_path(channels_last, act, scale_shift, conv):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12).double()
    conv = torch.nn.Conv2d(12, 8, 3, padding=1, bias=conv == "bias").double() if conv else None
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 12, 5, 5, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ss = [torch.randn(3, 12, dtype=torch.float64, requires_grad=True) for _ in range(2)] if scale_shift else []
    inputs = [x, norm.weight, norm.bias, *ss, *(conv.parameters() if conv else [])]
    kw = dict(scale=ss[0] if ss else None, shift=ss[1] if ss else None, act=act, conv=conv)
    fused, plain = group_norm_act(x, norm, **kw, fused=True), group_norm_act(x, norm, **kw, fused=False)
    assert plain.dtype == fused.dtype and torch.allclose(plain, fused, atol=1e-12)
    assert plain.is_contiguous(memory_format=torch.channels_last) == fused.is_contiguous(
        memory_format=torch.channels_last
    )
    go = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, inputs, go), torch.autograd.grad(plain, inputs, go)):
        assert torch.allclose(a, b, atol=1e-10)


def test_plain_path_autocasts_like_the_fused_node():
    torch.manual_seed(0)
    norm, conv = torch.nn.GroupNorm(8, 32), torch.nn.Conv2d(32, 32, 3, padding=1)
    x = (torch.randn(2, 32, 8, 8) * 2 + 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (0.1 * torch.randn(2, 32) for _ in range(2))
    outs = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xb = x.bfloat16()
            h = group_norm_act(xb, norm, scale=scale.bfloat16(), shift=shift.bfloat16(), act=True, fused=fused)
            out = group_norm_act(xb, norm, act=True, conv=conv, fused=fused)
        assert h.dtype == out.dtype == torch.bfloat16
        assert h.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous(
            memory_format=torch.channels_last
        )
        outs.append(out)
    # the same rounding up to the conv's input, then the same bf16 conv: within one bf16 step or two
    assert (outs[0].float() - outs[1].float()).norm() / outs[0].float().norm() < 0.01
    outs[1].float().square().mean().backward()
    assert conv.weight.grad.dtype == norm.weight.grad.dtype == x.grad.dtype == torch.float32


class NormInputDtypes(TorchDispatchMode):
    """Records the dtype of every input the group-norm kernel (aten.native_group_norm) receives."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.native_group_norm:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_statistics_are_fp32_under_autocast(fused, dtype):
    # Activations far from zero (mean 300, std 8): a mean or rstd held in bf16/fp16 is off by up to half a
    # step of that format at 300, several times the rounding of the normalised output itself.
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    x = (300 + 8 * torch.randn(4, 16, 16, 16, generator=g)).to(dtype, memory_format=torch.channels_last)
    ref = F.group_norm(x.double(), 4, eps=norm.eps)  # exact statistics of the same rounded input
    with torch.autocast("cpu", dtype=dtype), NormInputDtypes() as seen:
        out = group_norm_act(x, norm, fused=fused)
    # the plain path hands the kernel fp32 itself (other devices' kernels and autocast lists differ); the fused
    # node hands the CPU kernel x, whose statistics it accumulates in fp32 (the values below show it)
    assert seen.dtypes == [dtype if fused else torch.float32]
    tol = 4 * torch.finfo(dtype).eps  # twice the rounding of an output of magnitude below 8
    assert out.dtype == dtype and ref.abs().max() < 8
    assert (out.double() - ref).abs().max() < tol  # measured: 0.4 tol on both paths
    # what the tolerance rules out: the exact statistics, merely rounded to `dtype` before use (2.4-3.5 tol)
    xg = x.double().reshape(4, 4, -1)
    mean = xg.mean(-1, keepdim=True).to(dtype).double()
    rstd = (xg.var(-1, unbiased=False, keepdim=True) + norm.eps).rsqrt().to(dtype).double()
    assert (((xg - mean) * rstd).reshape(x.shape) - ref).abs().max() > 1.5 * tol


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_group_norm_act_argument_errors(fused):
    norm, conv = torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 3, padding=1)
    x, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match="both scale and shift"):
        group_norm_act(x, norm, scale=s, fused=fused)
    with pytest.raises(ValueError, match="act=True"):
        group_norm_act(x, norm, conv=conv, fused=fused)
