"""The denoiser: a DDPM UNet (Ho et al. 2020, as refined in improved-diffusion / ADM).

    x_t (B,3,S,S), t (B,) [, y (B,)]  ->  prediction (B,3,S,S)

ResBlocks (GroupNorm, SiLU, scale-shift time conditioning), self-attention (F.scaled_dot_product_attention,
or plain matmuls on CPU) at chosen feature-map sizes, skip connections from the down path
to the up path. Written to be fast in eager mode, on CPU too, with one device-specific choice (attention, below):

- GroupNorm, the time scale-shift and SiLU run as one autograd node (`group_norm`) with a
  hand-written backward: PyTorch's own GroupNorm backward is 2-3x slower in channels_last on CPU
  (the whole training step gets ~12% faster), and the fusion stores one activation per norm, not three.
  In the ResBlocks the conv that follows joins the node, which recomputes its input in the backward:
  a third less activation memory for a few per cent of speed.
- Attention reads a channels_last feature map as a (B, H*W, C) sequence without a copy; on CPU its
  short sequences run as two matmuls and a softmax, faster there than the fused SDPA kernel.
- The time embedding's SiLU, shared by every ResBlock, is computed once per forward.
- The output conv runs in fp32 outside autocast: samplers divide the prediction by small numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

VARIANTS = ("simple", "attention")
PRESET_SIZES = (32, 64, 128)


def timestep_embedding(timesteps: torch.Tensor, dim: int, *, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) float32.

    Row t is [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})] with h = dim // 2 and
    f_i = max_period ** (-i / h) (improved-diffusion's layout); an odd dim gets a zero last column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ---------------------------------------------------------------------------------------------
# GroupNorm (+ per-sample scale-shift) (+ SiLU) as one autograd node


def _gn_forward(x, weight, bias, scale, shift, groups, eps):
    """xhat = GroupNorm(x) without affine, and the per-(sample, channel) w', b' with y = xhat * w' + b':
    w' = w (1 + scale), b' = b (1 + scale) + shift, folded in fp32 (or fp64), applied in x's dtype."""
    B, C = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    xhat, _, rstd = torch.native_group_norm(x, None, None, B, C, x[0, 0].numel(), groups, eps)
    w, b = weight.to(acc).expand(B, C), bias.to(acc).expand(B, C)
    if scale is not None:
        w = w * (1 + scale.to(acc))
        b = b * (1 + scale.to(acc)) + shift.to(acc)
    return xhat, rstd, w.to(x.dtype).view(B, C, 1, 1), b.to(x.dtype).view(B, C, 1, 1)


def _gn_backward(gy, xhat, rstd, w4, weight, bias, scale, groups):
    """Gradients of y = xhat * w' + b' for x, weight, bias, scale, shift, given dL/dy (closed form)."""
    B, C = xhat.shape[:2]
    acc = torch.promote_types(xhat.dtype, torch.float32)
    s1 = gy.sum((2, 3)).to(acc)            # dL/db'  (B, C); reductions accumulate in fp32
    s2 = (gy * xhat).sum((2, 3)).to(acc)   # dL/dw'
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


class _GroupNormAct(torch.autograd.Function):
    """out = silu(y) or y, y = GroupNorm(x) * w' + b' (see _gn_forward), as one autograd node.

    Saves only xhat; the backward is closed-form GroupNorm backward written with whole-tensor ops
    (two per-channel reductions and two fused multiply-adds), which are fast in any memory format.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, act):
        xhat, rstd, w4, b4 = _gn_forward(x, weight, bias, scale, shift, groups, eps)
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
        return *_gn_backward(gy, xhat, rstd, w4, weight, bias, scale, ctx.groups), None, None, None


class _GroupNormActConv(torch.autograd.Function):
    """conv(silu(y)), y as in _GroupNormAct: the ResBlock's norm -> SiLU -> conv as one autograd node.

    Unfused, the conv saves its input silu(y) for its weight gradient, a second full-size activation
    beside the norm's xhat; here the backward recomputes it from xhat (one multiply-add and a SiLU), so
    each pair stores one activation instead of two: at 128 px a third of the training step's
    saved activations. The conv runs in the autocast dtype, as nn.Conv2d would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, conv_weight, conv_bias, stride, padding,
                dilation, conv_groups):
        xhat, rstd, w4, b4 = _gn_forward(x, weight, bias, scale, shift, groups, eps)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        cw = conv_weight.to(dtype)
        cb = conv_bias.to(dtype) if conv_bias is not None else None
        with torch.autocast(device, enabled=False):
            out = F.conv2d(F.silu(torch.addcmul(b4, xhat, w4), inplace=True).to(dtype), cw, cb, stride, padding,
                           dilation, conv_groups)
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
            grad_out.to(cw.dtype), F.silu(y).to(cw.dtype), cw, [cw.shape[0]] if has_bias else None, stride,
            padding, dilation, False, [0, 0], conv_groups, [True, True, has_bias])
        gy = torch.ops.aten.silu_backward.grad_input(grad_h.to(xhat.dtype), y, grad_input=y)  # into y's buffer
        grads = _gn_backward(gy, xhat, rstd, w4, weight, bias, scale, ctx.groups)
        return (*grads, None, None, grad_cw.to(ctx.weight_dtype),
                grad_cb.to(ctx.bias_dtype) if has_bias else None, None, None, None, None)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, *, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None, act: bool = False, conv: nn.Conv2d | None = None) -> torch.Tensor:
    """GroupNorm(x) with `norm`'s parameters, then h * (1 + scale) + shift (scale, shift: (B, C)),
    then SiLU if act, then `conv` if given (act must be True): mathematically the unfused ops, as one
    fast autograd node."""
    if (scale is None) != (shift is None):
        raise ValueError("pass both scale and shift, or neither")
    if conv is None:
        return _GroupNormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)
    if not act or not isinstance(conv.padding, tuple):
        raise ValueError("group_norm(conv=...) fuses norm -> SiLU -> conv: needs act=True and numeric padding")
    return _GroupNormActConv.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, conv.weight,
                                   conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# ---------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    out_channels: int | None = None           # None: same as in_channels
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; each level after the first halves the size
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention; () = none
    mid_attention: bool = True                 # self-attention in the middle block
    head_dim: int = 64                         # channels per attention head (one head if a level is narrower)
    dropout: float = 0.0
    num_classes: int | None = None             # None: unconditional; else an extra "null" class for CFG
    groups: int = 32                           # GroupNorm groups
    gradient_checkpointing: bool = False       # recompute block activations in backward to save memory

    def __post_init__(self):
        # JSON turns tuples into lists; turn them back so configs compare equal after a round-trip
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        sizes = self.resolutions
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults={self.channel_mults} must be a non-empty tuple of positive ints")
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**{len(self.channel_mults) - 1} "
                             f"for {len(self.channel_mults)} levels (channel_mults={self.channel_mults})")
        bad = [r for r in self.attention_resolutions if r not in sizes]
        if bad:
            raise ValueError(f"attention_resolutions={self.attention_resolutions}: {bad} are not feature-map sizes "
                             f"of this UNet; valid: {sizes}")
        for ch in {self.base_channels, *self.level_channels}:
            if ch % self.groups:
                raise ValueError(f"{ch} channels (base_channels={self.base_channels} x channel_mults) are not "
                                 f"divisible by groups={self.groups}")
        for r, ch in zip(sizes, self.level_channels):
            if (r in self.attention_resolutions or (self.mid_attention and r == sizes[-1])) \
                    and ch > self.head_dim and ch % self.head_dim:
                raise ValueError(f"{ch} channels at {r} px are not divisible by head_dim={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be a positive int or None")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, e.g. (64, 32, 16, 8)."""
        return tuple(self.image_size // 2 ** i for i in range(len(self.channel_mults)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; valid: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# Real DDPM UNets, sized for what each resolution needs and what 2 CPU cores (or one GPU) can train.
# params / forward GFLOPs per image (a multiply-add = 2 FLOPs; benchmarks/train_throughput.py):
#   size  base x channel_mults     attention (variant "attention")   params    GFLOPs   ("simple": no attention)
#   32    32 x (1, 2, 4)           16 px + middle                      3.9M      1.15    (3.7M, 1.02)
#   64    64 x (1, 2, 2, 4)        16 px + middle                     18.1M     13.0     (17.5M, 12.7)
#   128   64 x (1, 1, 2, 3, 4)     16 px + middle                     22.5M     33.2     (21.5M, 32.6)
# All: 2 ResBlocks per level (3 on the way up), GroupNorm (8 groups at 32 px, else 32), head_dim 64, dropout 0.
# 32 px is small on purpose: it trains at ~70 images/s on 2 CPU cores in bf16, so one CPU-hour (30 min
# on 2 cores) sees ~125k images (~2k steps of 64), where a 4x wider net would see a quarter of that.
# Dropout is 0 because short runs underfit rather than overfit (set dropout=0.1 for long runs on small
# datasets); on CPU it also costs 5-10% of a step: its mask comes from a serial RNG.
_PRESETS = {
    32: {"image_size": 32, "base_channels": 32, "channel_mults": (1, 2, 4), "groups": 8},
    64: {"image_size": 64, "base_channels": 64, "channel_mults": (1, 2, 2, 4)},
    128: {"image_size": 128, "base_channels": 64, "channel_mults": (1, 1, 2, 3, 4)},
}


def unet_preset(image_size: int, /, variant: str = "attention", **overrides) -> UNetConfig:
    """The UNetConfig for `image_size` (32, 64 or 128) and variant ("simple": no attention, or
    "attention"); any UNetConfig field can be overridden, e.g. unet_preset(32, num_classes=102)."""
    if image_size not in _PRESETS:
        raise ValueError(f"no UNet preset for image_size={image_size!r}; valid: {PRESET_SIZES} "
                         "(or build a UNetConfig yourself)")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
    kwargs = dict(_PRESETS[image_size], num_res_blocks=2, attention_resolutions=(16,), mid_attention=True,
                  head_dim=64, dropout=0.0)
    if variant == "simple":
        kwargs.update(attention_resolutions=(), mid_attention=False)
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UNetConfig overrides {unknown}; valid: {sorted(known)}")
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Blocks


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x + conv(drop(silu(norm(conv(silu(norm(x)))) * (1 + scale) + shift))), scale/shift from the time embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = dropout
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # the block starts as the identity
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = group_norm(x, self.norm1, act=True, conv=self.conv1)
        scale, shift = self.emb(emb).chunk(2, dim=1)
        if self.dropout > 0 and self.training:  # dropout sits between the SiLU and conv2: no fusion
            h = group_norm(h, self.norm2, scale=scale, shift=shift, act=True)
            return self.skip(x) + self.conv2(F.dropout(h, self.dropout, self.training))
        return self.skip(x) + group_norm(h, self.norm2, scale=scale, shift=shift, act=True, conv=self.conv2)


# PyTorch's CPU kernel for F.scaled_dot_product_attention (flash attention for CPU) runs the short
# sequences of these UNets (64 and 256 positions) at half the speed of plain matmuls + softmax, forward
# + backward (benchmarks/train_throughput.py: about +4% on the whole 64 px training step, +24% at 32 px, on a
# 2-core EPYC).
# The plain form stores the (heads, N, N) probabilities, so it is used only where they are small.
MATMUL_ATTENTION_MAX_TOKENS = 1024


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d): F.scaled_dot_product_attention, or on CPU for
    N <= MATMUL_ATTENTION_MAX_TOKENS the same sum as two matmuls and an fp32 softmax."""
    if q.device.type != "cpu" or q.shape[-2] > MATMUL_ATTENTION_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    # the softmax in fp32 at least (bf16 logits under autocast; fp64 stays fp64)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-norm, residual, zero-initialised output."""

    def __init__(self, channels: int, *, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C): free when x is channels_last (its memory already is B, H, W, C)
        h = group_norm(x, self.norm).permute(0, 2, 3, 1).reshape(B, H * W, C)
        q, k, v = self.qkv(h).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = attention(q, k, v)  # (B, heads, H*W, head_dim)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One ResBlock, then self-attention if this resolution has it; on the up path the skip
    connection is concatenated first (inside, so gradient checkpointing does not store the concat)."""

    def __init__(self, res: ResBlock, attn: Attention | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# ---------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """UNet(unet_preset(64)) or UNet(UNetConfig(...)); model(x_t, t[, y]) -> tensor shaped like x_t.

    For speed on CPU and GPU: model.to(memory_format=torch.channels_last) and bf16 autocast."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, emb_dim = c.base_channels, 4 * c.base_channels
        self.null_class = c.num_classes
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes + 1 rows: the last is the "no label" embedding that classifier-free guidance uses
        self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None

        def stage(cin, cout, size):
            res = ResBlock(cin, cout, emb_dim, groups=c.groups, dropout=c.dropout)
            attn = Attention(cout, head_dim=c.head_dim, groups=c.groups) if size in c.attention_resolutions else None
            return Stage(res, attn)

        self.in_conv = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        for level, (size, cout) in enumerate(zip(c.resolutions, c.level_channels)):
            for _ in range(c.num_res_blocks):
                self.down.append(stage(ch, cout, size))
                ch = cout
                skip_channels.append(ch)
            if level < len(c.channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        mid_attn = Attention(ch, head_dim=c.head_dim, groups=c.groups) if c.mid_attention else None
        self.mid = nn.ModuleList([Stage(ResBlock(ch, ch, emb_dim, groups=c.groups, dropout=c.dropout), mid_attn),
                                  Stage(ResBlock(ch, ch, emb_dim, groups=c.groups, dropout=c.dropout), None)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(c.channel_mults))):
            size, cout = c.resolutions[level], c.level_channels[level]
            for _ in range(c.num_res_blocks + 1):
                self.up.append(stage(ch + skip_channels.pop(), cout, size))
                ch = cout
            if level > 0:
                self.up.append(Upsample(ch))

        self.out_norm = nn.GroupNorm(c.groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, c.out_channels or c.in_channels, 3, padding=1))  # output 0 at init

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, S, S) noisy images; t: (B,) timesteps (a single value is broadcast); y: (B,)
        labels in [0, num_classes], num_classes meaning "no label"; required iff num_classes is set."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1 and B != 1:
            t = t.reshape(1).expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        if self.class_emb is not None:
            if y is None:
                raise ValueError(f"this UNet is class-conditional (num_classes={self.config.num_classes}): pass labels "
                                 f"y of shape ({B},); y = {self.null_class} (model.null_class) means 'no label'")
            if y.shape != (B,):
                raise ValueError(f"y must have shape ({B},), got {tuple(y.shape)}")
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but labels y were passed; "
                             "build it with num_classes=... to condition on classes")
        emb = F.silu(emb)  # every ResBlock's projection starts with SiLU: do it once here

        h = self.in_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for block in self.up:
            h = block(h) if isinstance(block, Upsample) else self._run(block, h, emb, skips.pop())
        h = group_norm(h, self.out_norm, act=True)
        with torch.autocast(h.device.type, enabled=False):
            return self.out_conv(h.to(self.out_conv.weight.dtype))
