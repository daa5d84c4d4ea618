"""What we tried against the UNet's hot spots and did not keep, each timed alone against what the model does.

    python benchmarks/alternatives.py                       # every comparison, at the 64 px preset's shapes
    python benchmarks/alternatives.py --only weight_grad,skip_linear --batch-size 64
    python benchmarks/alternatives.py --quick               # smoke test: tiny shapes, seconds

docs/performance.md quotes these as the "not kept" rows of its lever table. Each comparison checks that every
alternative computes what the model's way does (within bf16 rounding), then times them all on the same
tensors (bf16, channels_last, the 64 px preset's shapes at batch 32 unless told otherwise), taking turns for
--steps rounds and keeping each one's fastest call, and prints each variant's speed against the model's:

  weight_grad    the 3x3 conv's backward to its weight (64 -> 64 channels at 64 px), the pass that runs below
                 the other two on Zen 5: in channels_last (the model), in NCHW, as nine matmuls over shifted
                 views of the input, without the bias gradient, and on one thread
  skip_linear    the ResBlock's 1x1 skip conv + residual add, forward + backward (128 -> 64 and 192 -> 64 at
                 64 px, the up path's), against F.linear on the channels_last view + the add
  norm_affine    the norm's affine y = xhat * w' + b' with per-(sample, channel) w', b' (64 channels, 64 px):
                 torch.addcmul(b', xhat, w') (the model), the same into a new buffer (out=), and xhat * w' + b'
  norm_chunks    the norm node's forward (GroupNorm + scale-shift + SiLU; 64/128/192 channels, 64 px) on the whole
                 batch against chunks of 2-8 MiB that stay in the last-level cache between the node's passes
  compiled_norm  GroupNorm + scale-shift + SiLU forward (64/128/192 channels, 64 px): the model's eager node
                 against the same maths in fp32 as one torch.compile'd function, Inductor's fusion; with the
                 compile time
  save_silu      the ResBlock's norm -> SiLU -> conv node, forward + backward (64 channels, 64 px): the model's,
                 which saves only the norm's output and recomputes the conv's input silu(y) in the backward,
                 against one that also saves silu(y); with the activation memory each node saves

Prints a table, then the results as one line of JSON (the last line).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from common import run  # (importing common puts the repo on sys.path)
from torch import nn
from train_throughput import conv_gflop, time_it

from ddpm.checkpoint import UsageParser
from ddpm.device import get_device, keep_freed_memory, saved_tensor_bytes
from ddpm.ops import GroupNormActConv, gn_backward, gn_forward, group_norm_act

COMPARISONS = ("weight_grad", "skip_linear", "norm_affine", "norm_chunks", "compiled_norm", "save_silu")
DTYPE = torch.bfloat16
MODEL = " (the model)"  # the variant the others are compared with ends with this
TOLERANCE = 0.03  # relative error between variants allowed by bf16 rounding (8 bits of mantissa)


def bf16_cl(*shape, device, grad=False) -> torch.Tensor:
    """A random bf16 channels_last tensor, as the UNet's activations are under autocast."""
    x = torch.randn(shape, device=device).to(DTYPE, memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def rel_error(out, ref) -> float:
    """The largest ||out - ref|| / ||ref|| over the tensors two variants return."""
    outs, refs = (o if isinstance(o, (tuple, list)) else (o,) for o in (out, ref))
    return max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, refs, strict=True))


def compare(
    comparison: str, shape: tuple, variants: dict, device: torch.device, timing: dict, *, gflop: float | None = None
) -> list[dict]:
    """Time each variant (name -> fn returning its result); the first is the model's way. Every other one must
    compute the same (within bf16 rounding), or the timing compares different work: it raises if not.
    The variants take turns, one call each per round, and each keeps its fastest call: a slow spell of the
    machine (other jobs, a noisy VM) then hits all of them alike instead of whichever ran during it."""
    ref = None
    errors = {}
    for name, fn in variants.items():
        out = fn()
        if ref is None:
            ref, errors[name] = out, None
            continue
        errors[name] = rel_error(out, ref)
        if errors[name] > TOLERANCE:
            raise AssertionError(
                f"{comparison}: {name!r} differs from the model's result by {errors[name]:.3g} (relative)"
            )
    for _ in range(timing["warmup"]):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(timing["steps"]):
        for name, fn in variants.items():
            times[name].append(time_it(fn, device, steps=1, warmup=0))
    rows = []
    for name, fn in variants.items():
        seconds, err = min(times[name]), errors[name]
        rows.append(
            {
                "comparison": comparison,
                "variant": name + (MODEL if err is None else ""),
                "shape": list(shape),
                "ms": seconds * 1e3,
                "gflops": gflop / seconds if gflop else None,
                "speed_vs_model": None if err is None else rows[0]["ms"] / (seconds * 1e3),
                "rel_error": err,
                **getattr(fn, "extra", {}),
            }
        )  # what else a variant reports: compile time, memory
    return rows


# ---------------------------------------------------------------------------------------------- comparisons


def weight_grad(device, b, c, s, timing) -> list[dict]:
    """dL/dW and dL/db of a 3x3 conv c -> c at s px: oneDNN's kernel for it is the slow pass on Zen 5."""
    shape = (b, c, s, s)

    def pass_of(channels_last: bool, *, bias: bool = True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format  # input, weight and gradient alike
        x, gy, w = (t.contiguous(memory_format=fmt) for t in (x_ref, gy_ref, weight))
        args = (gy, x, w, [c] if bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        return lambda: torch.ops.aten.convolution_backward(*args, [False, True, bias])[1]

    def nine_matmuls():
        """dW[:, :, i, j] = gy^T x_shift(i, j) over all B*H*W positions: nine (c x n) @ (n x c) matmuls."""
        xp = F.pad(x_ref, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, S+2, S+2, C) view of channels_last
        gy = gy_ref.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C_out), channels_last's own layout
        gw = torch.empty(c, c, 3, 3, device=device, dtype=DTYPE)

        def call():
            for i in range(3):
                for j in range(3):
                    gw[:, :, i, j] = gy.t() @ xp[:, i : i + s, j : j + s].reshape(-1, c)
            gy.sum(0)  # the bias gradient, as the kernel computes it
            return gw

        return call

    def one_thread(fn):
        def call():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)

        return call

    weight = (torch.randn(c, c, 3, 3, device=device) / (9 * c) ** 0.5).to(DTYPE)
    x_ref, gy_ref = bf16_cl(b, c, s, s, device=device), bf16_cl(b, c, s, s, device=device)
    with torch.no_grad():
        model = pass_of(True)
        variants = {
            "channels_last": model,
            "NCHW": pass_of(False),
            "nine shifted matmuls": nine_matmuls(),
            "no bias gradient": pass_of(True, bias=False),
            "one thread": one_thread(model),
        }
        return compare("weight_grad", shape, variants, device, timing, gflop=conv_gflop(shape, c, 3, 1))


def skip_linear(device, b, c, s, timing) -> list[dict]:
    """The up path's 1x1 skip (c_in -> c) plus the residual, forward + backward, as a conv and as a matmul."""
    rows = []
    for cin in (2 * c, 3 * c):
        x, h = bf16_cl(b, cin, s, s, device=device, grad=True), bf16_cl(b, c, s, s, device=device, grad=True)
        w = (torch.randn(c, cin, 1, 1, device=device) / cin**0.5).to(DTYPE).requires_grad_()
        bias = torch.zeros(c, device=device, dtype=DTYPE, requires_grad=True)
        g = bf16_cl(b, c, s, s, device=device)

        def conv():
            return torch.autograd.grad(F.conv2d(x, w, bias) + h, (x, w, bias, h), g)

        def linear():  # (B, H, W, C_in) is the channels_last tensor's own layout: no copy in, none out
            y = F.linear(x.permute(0, 2, 3, 1), w.view(c, cin), bias).permute(0, 3, 1, 2) + h
            return torch.autograd.grad(y, (x, w, bias, h), g)

        rows += compare(
            "skip_linear",
            (b, cin, s, s),
            {f"{cin}->{c} conv 1x1": conv, f"{cin}->{c} F.linear": linear},
            device,
            timing,
            gflop=3 * conv_gflop((b, cin, s, s), c, 1, 1),
        )
    return rows


def norm_affine(device, b, c, s, timing) -> list[dict]:
    """y = xhat * w' + b' with w', b' of shape (B, C, 1, 1): one pass over the activation, or two."""
    xhat = bf16_cl(b, c, s, s, device=device)
    w4, b4 = (torch.randn(b, c, 1, 1, device=device, dtype=DTYPE) for _ in range(2))
    variants = {
        "torch.addcmul(b', xhat, w')": lambda: torch.addcmul(b4, xhat, w4),
        "torch.addcmul(..., out=torch.empty_like(xhat))": lambda: torch.addcmul(
            b4, xhat, w4, out=torch.empty_like(xhat)
        ),
        "xhat * w' + b'": lambda: xhat * w4 + b4,
    }
    with torch.no_grad():
        return compare("norm_affine", xhat.shape, variants, device, timing)


def _norm_act_fp32(x, weight, bias, scale, shift, groups: int, eps: float):
    """GroupNorm + (1 + scale), shift + SiLU in fp32 from plain ops: what Inductor fuses when compiled."""
    b, c = x.shape[:2]
    xf = x.float().unflatten(1, (groups, c // groups))
    var, mean = torch.var_mean(xf, dim=(2, 3, 4), correction=0, keepdim=True)
    xhat = ((xf - mean) * torch.rsqrt(var + eps)).flatten(1, 2)
    w = (weight * (1 + scale)).view(b, c, 1, 1)
    y = xhat * w + (bias * (1 + scale) + shift).view(b, c, 1, 1)
    return F.silu(y).to(x.dtype)


def _norm_inputs(device, b, channels, s, groups: int = 32):
    """A bf16 activation, a GroupNorm with non-trivial affine, and a ResBlock's per-sample scale and shift."""
    x = bf16_cl(b, channels, s, s, device=device)
    norm = nn.GroupNorm(min(groups, channels), channels).to(device)
    nn.init.normal_(norm.weight, 1.0, 0.1), nn.init.normal_(norm.bias, 0.0, 0.1)
    scale, shift = (0.1 * torch.randn(b, channels, device=device) for _ in range(2))
    return x, norm, scale, shift


def compiled_norm(device, b, c, s, timing) -> list[dict]:
    """The ResBlock's norm node forward, eager (the model) against one torch.compile'd function."""
    rows = []
    for channels in (c, 2 * c, 3 * c):
        x, norm, scale, shift = _norm_inputs(device, b, channels, s)
        compiled = torch.compile(_norm_act_fp32, dynamic=False)

        def fused():
            return compiled(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)

        with torch.no_grad():
            t0 = time.perf_counter()
            fused()  # the first call compiles
            fused.extra = {"compile_s": time.perf_counter() - t0}
            variants = {
                f"{channels} ch eager node": lambda: group_norm_act(x, norm, scale=scale, shift=shift, act=True),
                f"{channels} ch torch.compile": fused,
            }
            rows += compare("compiled_norm", x.shape, variants, device, timing)
    return rows


def norm_chunks(device, b, c, s, timing) -> list[dict]:
    """The norm node's forward (statistics + normalise, affine, SiLU: three passes over the activation) on the
    whole batch, or a few samples at a time so that a chunk stays in the last-level cache between its passes
    (the 64 px up path's activations, 33-50 MB at batch 32, are larger than a 32 MB L3). Each chunk writes into
    its slice of one output, as the whole-batch node writes into its own: no extra copy."""
    rows = []
    for channels in (c, 2 * c, 3 * c):
        x, norm, scale, shift = _norm_inputs(device, b, channels, s)
        per_sample = x[0].numel() * x.element_size()

        def chunked(n: int):
            def call():
                out = torch.empty_like(x)
                for i in range(0, b, n):
                    xhat, _, w4, b4 = gn_forward(
                        x[i : i + n],
                        norm.weight,
                        norm.bias,
                        scale[i : i + n],
                        shift[i : i + n],
                        norm.num_groups,
                        norm.eps,
                    )
                    F.silu(torch.addcmul(b4, xhat, w4, out=out[i : i + n]), inplace=True)
                return out

            return call

        variants = {
            f"{channels} ch whole batch ({b * per_sample / 2**20:.1f} MiB)": lambda: group_norm_act(
                x, norm, scale=scale, shift=shift, act=True
            )
        }
        for mb in (2, 4, 8):
            n = max(1, min(b, mb * 2**20 // per_sample))
            variants[f"{channels} ch chunks of {n} ({n * per_sample / 2**20:.1f} MiB)"] = chunked(n)
        with torch.no_grad():
            rows += compare("norm_chunks", x.shape, variants, device, timing)
    return rows


class _SavesConvInput(GroupNormActConv):
    """The model's norm -> SiLU -> conv node, but saving the conv's input silu(y) for the weight gradient
    instead of recomputing it: one SiLU less per backward, one more activation kept until then."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, scale, shift, groups, eps, conv_weight, conv_bias, stride, padding, dilation, conv_groups
    ):
        xhat, rstd, w4, b4 = gn_forward(x, weight, bias, scale, shift, groups, eps)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cw, cb = conv_weight.to(dtype), conv_bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            h = F.silu(torch.addcmul(b4, xhat, w4)).to(dtype)
            out = F.conv2d(h, cw, cb, stride, padding, dilation, conv_groups)
        ctx.save_for_backward(xhat, rstd, w4, b4, weight, bias, scale, cw, h)
        ctx.groups, ctx.conv_args, ctx.dtypes = (
            groups,
            (stride, padding, dilation, conv_groups),
            (conv_weight.dtype, conv_bias.dtype),
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, rstd, w4, b4, weight, bias, scale, cw, h = ctx.saved_tensors
        stride, padding, dilation, conv_groups = ctx.conv_args
        grad_h, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad_out.to(cw.dtype),
            h,
            cw,
            [cw.shape[0]],
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            conv_groups,
            [True, True, True],
        )
        y = torch.addcmul(b4, xhat, w4)
        gy = torch.ops.aten.silu_backward.grad_input(grad_h.to(xhat.dtype), y, grad_input=y)
        grads = gn_backward(gy, xhat, rstd, w4, weight, bias, scale, ctx.groups)
        return (*grads, None, None, grad_cw.to(ctx.dtypes[0]), grad_cb.to(ctx.dtypes[1]), None, None, None, None)


def save_silu(device, b, c, s, timing) -> list[dict]:
    """The ResBlock's second norm node (norm2 -> scale-shift -> SiLU -> conv2), forward + backward in bf16."""
    x, norm, scale, shift = _norm_inputs(device, b, c, s)
    x.requires_grad_()
    conv = nn.Conv2d(c, c, 3, padding=1).to(device, memory_format=torch.channels_last)
    g = bf16_cl(b, c, s, s, device=device)
    params = (x, norm.weight, norm.bias, conv.weight, conv.bias)

    def forward(saves_input: bool):
        with torch.autocast(device.type, dtype=DTYPE):
            if not saves_input:
                return group_norm_act(x, norm, scale=scale, shift=shift, act=True, conv=conv)
            return _SavesConvInput.apply(
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

    variants = {}
    for name, saves in (("recomputes silu(y)", False), ("saves silu(y)", True)):
        variants[name] = lambda saves=saves: torch.autograd.grad(forward(saves), params, g)
        variants[name].extra = {"saved_mb": saved_tensor_bytes(lambda saves=saves: forward(saves)) / 2**20}
    return compare("save_silu", x.shape, variants, device, timing)


# ---------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    """One line per variant; "vs model" > 1 is faster than the model's way, "rel. error" its distance from it."""
    print(
        f"{'comparison':<14} {'variant':<48} {'shape':<16} {'ms':>8} {'GFLOP/s':>8} {'vs model':>9} {'rel. error':>10}"
    )
    for r in rows:
        gf = f"{r['gflops']:.0f}" if r["gflops"] else ""
        vs = f"{r['speed_vs_model']:.2f}x" if r["speed_vs_model"] else ""
        err = f"{r['rel_error']:.1e}" if r["rel_error"] is not None else ""
        extra = f"  (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
        extra += f"  (saves {r['saved_mb']:.1f} MiB for the backward)" if "saved_mb" in r else ""
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['comparison']:<14} {r['variant']:<48} {shape:<16} {r['ms']:>8.2f} {gf:>8} {vs:>9} {err:>10}{extra}")


def main() -> None:
    p = UsageParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {COMPARISONS}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64, help="feature-map size (the 64 px preset's first level)")
    p.add_argument("--channels", type=int, default=64, help="the level's channels (the 64 px preset's: 64)")
    p.add_argument("--steps", type=int, default=10, help="timed calls per variant (the fastest counts)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--malloc",
        default="keep",
        choices=("system", "keep"),
        help="keep (as training does): glibc keeps freed memory; see ddpm.device.keep_freed_memory",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 calls each: a smoke test")
    args = p.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(COMPARISONS))
    if unknown:
        p.error(f"--only: unknown comparisons {unknown}; valid: {', '.join(COMPARISONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # as in training: without it every tensor over 32 MiB is fresh mmap'd memory that page-faults each call
    malloc_kept = keep_freed_memory() if args.malloc == "keep" else False
    device = get_device(args.device)
    b, c, s = (2, 32, 16) if args.quick else (args.batch_size, args.channels, args.image_size)
    timing = {"steps": 2, "warmup": 1} if args.quick else {"steps": args.steps, "warmup": 2}
    torch.manual_seed(0)
    rows = []
    for name in only:
        rows += globals()[name](device, b, c, s, timing)
    print(
        f"device {device}, {torch.get_num_threads()} threads, bf16 channels_last, batch {b}, {c} channels, {s} px, "
        f"malloc={args.malloc}"
    )
    print_table(rows)
    print(
        json.dumps(
            {
                "benchmark": "alternatives",
                "device": str(device),
                "quick": args.quick,
                "threads": torch.get_num_threads(),
                "malloc_keep": malloc_kept,
                "batch_size": b,
                "channels": c,
                "image_size": s,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    run(main)
