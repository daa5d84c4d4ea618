"""How fast is the data pipeline, and how much of a training step does it cost?

    python benchmarks/data_loader.py                      # shared Flowers102 copy (or $DATA_ROOT), 64 px
    python benchmarks/data_loader.py --image-size 32 --batch-size 128 --quick

Measures, on one dataset:
  decode    building the uint8 cache from the image files (JPEG decode + crop + resize, all cores)
  cache     loading that cache again (what every later run pays)
  stream    BatchStream: gather + transfer + flip + scale to [-1, 1], per batch
  step      one training step (forward, backward, AdamW) of the UNet preset for the image size
and prints a table, then one line of JSON. The loader's share is stream / (stream + step): the fraction
of a step spent waiting for data if nothing overlapped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import default_data_root, run  # noqa: E402  (importing common puts the repo on sys.path)

from ddpm.checkpoint import UsageParser
from ddpm.data import BatchStream, load_dataset  # noqa: E402
from ddpm.device import get_device, keep_freed_memory, synchronize  # noqa: E402


def time_stream(stream: BatchStream, n: int) -> float:
    """Seconds per batch, after a few warm-up batches (pinned-memory pool, first CUDA copies)."""
    for _ in range(3):
        next(stream)
    synchronize(stream.device)
    t0 = time.perf_counter()
    for _ in range(n):
        x, y = next(stream)
    synchronize(stream.device)
    return (time.perf_counter() - t0) / n


def time_train_step(image_size: int, stream: BatchStream, n: int, device: torch.device) -> tuple[float | None, str]:
    """Seconds per training step of UNet(unet_preset(image_size)) on batches from `stream`."""
    try:
        from ddpm.device import autocast
        from ddpm.diffusion import training_loss
        from ddpm.schedules import make_schedule
        from ddpm.train import optimizer_impl
        from ddpm.unet import UNet, preferred_memory_format, set_norm_path, unet_preset
    except ImportError as err:
        return None, f"not timed: {err}"
    # the step python -m ddpm.train takes: its norm path and layout, its AdamW flags, autocast where native
    fmt = preferred_memory_format(device)
    model = set_norm_path(UNet(unet_preset(image_size)), device).to(device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_impl(device))
    schedule = make_schedule("linear")

    def step():
        x, _ = next(stream)
        x = x.contiguous(memory_format=fmt)
        with autocast(device):
            loss = training_loss(model, schedule, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # warm-up, not timed: cuDNN autotuning, allocator, optimizer state (a slow first step would flatter the loader)
    step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    return (time.perf_counter() - t0) / n, f"UNet(unet_preset({image_size})), {n_params / 1e6:.1f}M params"


def main() -> None:
    p = UsageParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-root", default=default_data_root(), help="Flowers102 root (holds flowers-102/) or an image folder"
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="auto (default), cuda, mps or cpu")
    p.add_argument("--quick", action="store_true", help="fewer timed batches and steps (for CI)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 avoids oversubscription on a busy CPU",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = get_device(args.device)
    keep_freed_memory()  # as python -m ddpm.train does
    root = Path(args.data_root)
    source = "flowers102" if (root / "flowers-102").is_dir() else "folder"
    n_batches, n_steps = (20, 1) if args.quick else (200, 5)

    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh cache, so the first load really decodes
        t0 = time.perf_counter()
        ds = load_dataset(source, root, image_size=args.image_size, cache_dir=cache_dir)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_dataset(source, root, image_size=args.image_size, cache_dir=cache_dir)
        cache_s = time.perf_counter() - t0
    assert ds.source_info["from_cache"]

    stream = BatchStream(ds, args.batch_size, seed=0, device=device)
    batch_s = time_stream(stream, n_batches)
    step_s, step_note = time_train_step(args.image_size, stream, n_steps, device)

    n, b = len(ds), args.batch_size
    rows = [
        (
            "decode (build cache)",
            f"{n / decode_s:,.0f} images/s",
            f"{n:,} images in {decode_s:.2f} s, {os.cpu_count()} cores",
        ),
        ("cache load", f"{n / cache_s:,.0f} images/s", f"{cache_s * 1e3:.0f} ms"),
        ("BatchStream", f"{b / batch_s:,.0f} images/s", f"{batch_s * 1e3:.2f} ms per batch of {b}"),
        (
            "train step",
            f"{b / step_s:,.0f} images/s" if step_s else "-",
            (f"{step_s * 1e3:.1f} ms per step; " if step_s else "") + step_note,
        ),
    ]
    share = batch_s / (batch_s + step_s) if step_s else None
    print(
        f"\ndata loader on {device} ({torch.get_num_threads()} torch threads): {source} at {root}, "
        f"image_size={args.image_size}, batch_size={b} (timings are provisional when other jobs share the CPU)"
    )
    for name, rate, note in rows:
        print(f"  {name:<22} {rate:>18}   {note}")
    print(f"  {'loader share of step':<22} {f'{share:.2%}' if share is not None else '-':>18}")
    print(
        json.dumps(
            {
                "benchmark": "data_loader",
                "device": str(device),
                "source": source,
                "n_images": n,
                "image_size": args.image_size,
                "batch_size": b,
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "decode_images_per_s": round(n / decode_s, 1),
                "cache_load_s": round(cache_s, 4),
                "stream_images_per_s": round(b / batch_s, 1),
                "stream_ms_per_batch": round(batch_s * 1e3, 3),
                "train_step_ms": round(step_s * 1e3, 2) if step_s else None,
                "loader_share": round(share, 5) if share is not None else None,
            }
        )
    )


if __name__ == "__main__":
    run(main)
