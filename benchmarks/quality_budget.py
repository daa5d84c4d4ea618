"""How good does an hour on a laptop get? Train a preset (the 32 px folder32 by default) for a fixed budget of
process CPU time on the shared flowers, sample from the EMA weights, and report FID and KID on real Inception
weights.

    python benchmarks/quality_budget.py                       # one CPU-hour (~30 min on 2 cores)
    python benchmarks/quality_budget.py --cpu-minutes 10 --num-images 500 --samplers dpmpp_2m:20,ddim:50,ddpm:1000
    python benchmarks/quality_budget.py --quick               # a smoke run of the script itself
    python benchmarks/quality_budget.py --preset flowers64 --samplers dpmpp_2m_sde:20 train.max_steps=250
    python benchmarks/quality_budget.py --checkpoint benchmarks/results/quality_budget --seed 1 \
        --samplers dpmpp_2m_sde:20,dpmpp_2m:20:trailing        # score a trained run again, no training
    python benchmarks/quality_budget.py --checkpoint benchmarks/results/quality_budget --weights live \
        --samplers ddim:20                                     # the live weights: what the EMA buys

The budget counts process CPU time (time.process_time: every thread of this process), not wall time,
so it means the same on a busy or an idle machine. Training runs in chunks of --chunk steps (each chunk
resumes the last exactly) and stops at the first chunk boundary past the budget. Then, for each --samplers
entry (method:steps or method:steps:spacing; default: DPM-Solver++ SDE at 20 steps, the preset's own
sampler (ddpm.samplers.default_sampler), then DDIM at 20, DPM-Solver++ ODE at 20 and DDIM at 50), a sample
grid (PNG) and FID/KID of --num-images images against the real ones, all from the same start noise
(--seed): the check that the fast samplers lose little on a trained model (add ddpm:1000 as the reference).
Prints a table and one JSON line; writes everything under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import REPO, default_data_root, parse_sampler, run  # (importing common puts the repo on sys.path)

from ddpm import get_device
from ddpm.checkpoint import UsageError, UsageParser, load_checkpoint, load_model, model_from_state
from ddpm.config import PRESETS, apply_overrides, preset
from ddpm.data import load_dataset
from ddpm.device import keep_freed_memory
from ddpm.metrics import FIDEvaluator
from ddpm.sample import generate
from ddpm.samplers import DEFAULT_SPACING
from ddpm.train import train
from ddpm.viz import save_grid


def train_for_budget(config, out: Path, budget_s: float, chunk: int) -> tuple[int, float, float]:
    """Train in resumable chunks until process CPU time passes `budget_s`; (steps, cpu_s, wall_s)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    step, resume = 0, False
    while time.process_time() - cpu0 < budget_s and step < config.train.max_steps:
        result = train(config, out_dir=out, resume=resume, max_steps=step + chunk, progress=False)
        step, resume = result.step, True
        last = result.history[-1] if result.history else {}
        print(
            f"  step {step:6d}  loss {last.get('loss', float('nan')):.4f}  "
            f"cpu {time.process_time() - cpu0:7.0f}s  wall {time.perf_counter() - wall0:7.0f}s",
            flush=True,
        )
    return step, time.process_time() - cpu0, time.perf_counter() - wall0


def main() -> None:
    p = UsageParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        default="folder32",
        choices=sorted(set(PRESETS) - {"quick"}),
        help="the preset to train (folder32: 32 px; flowers64 and flowers128: a CPU-hour buys a few "
        "hundred steps of them)",
    )
    p.add_argument("--cpu-minutes", type=float, default=60.0, help="training budget in process CPU minutes")
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_budget"))
    p.add_argument("--chunk", type=int, default=250, help="steps between budget checks")
    p.add_argument("--num-images", type=int, default=1000, help="generated images for FID/KID")
    p.add_argument(
        "--samplers",
        default="dpmpp_2m_sde:20,ddim:20,dpmpp_2m:20,ddim:50",
        help="method:steps[:spacing] to score; add ddpm:1000 for the reference (50x the cost of ddim:20)",
    )
    p.add_argument(
        "--num-real",
        type=int,
        default=None,
        help="real images to score against (default: all 2,040 of the shared copy; --quick: 64)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the samplers' start noise")
    p.add_argument(
        "--weights",
        choices=("ema", "live"),
        default="ema",
        help="sample from the EMA weights (what generate uses) or the live ones: what the EMA buys",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="score this trained run (folder or .pt) instead of training one; --out gets the grids",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.lr=1e-3")
    args = p.parse_intermixed_args()  # overrides may come before, between or after the options
    if args.quick:
        args.cpu_minutes, args.chunk, args.num_images = 0.2, 10, 32
        args.num_real = args.num_real or 64  # Inception on all real images would be most of the smoke run

    overrides = {
        "data.source": "flowers102",
        "data.root": args.data_root,
        "train.device": args.device,
        "train.sample_every": 0,
        "train.eval_every": 0,  # scored below, once, with more images
        "train.checkpoint_every": args.chunk,
        "train.keep_last": 1,
    }
    overrides.update(dict(kv.split("=", 1) for kv in args.overrides))
    config = apply_overrides(preset(args.preset), overrides)
    if args.quick:
        config = apply_overrides(config, {"model.base_channels": 32, "model.num_res_blocks": 1, "train.batch_size": 8})
    runs = [parse_sampler(spec) for spec in args.samplers.split(",")]  # bad specs fail before any training
    out = Path(args.out)
    torch.manual_seed(0)
    keep_freed_memory()  # as python -m ddpm.train does
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        model, schedule, cfg = model_from_state(state, use_ema=args.weights == "ema", device=args.device)
        steps, cpu_s, wall_s = int(state["step"]), None, None
        out.mkdir(parents=True, exist_ok=True)
        print(f"scoring {args.checkpoint} (step {steps}, {args.weights} weights), seed {args.seed}")
    else:
        if out.exists() and any(out.glob("*.pt")):
            raise UsageError(f"{out} already holds a run; pass another --out, delete it, or score it with --checkpoint")
        print(
            f"training {args.preset} on {args.data_root} for {args.cpu_minutes:g} CPU-minutes "
            f"({get_device(args.device)})"
        )
        steps, cpu_s, wall_s = train_for_budget(config, out, args.cpu_minutes * 60, args.chunk)
        model, schedule, cfg = load_model(out / "latest.pt", use_ema=args.weights == "ema", device=args.device)

    real = load_dataset("flowers102", args.data_root, image_size=cfg.data.image_size)
    evaluator = FIDEvaluator(real, device=args.device, num_real=args.num_real)
    rows = []
    for method, nfe, spacing in runs:
        t0 = time.perf_counter()
        images = generate(
            model,
            schedule,
            cfg,
            n=args.num_images,
            method=method,
            steps=nfe,
            spacing=spacing,
            seed=args.seed,
            batch_size=250,
            progress=False,
        )
        sample_s = time.perf_counter() - t0
        scores = evaluator.score(images)
        spacing = spacing or DEFAULT_SPACING[method]
        live = "_live" if args.weights == "live" else ""
        save_grid(images[:64], out / f"samples_{method}_{nfe}_{spacing}_seed{args.seed}{live}.png")
        rows.append(
            {
                "method": method,
                "nfe": nfe,
                "spacing": spacing,
                "seed": args.seed,
                "weights": args.weights,
                "fid": round(scores["fid"], 2),
                "kid_mean": round(scores["kid_mean"], 5),
                "kid_std": round(scores["kid_std"], 5),
                "sample_s": round(sample_s, 1),
            }
        )
        print(
            f"  {method} {nfe} NFE ({spacing}): FID {scores['fid']:.2f}, KID {scores['kid_mean']:.4f}, "
            f"sampling {sample_s:.0f} s",
            flush=True,
        )

    params = sum(p.numel() for p in model.parameters())
    trained = (
        f"{steps} steps (batch {cfg.train.batch_size})"
        if cpu_s is None
        else f"{steps} steps (batch {cfg.train.batch_size}) in {cpu_s / 60:.1f} CPU-min / {wall_s / 60:.1f} wall-min"
    )
    print(
        f"\n{trained}; {params / 1e6:.1f} M params, {args.weights} weights; {args.num_images} generated vs "
        f"{len(evaluator.real_features)} real images"
    )
    print(f"{'method':<14}{'NFE':>6}{'spacing':>10}{'FID':>9}{'KID':>10}{'±':>9}{'sample s':>10}")
    for r in rows:
        print(
            f"{r['method']:<14}{r['nfe']:>6}{r['spacing']:>10}{r['fid']:>9.2f}{r['kid_mean']:>10.4f}"
            f"{r['kid_std']:>9.4f}{r['sample_s']:>10.1f}"
        )
    print(f"grids: {out}/samples_*.png")
    minutes = (
        {"cpu_minutes": None, "wall_minutes": None}
        if cpu_s is None
        else {"cpu_minutes": round(cpu_s / 60, 2), "wall_minutes": round(wall_s / 60, 2)}
    )
    print(
        json.dumps(
            {
                "benchmark": "quality_budget",
                "preset": None if args.checkpoint else args.preset,
                "checkpoint": args.checkpoint,
                **minutes,
                "steps": steps,
                "batch_size": cfg.train.batch_size,
                "params": params,
                "num_generated": args.num_images,
                "num_real": len(evaluator.real_features),
                "config": cfg.to_dict(),
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    run(main)
