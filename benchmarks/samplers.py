"""Sampler benchmark: error against network evaluations (NFE) on the exact Gaussian denoiser, and latency.

Part 1 needs no training: with data N(mean, diag(std^2)) the optimal denoiser is closed-form
(ddpm.oracle), so any distance between the samples and N(mean, std^2) is the sampler's own error.
Part 2 times each sampler at its default steps on a UNet preset (random weights: latency only).

    python benchmarks/samplers.py [--schedule linear] [--n 20000] [--size 32] [--device auto] [--quick]

Prints two tables, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import run  # (importing common puts the repo on sys.path)

from ddpm import DEFAULT_STEPS, GaussianDenoiser, gaussian_errors, get_device, make_schedule
from ddpm.checkpoint import UsageParser
from ddpm.device import autocast
from ddpm.samplers import METHODS, sample
from ddpm.schedules import SCHEDULES


def oracle_errors(schedule_name: str, n: int, nfes: list[int]) -> list[dict]:
    """W2 / mean / std error of each sampler at each NFE on 48-d Gaussian data with stds 0.05..0.6."""
    schedule = make_schedule(schedule_name)
    shape = (3, 4, 4)
    mean = torch.linspace(-0.6, 0.6, 48).reshape(shape)
    std = torch.linspace(0.05, 0.6, 48).reshape(shape)  # small stds stand in for fine image detail
    rows = []
    for method in METHODS:
        for nfe in nfes:
            oracle = GaussianDenoiser(schedule, mean, std)
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            x = sample(
                oracle,
                schedule,
                (n, *shape),
                method=method,
                steps=nfe,
                generator=g,
                clip_denoised=False,
                progress=False,
            )
            err = gaussian_errors(x, mean, std)
            rows.append(
                {
                    "method": method,
                    "nfe": oracle.calls,
                    **{k: round(v, 5) for k, v in err.items()},
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
    return rows


def latency(size: int, device: torch.device, batch: int, repeats: int) -> list[dict]:
    """Seconds per image of each sampler at its default steps on the attention UNet preset."""
    from ddpm.unet import UNet, preferred_memory_format, set_norm_path, unet_preset

    model = set_norm_path(UNet(unet_preset(size)), device)  # as ddpm.checkpoint.load_model builds it
    model = model.to(device, memory_format=preferred_memory_format(device)).eval()
    schedule = make_schedule("linear")
    rows = []
    for method in METHODS:
        steps = DEFAULT_STEPS[method] or schedule.timesteps
        # DDPM's 1000 steps cost 1000 evaluations: time a slice of them and scale, saying so.
        timed_steps = min(steps, 50)
        times = []
        for _ in range(repeats):
            g = torch.Generator().manual_seed(0)
            with autocast(device):
                t0 = time.perf_counter()
                sample(
                    model,
                    schedule,
                    (batch, 3, size, size),
                    method="ddim" if method == "ddpm" else method,
                    steps=timed_steps,
                    generator=g,
                    progress=False,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        per_image = min(times) / batch * steps / timed_steps
        rows.append(
            {
                "method": method,
                "steps": steps,
                "timed_steps": timed_steps,
                "batch": batch,
                "seconds_per_image": round(per_image, 4),
            }
        )
    return rows


def main() -> None:
    p = UsageParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="linear", choices=SCHEDULES)
    p.add_argument("--n", type=int, default=20000, help="samples per oracle run")
    p.add_argument("--nfe", default="10,20,50,100,1000")
    p.add_argument("--size", type=int, default=32, help="UNet preset for the latency table")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    args = p.parse_args()
    if args.quick:
        args.n, args.nfe, args.batch, args.repeats = 500, "10,20", 2, 1
    device = get_device(args.device)
    nfes = [int(v) for v in args.nfe.split(",")]

    errors = oracle_errors(args.schedule, args.n, nfes)
    print(
        f"Sampling error on the exact Gaussian denoiser ({args.schedule} schedule, {args.n} samples, 48 dims;"
        f" Monte Carlo floor of w2 ~ {0.35 / args.n**0.5:.4f})"
    )
    print(f"{'method':<14}{'NFE':>6}{'w2':>10}{'mean_err':>10}{'std_err':>10}")
    for r in errors:
        print(f"{r['method']:<14}{r['nfe']:>6}{r['w2']:>10.4f}{r['mean_err']:>10.4f}{r['std_err']:>10.4f}")

    lat = latency(args.size, device, args.batch, args.repeats)
    print(
        f"\nLatency at default steps, {args.size} px attention UNet, batch {args.batch}, {device} "
        f"(DDPM timed over {lat[0]['timed_steps']} steps and scaled to {lat[0]['steps']})"
    )
    print(f"{'method':<14}{'steps':>6}{'s/image':>10}")
    for r in lat:
        print(f"{r['method']:<14}{r['steps']:>6}{r['seconds_per_image']:>10.4f}")
    print(
        json.dumps(
            {
                "benchmark": "samplers",
                "device": str(device),
                "schedule": args.schedule,
                "oracle": errors,
                "latency": lat,
            }
        )
    )


if __name__ == "__main__":
    run(main)
