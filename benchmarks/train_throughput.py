"""How fast does the UNet train, and how close is that to what the hardware can do?

    python benchmarks/train_throughput.py                       # 32/64/128 px presets, fp32 and bf16
    python benchmarks/train_throughput.py --sizes 64 --precision bf16 --steps 10
    python benchmarks/train_throughput.py --quick               # smoke test: tiny model, seconds
    python benchmarks/train_throughput.py --sizes 64 --precision bf16 --profile   # + where the time goes
    python benchmarks/train_throughput.py --sizes 64 --precision bf16 --conv-shapes   # + each conv's GFLOP/s

For each preset: parameters, forward GFLOPs per image (FlopCounterMode at batch 1, a multiply-add
counted as 2 FLOPs), and a full training step (forward + loss + backward + AdamW + EMA update) in
images/s, with the peak memory of a process that ran only that configuration. Utilisation is
    3 x forward FLOPs x images/s / peak,
(backward costs about twice the forward), where the peak is what a dense 3x3 conv (forward + backward,
channels_last, the same precision) reaches in the same process just before and just after the timed
steps, the faster of the two. Times are the fastest of --steps steps: other jobs on the machine can
only slow a step down. A large matmul is measured too. Prints a table, then the results as one line
of JSON (the last line).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from common import run  # noqa: E402

from ddpm.checkpoint import UsageParser  # noqa: E402
from ddpm.device import get_device, keep_freed_memory, synchronize  # noqa: E402

# 32 and 64 px at the batch their presets train with (folder32, flowers64); 128 px at 16, the batch of the
# memory target (flowers128 trains at 32). At 64 px batch 64 is what a flowers64 user runs; it reached 2-5
# points more of the conv peak than 32 in three sessions of four, and 2 fewer in the fourth (docs/performance.md).
DEFAULT_BATCH = {32: 64, 64: 64, 128: 16}
QUICK_OVERRIDES = {"base_channels": 32, "channel_mults": (1, 2), "attention_resolutions": (16,), "groups": 8}


def time_it(fn, device: torch.device, *, steps: int, warmup: int) -> float:
    """Seconds of the fastest call: other processes can only make a call slower, never faster."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_flops(model: torch.nn.Module, image_size: int, in_channels: int, device: torch.device) -> int:
    """FLOPs of one forward at batch 1, as FlopCounterMode counts them (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(q, k, v, *args, out_shape=None, **kwargs):  # not in FlopCounterMode's registry
        return sdpa_flop_count(q, k, v)

    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}
    )
    x = torch.randn(1, in_channels, image_size, image_size, device=device)
    with counter, torch.no_grad():
        model(x, torch.tensor([500], device=device))
    return counter.get_total_flops()


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def peak_shape(quick: bool) -> tuple[int, int, int]:
    return (4, 64, 16) if quick else (32, 128, 32)  # batch, channels, size


def conv_and_input(
    device: torch.device,
    shape: tuple,
    out_channels: int,
    *,
    kernel: int,
    stride: int,
    dtype: torch.dtype,
    channels_last: bool,
) -> tuple[torch.nn.Conv2d, torch.Tensor]:
    """A conv as the UNet builds them (padding kernel // 2) and a random input of `shape` (B, C, H, W)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = torch.nn.Conv2d(shape[1], out_channels, kernel, stride=stride, padding=kernel // 2)
    conv = conv.to(device, memory_format=fmt)
    return conv, torch.randn(shape, device=device).to(dtype, memory_format=fmt)


def conv_gflop(shape: tuple, out_channels: int, kernel: int, stride: int) -> float:
    """GFLOP of one pass of a conv (forward, or either half of its backward: the same multiply-adds)."""
    b, cin, out = shape[0], shape[1], shape[-1] // stride
    return 2 * b * cin * out_channels * kernel * kernel * out * out / 1e9


def time_conv(
    device: torch.device,
    precision: str,
    shape: tuple,
    out_channels: int,
    *,
    kernel: int = 3,
    stride: int = 1,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    steps: int = 8,
    warmup: int = 2,
) -> tuple[float, float]:
    """(GFLOP, seconds) of one conv, forward + backward, on an input of `shape` (B, C, H, W) in `dtype` (default:
    the precision's: inside the UNet activations are already bf16 under autocast, so time the conv, not a cast)."""
    dtype = dtype or (torch.bfloat16 if precision == "bf16" else torch.float32)
    conv, x = conv_and_input(
        device, shape, out_channels, kernel=kernel, stride=stride, dtype=dtype, channels_last=channels_last
    )
    x.requires_grad_()

    def conv_step():
        with autocast(device, "fp32" if dtype == torch.float32 else precision):
            y = conv(x)
        y.backward(torch.ones_like(y))

    gflop = 3 * conv_gflop(shape, out_channels, kernel, stride)  # forward + backward
    return gflop, time_it(conv_step, device, steps=steps, warmup=warmup)


CONV_PASSES = ("forward", "backward_data", "backward_weight")


def time_conv_passes(
    device: torch.device,
    shape: tuple,
    out_channels: int,
    *,
    kernel: int,
    stride: int,
    dtype: torch.dtype,
    steps: int,
    warmup: int,
) -> dict[str, float]:
    """Seconds of each of a conv's three passes alone ({pass: s} over CONV_PASSES): the forward, the backward
    to its input, and the backward to its weight and bias. Each is the same multiply-adds, so one running
    below the others is that pass's kernel, not the shape."""
    conv, x = conv_and_input(device, shape, out_channels, kernel=kernel, stride=stride, dtype=dtype, channels_last=True)
    w, b = conv.weight.detach().to(dtype), conv.bias.detach().to(dtype)
    with torch.no_grad():
        gy = torch.ones_like(F.conv2d(x, w, b, conv.stride, conv.padding))
    args = (gy, x, w, [out_channels], conv.stride, conv.padding, conv.dilation, False, [0, 0], 1)
    calls = {
        "forward": lambda: F.conv2d(x, w, b, conv.stride, conv.padding),
        "backward_data": lambda: torch.ops.aten.convolution_backward(*args, [True, False, False]),
        "backward_weight": lambda: torch.ops.aten.convolution_backward(*args, [False, True, True]),
    }
    with torch.no_grad():
        return {name: time_it(calls[name], device, steps=steps, warmup=warmup) for name in CONV_PASSES}


def conv_peak(device: torch.device, precision: str, *, channels_last: bool, quick: bool) -> float:
    """GFLOP/s of a dense 3x3 conv, forward + backward: what the hardware does on the UNet's main op."""
    b, c, s = peak_shape(quick)
    steps, warmup = (2, 1) if quick else (8, 2)
    gflop, sec = time_conv(device, precision, (b, c, s, s), c, channels_last=channels_last, steps=steps, warmup=warmup)
    return gflop / sec


def matmul_peak(device: torch.device, precision: str, *, quick: bool) -> float:
    n = 512 if quick else 2048
    a, m = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def matmul():
        with autocast(device, precision):
            a @ m

    return 2 * n**3 / time_it(matmul, device, steps=2 if quick else 8, warmup=1 if quick else 2) / 1e9


def training_step(
    model: torch.nn.Module, x0: torch.Tensor, device: torch.device, precision: str, *, compile: bool = False
):
    """The step every throughput figure times, ours and the peers' (benchmarks/peers.py): ε-MSE loss on the
    linear schedule under the precision's autocast, backward, fused AdamW (what training uses), EMA update.
    Returns step(), a closure over its optimizer and EMA."""
    from ddpm.diffusion import training_loss
    from ddpm.ema import EMA
    from ddpm.schedules import make_schedule
    from ddpm.train import optimizer_impl

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_impl(device))
    ema = EMA(model, decay=0.999)
    schedule = make_schedule("linear")
    train_model = torch.compile(model) if compile else model

    def step():
        with autocast(device, precision):
            loss = training_loss(train_model, schedule, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()

    return step


def time_training(
    step, device: torch.device, precision: str, *, channels_last: bool, quick: bool, steps: int, warmup: int
) -> dict:
    """step_s (the fastest of `steps` steps), first_step_s (reported apart: torch.compile's compilation and the
    allocator's one-off warm-up) and conv_peak_gflops: the peak right before and right after the steps, in this
    process, the faster of the two, so the ratio is fair even when other jobs come and go on the machine."""
    peak = conv_peak(device, precision, channels_last=channels_last, quick=quick)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    sec = time_it(step, device, steps=steps, warmup=max(warmup - 1, 0))
    peak = max(peak, conv_peak(device, precision, channels_last=channels_last, quick=quick))
    return {"step_s": sec, "first_step_s": first_step_s, "conv_peak_gflops": peak}


# What the step's time goes to, by the ATen ops' names (self time: an op's own, without the ops it calls)
OP_KINDS = (
    ("convolution", ("conv",)),
    ("matmul + attention", ("mm", "linear", "matmul", "attention")),
    ("optimizer + EMA", ("_foreach", "adam")),
    ("GroupNorm", ("group_norm",)),
)


def op_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, keys in OP_KINDS if any(k in name for k in keys)), "elementwise + other")


def profile_step(step, device: torch.device) -> dict:
    """Share of one step's time by kind (OP_KINDS): on a CPU, where the work between the convolutions goes.

    On a CPU each ATen op runs to completion before it returns, so it is timed where it is dispatched
    (below autograd, so the ops inside our fused autograd nodes count as themselves) for under 1% of
    overhead; torch.profiler made the same step 45-70% slower, most of it on the small ops. The step's
    wall time that no op accounts for is Python and the autograd engine, reported as its own kind.
    On a GPU, torch.profiler's device time per kernel (launches return before the work is done)."""
    if device.type != "cpu":
        return _profile_step_device(step, device)
    from torch.utils._python_dispatch import TorchDispatchMode

    seconds: dict[str, float] = {}

    class TimeOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            kind = op_kind(func.__name__)
            seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - t0
            return out

    t0 = time.perf_counter()
    with TimeOps():
        step()
    seconds["Python + autograd engine"] = max(time.perf_counter() - t0 - sum(seconds.values()), 0.0)
    total = sum(seconds.values())
    return {kind: t / total for kind, t in sorted(seconds.items(), key=lambda kv: -kv[1])}


def _profile_step_device(step, device: torch.device) -> dict:
    """profile_step on a GPU: torch.profiler's device time of each kernel, by kind."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        shares[op_kind(event.key)] = shares.get(op_kind(event.key), 0.0) + us
    total = sum(shares.values())
    return {kind: us / total for kind, us in sorted(shares.items(), key=lambda kv: -kv[1])}


def conv_shapes(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, device: torch.device, precision: str, *, quick: bool
) -> list[dict]:
    """Each distinct convolution of the model at the shape it runs at, timed alone (forward + backward, input
    in the model's memory format and the autocast dtype): which shapes run below the 3x3 peak, and what
    share of all the convolution time each takes. Found by the aten op, so the convs inside the fused
    norm-conv node count too. Each row also times the conv's forward, backward-to-input and backward-to-weight
    passes one at a time (time_conv_passes): which of the three kernels falls below the others."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict[tuple, dict] = {}

    class RecordConvs(TorchDispatchMode):  # every aten convolution, however the module calls it
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                inp, weight, stride = args[0], args[1], args[3][0]
                key = (weight.shape[1], weight.shape[0], weight.shape[-1], stride, inp.shape[-1])
                seen.setdefault(key, {"shape": tuple(inp.shape), "dtype": inp.dtype, "count": 0})["count"] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), autocast(device, precision), RecordConvs():
        model(x, t)

    rows = []
    for (cin, cout, k, stride, size), info in seen.items():
        # in the dtype it ran in (the fp32 output conv runs outside autocast)
        steps = 2 if quick else 5
        gflop, sec = time_conv(
            device, precision, info["shape"], cout, kernel=k, stride=stride, dtype=info["dtype"], steps=steps, warmup=1
        )
        passes = time_conv_passes(
            device, info["shape"], cout, kernel=k, stride=stride, dtype=info["dtype"], steps=steps, warmup=1
        )
        rows.append(
            {
                "in": cin,
                "out": cout,
                "kernel": k,
                "stride": stride,
                "size": size,
                "count": info["count"],
                "ms": sec * 1e3,
                "gflops": gflop / sec,
                "total_ms": sec * 1e3 * info["count"],
                "total_gflop": gflop * info["count"],
                "pass_gflop": gflop / 3,
                "pass_ms": {name: s * 1e3 for name, s in passes.items()},
            }
        )
    total_ms = sum(r["total_ms"] for r in rows)
    for r in rows:
        r["time_share"] = r["total_ms"] / total_ms
    return sorted(rows, key=lambda r: -r["total_ms"])


def run_config(args) -> dict:
    """One (size, precision) configuration: build, count, time. Runs in its own process."""
    from ddpm.unet import UNet, set_norm_path, unet_preset

    device = get_device(args.device)
    malloc_kept = keep_freed_memory() if args.malloc == "keep" else False
    torch.manual_seed(0)
    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    if args.checkpointing:
        overrides["gradient_checkpointing"] = True
    config = unet_preset(args.size, args.variant, **overrides)
    model = set_norm_path(UNet(config), device).to(device)  # the norm path python -m ddpm.train uses there
    fmt = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, config.image_size, config.in_channels, device)
    x0 = torch.rand(args.batch_size, config.in_channels, config.image_size, config.image_size, device=device) * 2 - 1
    x0 = x0.contiguous(memory_format=fmt)
    step = training_step(model, x0, device, args.precision, compile=args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = time_training(
        step,
        device,
        args.precision,
        channels_last=args.channels_last == "on",
        quick=args.quick,
        steps=args.steps,
        warmup=args.warmup,
    )
    sec, peak, first_step_s = timed["step_s"], timed["conv_peak_gflops"], timed["first_step_s"]
    result = {
        "image_size": args.size,
        "variant": args.variant,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "params": n_params,
        "fwd_gflops_per_image": flops / 1e9,
        "step_ms": sec * 1e3,
        "images_per_s": args.batch_size / sec,
        "achieved_gflops": 3 * flops * args.batch_size / sec / 1e9,
        "conv_peak_gflops": peak,
        "utilisation": 3 * flops * args.batch_size / sec / 1e9 / peak,
        "peak_rss_mb": peak_rss_mb(),
        "malloc_keep": malloc_kept,
        "first_step_s": first_step_s,
    }
    if args.profile:
        shares = profile_step(step, device)
        result["time_shares"] = shares
        # were everything but the convolutions and matmuls free, the utilisation would be this: the ceiling
        # of any fusion of the elementwise work
        result["utilisation_if_only_conv_matmul"] = result["utilisation"] / (
            shares.get("convolution", 0.0) + shares.get("matmul + attention", 0.0)
        )
    if args.conv_shapes:
        t = torch.randint(0, 1000, (args.batch_size,), device=device)  # the step's schedule has 1,000 timesteps
        result["conv_shapes"] = conv_shapes(model, x0, t, device, args.precision, quick=args.quick)
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def print_conv_shapes(r: dict) -> None:
    rows = r["conv_shapes"]
    total_ms, total_gflop = sum(x["total_ms"] for x in rows), sum(x["total_gflop"] for x in rows)
    print(
        f"\n{r['image_size']} px {r['precision']} batch {r['batch_size']}: each distinct conv alone, fwd+bwd "
        f"(all: {total_ms:.0f} ms, {total_gflop / total_ms * 1e3:.0f} GFLOP/s, against the step's "
        f"{r['step_ms']:.0f} ms); then each pass alone: forward, backward to the input, backward to the weight"
    )
    header = (
        f"{'conv':>22} {'size':>5} {'count':>5} {'ms each':>8} {'GFLOP/s':>8} {'time':>6} {'FLOPs':>6} "
        f"{'fwd':>6} {'bwd-in':>6} {'bwd-w':>6}"
    )
    print(header)
    print("-" * len(header))
    for x in rows:
        name = f"{x['kernel']}x{x['kernel']}{'/' + str(x['stride']) if x['stride'] > 1 else ''} {x['in']}->{x['out']}"
        per_pass = " ".join(f"{x['pass_gflop'] / x['pass_ms'][p] * 1e3:>6.0f}" for p in CONV_PASSES)
        print(
            f"{name:>22} {x['size']:>5} {x['count']:>5} {x['ms']:>8.1f} {x['gflops']:>8.0f} "
            f"{x['time_share']:>6.1%} {x['total_gflop'] / total_gflop:>6.1%} {per_pass}"
        )
    # all the model's convs, pass by pass: the share of conv time each pass takes, and its GFLOP/s
    pass_ms = {p: sum(x["pass_ms"][p] * x["count"] for x in rows) for p in CONV_PASSES}
    all_ms = sum(pass_ms.values())
    print(
        "by pass, all convs: "
        + ", ".join(
            f"{p} {pass_ms[p] / all_ms:.0%} of the time at {total_gflop / 3 / pass_ms[p] * 1e3:.0f} GFLOP/s"
            for p in CONV_PASSES
        )
    )


def main() -> None:
    p = UsageParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--sizes", default="32,64,128", help="comma-separated preset image sizes")
    p.add_argument("--variant", default="attention", choices=("simple", "attention"))
    p.add_argument("--precision", default="both", choices=("both", "fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=None, help=f"default per size: {DEFAULT_BATCH}")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--channels-last", default="on", choices=("on", "off"))
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the UNet")
    p.add_argument(
        "--malloc",
        default="keep",
        choices=("system", "keep"),
        help="keep (what python -m ddpm.train does): glibc keeps freed memory; see ddpm.device.keep_freed_memory",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one step: time shares by op kind (convolution, elementwise, ...)",
    )
    p.add_argument(
        "--conv-shapes",
        action="store_true",
        help="after timing, time each distinct convolution of the model alone at its shape",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 step: a smoke test")
    p.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)  # worker: one size
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._one is not None:  # worker process: one configuration, one JSON line
        args.size = args._one
        print(json.dumps(run_config(args)))
        return

    device = get_device(None if args.device == "auto" else args.device)
    if args.quick:
        args.sizes, args.steps, args.warmup = "32", 1, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]

    results = []
    for size in sizes:
        for precision in precisions:
            batch = args.batch_size or (2 if args.quick else DEFAULT_BATCH.get(size, 16))
            cmd = [
                sys.executable,
                __file__,
                "--_one",
                str(size),
                "--device",
                str(device),
                "--variant",
                args.variant,
                "--precision",
                precision,
                "--batch-size",
                str(batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--channels-last",
                args.channels_last,
                "--malloc",
                args.malloc,
            ]
            cmd += ["--quick"] * args.quick + ["--checkpointing"] * args.checkpointing + ["--compile"] * args.compile
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--profile"] * args.profile + ["--conv-shapes"] * args.conv_shapes
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"benchmark of {size} px {precision} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    peaks = {
        f"conv_{r['precision']}": max(x["conv_peak_gflops"] for x in results if x["precision"] == r["precision"])
        for r in results
    }
    peaks.update({f"matmul_{p}": matmul_peak(device, p, quick=args.quick) for p in precisions})
    b, c, s = peak_shape(args.quick)
    peaks["conv_shape"] = f"3x3 conv {c}->{c} ch, {s}x{s}, batch {b}, fwd+bwd, channels_last={args.channels_last}"

    print(
        f"\nUNet training throughput on {device} ({torch.get_num_threads()} threads, torch {torch.__version__}), "
        f"variant={args.variant}, channels_last={args.channels_last}, malloc={args.malloc}"
        + (", gradient checkpointing" if args.checkpointing else "")
        + (", compiled" if args.compile else "")
    )
    print(
        f"peak, {peaks['conv_shape']} (each row: its own, measured around its steps): "
        + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if k != "conv_shape")
        + " GFLOP/s"
    )
    header = (
        f"{'size':>5} {'batch':>5} {'params':>8} {'GFLOP/img':>9} {'prec':>5} {'img/s':>8} {'ms/step':>8} "
        f"{'GFLOP/s':>8} {'peak':>6} {'util':>6} {'peak MB':>8} {'1st step s':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['image_size']:>5} {r['batch_size']:>5} {r['params'] / 1e6:>7.2f}M {r['fwd_gflops_per_image']:>9.2f} "
            f"{r['precision']:>5} {r['images_per_s']:>8.2f} {r['step_ms']:>8.0f} {r['achieved_gflops']:>8.0f} "
            f"{r['conv_peak_gflops']:>6.0f} "
            f"{r['utilisation']:>6.1%} {r.get('peak_cuda_mb', r['peak_rss_mb']):>8.0f} {r['first_step_s']:>10.1f}"
        )
    for r in results if args.profile else []:
        print(
            f"{r['image_size']} px {r['precision']}, time by op kind (profiled step): "
            + ", ".join(f"{k} {v:.0%}" for k, v in r["time_shares"].items())
            + f"; utilisation were only conv + matmul time left: {r['utilisation_if_only_conv_matmul']:.0%}"
        )
    for r in results if args.conv_shapes else []:
        print_conv_shapes(r)
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "variant": args.variant,
                "channels_last": args.channels_last == "on",
                "checkpointing": args.checkpointing,
                "compile": args.compile,
                "malloc": args.malloc,
                "quick": args.quick,
                "profile": args.profile,
                "conv_shapes": args.conv_shapes,
                "peaks_gflops": peaks,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    run(main)
