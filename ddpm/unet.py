"""The denoiser: a DDPM UNet (Ho et al. 2020, as refined in improved-diffusion / ADM).

    x_t (B,3,S,S), t (B,) [, y (B,)]  ->  prediction (B,3,S,S)

ResBlocks (GroupNorm, SiLU, scale-shift time conditioning), self-attention (F.scaled_dot_product_attention,
or plain matmuls on CPU) at chosen feature-map sizes, skip connections from the down path
to the up path. Written to be fast in eager mode, on CPU too, with device-specific choices:

- The norm path, chosen once per model (set_norm_path(model, device)): on CPU, GroupNorm, the time
  scale-shift, SiLU and the conv after them run as one hand-written autograd node (ddpm.ops); on CUDA and
  MPS as the plain ops, which their kernels serve better. Same parameters, same state_dict either way.
- The layout (preferred_memory_format(device)): channels_last on CPU and CUDA, NCHW on MPS.
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

from .ops import group_norm_act

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
# Config and presets


def check_keys(given, valid, what: str) -> None:
    """The one "unknown key" check of every config (UNetConfig here, the run config's sections in ddpm.config):
    names the unknown keys and lists the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {', '.join(sorted(valid))}")


@dataclass
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; each level after the first halves the size
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention; () = none
    mid_attention: bool = True  # self-attention in the middle block
    head_dim: int = 64  # channels per attention head (one head if a level is narrower)
    dropout: float = 0.0
    num_classes: int | None = None  # None: unconditional; else an extra "null" class for CFG
    groups: int = 32  # GroupNorm groups
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    # p > 1: each p x p patch of pixels becomes p*p*C channels at the input (and back at the output), so the
    # first level works at image_size / p: the full-size level's cost is skipped (Hoogeboom et al. 2023, "simple
    # diffusion", patching); 1: none.
    patch_size: int = 1

    def __post_init__(self):
        # JSON turns tuples into lists; turn them back so configs compare equal after a round-trip
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must be a positive divisor of image_size={self.image_size}")
        sizes = self.resolutions
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults={self.channel_mults} must be a non-empty tuple of positive ints")
        if self.image_size % (self.patch_size * 2 ** (len(self.channel_mults) - 1)):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by "
                + (f"patch_size={self.patch_size} x " if self.patch_size > 1 else "")
                + f"2**{len(self.channel_mults) - 1} for {len(self.channel_mults)} levels "
                f"(channel_mults={self.channel_mults})"
            )
        bad = [r for r in self.attention_resolutions if r not in sizes]
        if bad:
            raise ValueError(
                f"attention_resolutions={self.attention_resolutions}: {bad} are not feature-map sizes "
                f"of this UNet; valid: {sizes}"
            )
        for ch in {self.base_channels, *self.level_channels}:
            if ch % self.groups:
                raise ValueError(
                    f"{ch} channels (base_channels={self.base_channels} x channel_mults) are not "
                    f"divisible by groups={self.groups}"
                )
        for r, ch in zip(sizes, self.level_channels):
            if (
                (r in self.attention_resolutions or (self.mid_attention and r == sizes[-1]))
                and ch > self.head_dim
                and ch % self.head_dim
            ):
                raise ValueError(f"{ch} channels at {r} px are not divisible by head_dim={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be a positive int or None")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, e.g. (64, 32, 16, 8); the first is image_size / patch_size."""
        return tuple(self.image_size // self.patch_size // 2**i for i in range(len(self.channel_mults)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, "UNetConfig keys")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# Real DDPM UNets, sized for what each resolution needs and what 2 CPU cores (or one GPU) can train.
# params / forward GFLOPs per image (a multiply-add = 2 FLOPs; benchmarks/train_throughput.py):
#   size  base x channel_mults     attention (variant "attention")   params    GFLOPs   ("simple": no attention)
#   32    32 x (1, 2, 4)           16 px + middle                      3.9M      1.15    (3.7M, 1.02)
#   64    64 x (1, 2, 2, 4)        16 px + middle                     18.1M     13.0     (17.5M, 12.7)
#   128   64 x (1, 1, 2, 3, 4)     16 px + middle                     22.5M     33.2     (21.5M, 32.6)
# cpu64 (64 px on a CPU) is the 32 px net on 2x2 patches (patch_size=2): 3.9M params, 1.17 GFLOPs at 64 px.
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
        raise ValueError(
            f"no UNet preset for image_size={image_size!r}; valid: {PRESET_SIZES} (or build a UNetConfig yourself)"
        )
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
    kwargs = dict(
        _PRESETS[image_size],
        num_res_blocks=2,
        attention_resolutions=(16,),
        mid_attention=True,
        head_dim=64,
        dropout=0.0,
    )
    if variant == "simple":
        kwargs.update(attention_resolutions=(), mid_attention=False)
    check_keys(overrides, {f.name for f in dataclasses.fields(UNetConfig)}, "UNetConfig overrides")
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
        self.fused_norm = True  # the norm path: UNet.use_fused_norm sets it

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        fused = self.fused_norm
        h = group_norm_act(x, self.norm1, act=True, conv=self.conv1, fused=fused)
        scale, shift = self.emb(emb).chunk(2, dim=1)
        if self.dropout > 0 and self.training:  # dropout sits between the SiLU and conv2: no fusion
            h = group_norm_act(h, self.norm2, scale=scale, shift=shift, act=True, fused=fused)
            return self.skip(x) + self.conv2(F.dropout(h, self.dropout, self.training))
        return self.skip(x) + group_norm_act(
            h, self.norm2, scale=scale, shift=shift, act=True, conv=self.conv2, fused=fused
        )


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
        self.fused_norm = True  # the norm path: UNet.use_fused_norm sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C): free when x is channels_last (its memory already is B, H, W, C)
        h = group_norm_act(x, self.norm, fused=self.fused_norm).permute(0, 2, 3, 1).reshape(B, H * W, C)
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
# Per-device choices, made once when the model is placed


def fused_norm_for(device: torch.device | str) -> bool:
    """ddpm.ops' fused node on the CPU (what it is tuned for); the plain ops on CUDA and MPS, where the node
    would cost layout conversions and twice the backward kernels."""
    return torch.device(device).type == "cpu"


def set_norm_path(model: UNet, device: torch.device | str) -> UNet:
    """Picks the model's norm path for `device` (fused_norm_for), once, before its first forward. Returns the
    model (not moved: see preferred_memory_format)."""
    return model.use_fused_norm(fused_norm_for(device))


def preferred_memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout for the model and its inputs on `device`: channels_last on CPU and CUDA (the fused norm's
    layout; cuDNN's fastest for fp16/bf16 convolutions on tensor cores), NCHW on MPS."""
    return torch.contiguous_format if torch.device(device).type == "mps" else torch.channels_last


# ---------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """UNet(unet_preset(64)) or UNet(UNetConfig(...)); model(x_t, t[, y]) -> tensor shaped like x_t.

    For speed, once, where the model goes: set_norm_path(model, device).to(device,
    memory_format=preferred_memory_format(device)); then bf16 autocast."""

    def __init__(self, config: UNetConfig, *, fused_norm: bool = True):
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

        p2 = c.patch_size**2
        self.in_conv = nn.Conv2d(c.in_channels * p2, ch, 3, padding=1)
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
        self.mid = nn.ModuleList(
            [
                Stage(ResBlock(ch, ch, emb_dim, groups=c.groups, dropout=c.dropout), mid_attn),
                Stage(ResBlock(ch, ch, emb_dim, groups=c.groups, dropout=c.dropout), None),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(c.channel_mults))):
            size, cout = c.resolutions[level], c.level_channels[level]
            for _ in range(c.num_res_blocks + 1):
                self.up.append(stage(ch + skip_channels.pop(), cout, size))
                ch = cout
            if level > 0:
                self.up.append(Upsample(ch))

        self.out_norm = nn.GroupNorm(c.groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, (c.out_channels or c.in_channels) * p2, 3, padding=1))  # output 0 at init
        self.use_fused_norm(fused_norm)

    def use_fused_norm(self, fused: bool) -> UNet:
        """Every norm as ddpm.ops' fused node (True, for the CPU) or as the plain ops (False, for CUDA and MPS);
        set_norm_path chooses by device. Returns the model. A plain attribute, not a parameter or buffer: the
        state_dict is the same either way, so a checkpoint trained on one path loads into the other."""
        for m in self.modules():
            if isinstance(m, (ResBlock, Attention, UNet)):
                m.fused_norm = bool(fused)
        return self

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
                raise ValueError(
                    f"this UNet is class-conditional (num_classes={self.config.num_classes}): pass labels "
                    f"y of shape ({B},); y = {self.null_class} (model.null_class) means 'no label'"
                )
            if y.shape != (B,):
                raise ValueError(f"y must have shape ({B},), got {tuple(y.shape)}")
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError(
                "this UNet is unconditional (num_classes=None) but labels y were passed; "
                "build it with num_classes=... to condition on classes"
            )
        emb = F.silu(emb)  # every ResBlock's projection starts with SiLU: do it once here

        p = self.config.patch_size
        h = self.in_conv(F.pixel_unshuffle(x, p) if p > 1 else x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for block in self.up:
            h = block(h) if isinstance(block, Upsample) else self._run(block, h, emb, skips.pop())
        h = group_norm_act(h, self.out_norm, act=True, fused=self.fused_norm)
        with torch.autocast(h.device.type, enabled=False):
            out = self.out_conv(h.to(self.out_conv.weight.dtype))
        return F.pixel_shuffle(out, p) if p > 1 else out
