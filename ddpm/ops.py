"""Hand-written fast kernels for the UNet: GroupNorm (+ per-sample scale-shift) (+ SiLU) (+ the conv after it).

    group_norm_act(x, norm, scale=, shift=, act=, conv=, fused=)   the one entry point the UNet calls

fused=True (the CPU's path) runs the whole chain as one autograd node with a closed-form backward
(GroupNormAct, GroupNormActConv; the maths in gn_forward / gn_backward). Tuned for the CPU in channels_last:

- PyTorch's own GroupNorm backward is 2-3x slower in channels_last on CPU (the whole training step gets ~12%
  faster), and the fusion stores one activation per norm, not three.
- With the conv that follows in the node, the backward recomputes the conv's input: a third less activation
  memory for a few per cent of speed.
- The statistics are computed in fp32 for bf16/fp16 activations (see gn_forward).

fused=False is the plain composition, F.group_norm in fp32, scale-shift, SiLU, the nn.Conv2d: the path for
CUDA and MPS, where the fused node costs layout conversions and about twice the backward kernels
(ddpm.unet.set_norm_path picks the path by device). Both compute the same function, with the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gn_forward(x, weight, bias, scale, shift, groups, eps):
    """xhat = GroupNorm(x) without affine, rstd (B, groups), and the per-(sample, channel) w', b' with
    y = xhat * w' + b': w' = w (1 + scale), b' = b (1 + scale) + shift, folded in fp32 (or fp64) and applied
    in x's dtype."""
    B, C = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    # For bf16/fp16 x the CPU kernel computes the statistics and xhat in fp32 and returns rstd rounded to x's
    # dtype; an fp32 rstd measured no more accurate gradients: the backward rounds rstd * w' to x's dtype anyway
    xhat, _, rstd = torch.native_group_norm(x, None, None, B, C, x[0, 0].numel(), groups, eps)
    w, b = weight.to(acc).expand(B, C), bias.to(acc).expand(B, C)
    if scale is not None:
        w = w * (1 + scale.to(acc))
        b = b * (1 + scale.to(acc)) + shift.to(acc)
    return xhat, rstd, w.to(x.dtype).view(B, C, 1, 1), b.to(x.dtype).view(B, C, 1, 1)


def gn_backward(gy, xhat, rstd, w4, weight, bias, scale, groups):
    """Gradients of y = xhat * w' + b' for x, weight, bias, scale, shift, given dL/dy (closed form)."""
    B, C = xhat.shape[:2]
    acc = torch.promote_types(xhat.dtype, torch.float32)
    s1 = gy.sum((2, 3)).to(acc)  # dL/db'  (B, C); reductions accumulate in fp32
    s2 = (gy * xhat).sum((2, 3)).to(acc)  # dL/dw'
    # dx = rstd (w' gy - mean_g(w' gy) - xhat mean_g(w' gy xhat)), means over the group's (c, h, w)
    n = (C // groups) * xhat[0, 0].numel()
    w = w4.view(B, C).to(acc)
    r = rstd.to(acc).view(B, groups, 1)
    m1 = (w * s1).view(B, groups, -1).sum(-1, keepdim=True) / n
    m2 = (w * s2).view(B, groups, -1).sum(-1, keepdim=True) / n
    p = (r * w.view(B, groups, -1)).view(B, C, 1, 1).to(xhat.dtype)
    q = (-r * m2).expand(B, groups, C // groups).reshape(B, C, 1, 1).to(xhat.dtype)
    c = (-r * m1).expand(B, groups, C // groups).reshape(B, C, 1, 1).to(xhat.dtype)
    grad_x = torch.addcmul(c, xhat, q).addcmul_(gy, p)  # in place: one full-size buffer, not two
    grad_scale = grad_shift = None
    if scale is None:
        grad_w, grad_b = s2.sum(0), s1.sum(0)
    else:
        one_s = 1 + scale.to(acc)
        grad_w, grad_b = (s2 * one_s).sum(0), (s1 * one_s).sum(0)
        grad_scale = (s2 * weight.to(acc) + s1 * bias.to(acc)).to(scale.dtype)
        grad_shift = s1.to(scale.dtype)
    return grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype), grad_scale, grad_shift


class GroupNormAct(torch.autograd.Function):
    """out = silu(y) or y, y = GroupNorm(x) * w' + b' (see gn_forward), as one autograd node.

    Saves only xhat; the backward is closed-form GroupNorm backward written with whole-tensor ops
    (two per-channel reductions and two fused multiply-adds), which are fast in any memory format.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, act):
        xhat, rstd, w4, b4 = gn_forward(x, weight, bias, scale, shift, groups, eps)
        ctx.save_for_backward(xhat, rstd, w4, b4, weight, bias, scale)
        ctx.groups, ctx.act = groups, act
        y = torch.addcmul(b4, xhat, w4)
        return F.silu(y, inplace=True) if act else y

    @staticmethod
    def backward(ctx, grad_out):
        xhat, rstd, w4, b4, weight, bias, scale = ctx.saved_tensors
        grad_out = grad_out.to(xhat.dtype)
        # d/dy: recompute y rather than store it (one multiply-add is cheaper than the memory)
        if ctx.act:
            y = torch.addcmul(b4, xhat, w4)
            gy = torch.ops.aten.silu_backward.grad_input(grad_out, y, grad_input=y)  # into y's buffer
        else:
            gy = grad_out
        return *gn_backward(gy, xhat, rstd, w4, weight, bias, scale, ctx.groups), None, None, None


class GroupNormActConv(torch.autograd.Function):
    """conv(silu(y)), y as in GroupNormAct: the ResBlock's norm -> SiLU -> conv as one autograd node.

    Unfused, the conv saves its input silu(y) for its weight gradient, a second full-size activation
    beside the norm's xhat; here the backward recomputes it from xhat (one multiply-add and a SiLU), so
    each pair stores one activation instead of two: at 128 px a third of the training step's
    saved activations. The conv runs in the autocast dtype, as nn.Conv2d would.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, scale, shift, groups, eps, conv_weight, conv_bias, stride, padding, dilation, conv_groups
    ):
        xhat, rstd, w4, b4 = gn_forward(x, weight, bias, scale, shift, groups, eps)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        cw = conv_weight.to(dtype)
        cb = conv_bias.to(dtype) if conv_bias is not None else None
        with torch.autocast(device, enabled=False):
            out = F.conv2d(
                F.silu(torch.addcmul(b4, xhat, w4), inplace=True).to(dtype),
                cw,
                cb,
                stride,
                padding,
                dilation,
                conv_groups,
            )
        ctx.save_for_backward(xhat, rstd, w4, b4, weight, bias, scale, cw)
        ctx.groups, ctx.conv_args = groups, (stride, padding, dilation, conv_groups)
        ctx.bias_dtype = conv_bias.dtype if conv_bias is not None else None
        ctx.weight_dtype = conv_weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, rstd, w4, b4, weight, bias, scale, cw = ctx.saved_tensors
        stride, padding, dilation, conv_groups = ctx.conv_args
        y = torch.addcmul(b4, xhat, w4)
        has_bias = ctx.bias_dtype is not None
        grad_h, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad_out.to(cw.dtype),
            F.silu(y).to(cw.dtype),
            cw,
            [cw.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            conv_groups,
            [True, True, has_bias],
        )
        gy = torch.ops.aten.silu_backward.grad_input(grad_h.to(xhat.dtype), y, grad_input=y)  # into y's buffer
        grads = gn_backward(gy, xhat, rstd, w4, weight, bias, scale, ctx.groups)
        return (
            *grads,
            None,
            None,
            grad_cw.to(ctx.weight_dtype),
            grad_cb.to(ctx.bias_dtype) if has_bias else None,
            None,
            None,
            None,
            None,
        )


def _fused(x, norm, scale, shift, act, conv):
    if conv is None:
        return GroupNormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)
    if not isinstance(conv.padding, tuple):
        raise ValueError(f"the fused norm -> SiLU -> conv needs numeric padding, got padding={conv.padding!r}")
    return GroupNormActConv.apply(
        x,
        norm.weight,
        norm.bias,
        scale,
        shift,
        norm.num_groups,
        norm.eps,
        conv.weight,
        conv.bias,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )


def _plain(x, norm, scale, shift, act, conv):
    # The statistics and the normalisation in fp32 at least, explicitly on every device: CPU autocast (torch
    # 2.14) runs group_norm in its input's dtype; CUDA's lists it as fp32, and then has nothing left to cast.
    # Back in x's dtype after it, as the fused node's output is: the scale-shift and SiLU move half the bytes.
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.group_norm(x.to(acc), norm.num_groups, norm.weight.to(acc), norm.bias.to(acc), norm.eps).to(x.dtype)
    if scale is not None:
        h = torch.addcmul(shift[:, :, None, None], h, 1 + scale[:, :, None, None])
    if act:
        h = F.silu(h)
    return conv(h) if conv is not None else h


def group_norm_act(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = False,
    conv: nn.Conv2d | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """GroupNorm(x) with `norm`'s parameters, then h * (1 + scale) + shift (scale, shift: (B, C)), then SiLU if
    act, then `conv` if given (act must be True). fused=True: as one fast autograd node (the CPU's path);
    False: as the plain PyTorch ops (CUDA's and MPS's). Statistics in fp32 either way."""
    if (scale is None) != (shift is None):
        raise ValueError("pass both scale and shift, or neither")
    if conv is not None and not act:
        raise ValueError("group_norm_act(conv=...) is norm -> SiLU -> conv: it needs act=True")
    return (_fused if fused else _plain)(x, norm, scale, shift, act, conv)
