"""Classifier-free guidance, measured: FID and KID of a class-conditional model's samples against the guidance
scale w, the quality/diversity trade-off (Ho & Salimans 2022). w = 1 is the conditional model alone; a larger
w pushes each image towards its class and away from the unconditional model, sharper but less varied.

    python benchmarks/guidance.py --checkpoint checkpoints/cond32.pt
    python benchmarks/guidance.py --checkpoint checkpoints/cond32 --scales 1,1.5,2,3,5 --num-images 512
    python benchmarks/guidance.py --checkpoint checkpoints/cond32.pt --sampler ddim:50 --seed 1

Every scale draws the same start noise (--seed) and the same labels: the classes in turn, so each of the
102 appears equally often, as in the shared 2,040-photo copy (20 a class; the full Flowers102 has 40 to 258).
The images are scored against the real ones at the model's size with ddpm.metrics (TF-FID Inception). Writes,
under --out, one grid per scale (the first 64 images: classes 0 to 63), guidance.png (FID and KID against w) and
guidance.json; prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO, default_data_root, parse_sampler, run  # (importing common puts the repo on sys.path)

from ddpm.checkpoint import UsageError, UsageParser, load_model
from ddpm.data import load_dataset
from ddpm.device import keep_freed_memory
from ddpm.metrics import FIDEvaluator
from ddpm.sample import generate
from ddpm.samplers import DEFAULT_SPACING, default_sampler
from ddpm.viz import guidance_figure, save_figure, save_grid


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--scales: {text!r} is not a comma-separated list of numbers, e.g. 1,1.5,2,3,5") from None
    if not scales or min(scales) < 0:
        raise UsageError(f"--scales: {text!r}; want guidance weights >= 0 (1 = no guidance)")
    return scales


def sweep(model, schedule, cfg, evaluator, args, sampler) -> list[dict]:
    method, steps, spacing = sampler
    rows = []
    for w in args.scales:
        t0 = time.perf_counter()
        images = generate(
            model, schedule, cfg, n=args.num_images, method=method, steps=steps, spacing=spacing, seed=args.seed,
            guidance_scale=w, batch_size=256, progress=False,
        )  # fmt: skip
        sample_s = time.perf_counter() - t0
        scores = evaluator.score(images)
        save_grid(images[:64], Path(args.out) / f"samples_w{w:g}_seed{args.seed}.png", nrow=8)
        rows.append(
            {
                "guidance_scale": w,
                "fid": round(scores["fid"], 2),
                "kid_mean": round(scores["kid_mean"], 5),
                "kid_std": round(scores["kid_std"], 5),
                "sample_s": round(sample_s, 1),
            }
        )
        print(f"  w {w:g}: FID {scores['fid']:.2f}, KID {scores['kid_mean']:.4f}, {sample_s:.0f} s", flush=True)
    return rows


def main() -> None:
    p = UsageParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a class-conditional checkpoint, or its run folder")
    p.add_argument("--scales", type=parse_scales, default=parse_scales("1,1.5,2,3,5"), help="default 1,1.5,2,3,5")
    p.add_argument("--num-images", type=int, default=512, help="generated images per scale")
    p.add_argument("--num-real", type=int, default=None, help="real images scored against (default all)")
    p.add_argument("--sampler", default=None, help="method:steps[:spacing]; default: the model's own")
    p.add_argument("--seed", type=int, default=0, help="seed of the start noise, the same for every scale")
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--weights", default=None, help="Inception weights file (default: ddpm.metrics' search order)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "guidance"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.num_images < 2:
        raise UsageError(f"--num-images {args.num_images}: KID needs at least 2")

    model, schedule, cfg = load_model(args.checkpoint, device=args.device)
    if cfg.model.num_classes is None:
        raise UsageError(f"{args.checkpoint} is an unconditional model: guidance needs a class-conditional one")
    if args.sampler:
        sampler = parse_sampler(args.sampler, "--sampler")
    else:
        sampler = (*default_sampler(cfg.diffusion.prediction_type, cfg.diffusion.schedule), None)
    keep_freed_memory()
    real = load_dataset(cfg.data.source, args.data_root, image_size=cfg.model.image_size)
    evaluator = FIDEvaluator(real, device=args.device, num_real=args.num_real, weights=args.weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_real = len(evaluator.real_features)
    print(f"guidance sweep of {args.checkpoint}: {args.num_images} images per scale vs {num_real} real")
    rows = sweep(model, schedule, cfg, evaluator, args, sampler)

    method, steps, spacing = sampler
    spacing = spacing or DEFAULT_SPACING[method]
    title = f"{Path(args.checkpoint).name}: {args.num_images} samples ({method} {steps}, seed {args.seed})"
    save_figure(guidance_figure(rows, title=title), out / "guidance.png", dpi=120)
    print(f"\n{'w':>6}{'FID':>9}{'KID':>10}{'±':>9}{'sample s':>10}")
    for r in rows:
        print(
            f"{r['guidance_scale']:>6g}{r['fid']:>9.2f}{r['kid_mean']:>10.4f}{r['kid_std']:>9.4f}{r['sample_s']:>10.1f}"
        )
    result = {
        "benchmark": "guidance",
        "checkpoint": args.checkpoint,
        "sampler": {"method": method, "steps": steps, "spacing": spacing},
        "seed": args.seed,
        "num_generated": args.num_images,
        "num_real": num_real,
        "results": rows,
    }
    (out / "guidance.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"plot: {out / 'guidance.png'}; grids: {out}/samples_w*.png")
    print(json.dumps(result))


if __name__ == "__main__":
    run(main)
