"""How long does an FID evaluation take, and what does the real-feature cache save?

    python benchmarks/fid.py                          # shared Flowers102 copy (or $DATA_ROOT), 64 px, CPU
    python benchmarks/fid.py --device cuda --num-images 1000
    python benchmarks/fid.py --quick

Measures, with the weights ddpm.metrics finds (see find_inception_weights):
  inception   Inception feature throughput, images/s at batch 50 (after one warm-up batch)
  uncached    FIDEvaluator on N real images with an empty cache + score() of N "generated" images
  cached      the same with the real features already on disk: only the generated images go through Inception
  maths       FID + KID (100 subsets) from features alone: what is left of `cached` without Inception
The "generated" images are N real flowers disjoint from the real set, so the FID printed is the
real-vs-real floor at this N (FID is biased upwards for small N). Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from common import default_data_root, run  # noqa: E402  (importing common puts the repo on sys.path)

from ddpm.checkpoint import UsageError, UsageParser
from ddpm.data import load_dataset  # noqa: E402
from ddpm.device import get_device, synchronize  # noqa: E402
from ddpm.metrics import FIDEvaluator, extract_features, fid_kid_from_features, format_protocol, load_inception  # noqa: E402,E501


def main() -> None:
    parser = UsageParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-root", default=default_data_root(), help="Flowers102 root (default: $DATA_ROOT or the shared copy)"
    )
    parser.add_argument(
        "--num-images", type=int, default=None, help="real and generated images each (default 100, --quick 25)"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--weights", default=None, help="Inception weights file (default: the search order)")
    parser.add_argument("--quick", action="store_true", help="25 images: a smoke run")
    args = parser.parse_args()
    n = args.num_images or (25 if args.quick else 100)
    device = get_device(args.device)

    data = load_dataset("flowers102", args.data_root, image_size=args.image_size, split="all")
    if len(data) < 2 * n:
        raise UsageError(f"--num-images {n} needs {2 * n} images (real + generated), the dataset has {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    real, generated = data.images[order[:n]], data.images[order[n : 2 * n]]

    extractor = load_inception(args.weights, device=device)
    for _ in range(2):  # warm-up: TorchScript profiles its first call and optimises on the second
        extract_features(extractor, generated[:8])
    synchronize(device)
    t0 = time.perf_counter()
    generated_features = extract_features(extractor, generated, batch_size=args.batch_size)
    synchronize(device)
    images_per_s = n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        cold = FIDEvaluator(
            real, extractor=extractor, cache_dir=cache_dir, batch_size=args.batch_size, name="flowers102", split="all"
        )
        result = cold.score(generated)
        uncached_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = FIDEvaluator(
            real, extractor=extractor, cache_dir=cache_dir, batch_size=args.batch_size, name="flowers102", split="all"
        )
        assert warm.real_from_cache, "the second evaluator should have found the cached real features"
        warm.score(generated)
        cached_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid_kid_from_features(warm.real_features.to(device), generated_features.to(device))
    synchronize(device)
    maths_s = time.perf_counter() - t0

    print(format_protocol(result))
    print()
    rows = [
        (f"inception features (batch {args.batch_size})", f"{images_per_s:.1f} images/s"),
        (f"FID eval, real stats not cached ({n} real + {n} gen)", f"{uncached_s:.1f} s"),
        (f"FID eval, real stats cached ({n} gen)", f"{cached_s:.1f} s"),
        ("FID + KID maths from features", f"{maths_s:.2f} s"),
        (f"FID real vs real at N={n} (the floor)", f"{result['fid']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), weights {extractor.info['weights']}")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value:>16}")
    print(
        json.dumps(
            {
                "benchmark": "fid",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "num_images": n,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "weights_format": extractor.weights_format,
                "inception_images_per_s": round(images_per_s, 2),
                "eval_uncached_s": round(uncached_s, 2),
                "eval_cached_s": round(cached_s, 2),
                "fid_kid_maths_s": round(maths_s, 3),
                "fid_real_vs_real": round(result["fid"], 2),
                "kid_mean": round(result["kid_mean"], 5),
            }
        )
    )


if __name__ == "__main__":
    run(main)
