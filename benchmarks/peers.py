"""How fast do the peer UNets train here, measured exactly as benchmarks/train_throughput.py measures ours?

    python benchmarks/peers.py                                  # both peers, 64 and 128 px, bf16, batch 16
    python benchmarks/peers.py --peers diffusers --sizes 64 --precision both --channels-last both
    python benchmarks/peers.py --steps 1 --warmup 0 --batch-size 2   # smoke test

Peers, built as their users build them:
  lucidrains  denoising-diffusion-pytorch's README UNet, Unet(dim=64, dim_mults=(1, 2, 4, 8)), ~35.7 M params
  diffusers   UNet2DModel as examples/unconditional_image_generation/train_unconditional.py builds it

The peers are optional and must not replace this venv's torch: install them beside it, without deps,
    python -m pip install --target ~/peers_pkgs --no-deps denoising-diffusion-pytorch diffusers \\
        einops ema-pytorch accelerate pytorch-fid huggingface_hub safetensors importlib_metadata regex \\
        zipp lazy-importer httpx2 httpcore2 truststore
    PYTHONPATH=~/peers_pkgs python benchmarks/peers.py
A peer that does not import is skipped (exit code 0), with what to install.

The training step is ours for every model (train_throughput.py's terms, so only the network differs):
epsilon-prediction MSE with the linear schedule (ddpm.diffusion.training_loss), backward, fused AdamW,
our EMA update, under bf16 autocast or fp32, channels_last unless told otherwise. Figures, each from a
process that ran only that configuration: forward GFLOPs per image (FlopCounterMode, batch 1),
images/s (fastest of --steps steps), achieved GFLOP/s = 3 x forward FLOPs x images/s, utilisation
against the dense-conv peak measured in the same process before and after the steps, peak RSS.
Prints a table, then the results as one line of JSON (the last line).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version

import torch
from common import run  # (importing common puts the repo on sys.path)
from torch import nn
from train_throughput import forward_flops, peak_rss_mb, peak_shape, time_training, training_step

from ddpm.checkpoint import UsageError, UsageParser
from ddpm.device import get_device, keep_freed_memory

PEERS = {"lucidrains": "denoising-diffusion-pytorch", "diffusers": "diffusers"}  # name -> pip package


class SampleOf(nn.Module):
    """diffusers returns UNet2DOutput; training_loss and forward_flops want model(x, t) -> tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def build(peer: str, size: int) -> nn.Module:
    """The peer's network as model(x, t) -> eps; ImportError if the peer (or what it imports) is missing."""
    if peer == "lucidrains":
        from denoising_diffusion_pytorch import Unet

        return Unet(dim=64, dim_mults=(1, 2, 4, 8))  # the README's model, every other argument at its default
    import diffusers

    # as in huggingface/diffusers examples/unconditional_image_generation/train_unconditional.py, read at
    # commits c2076599 and 00769f61 (identical there); the example trains at --resolution 64, batch 16
    net = diffusers.UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    return SampleOf(net)


def run_config(args) -> dict:
    """One (peer, size, precision, layout) configuration: build, count, time. Runs in its own process."""
    device = get_device(args.device)
    malloc_kept = keep_freed_memory() if args.malloc == "keep" else False
    torch.manual_seed(0)
    try:
        model = build(args.peer, args.size)
    except ImportError as e:  # an optional peer: the parent reports it and goes on
        return {"peer": args.peer, "missing": str(e)}
    fmt = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, args.size, 3, device)
    x0 = (torch.rand(args.batch_size, 3, args.size, args.size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    # our step around their network, with our EMA: both peers' own trainers keep an EMA too
    step = training_step(model, x0, device, args.precision)
    channels_last = args.channels_last == "on"
    timed = time_training(
        step, device, args.precision, channels_last=channels_last, quick=False, steps=args.steps, warmup=args.warmup
    )
    sec, peak, first_step_s = timed["step_s"], timed["conv_peak_gflops"], timed["first_step_s"]
    achieved = 3 * flops * args.batch_size / sec / 1e9
    return {
        "peer": args.peer,
        "package": PEERS[args.peer],
        "version": version(PEERS[args.peer]),
        "image_size": args.size,
        "precision": args.precision,
        "channels_last": channels_last,
        "batch_size": args.batch_size,
        "params": n_params,
        "fwd_gflops_per_image": flops / 1e9,
        "step_ms": sec * 1e3,
        "images_per_s": args.batch_size / sec,
        "achieved_gflops": achieved,
        "conv_peak_gflops": peak,
        "utilisation": achieved / peak,
        "peak_rss_mb": peak_rss_mb(),
        "malloc_keep": malloc_kept,
        "first_step_s": first_step_s,
    }


def main() -> None:
    p = UsageParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default="lucidrains,diffusers", help=f"comma-separated, from {','.join(PEERS)}")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--sizes", default="64,128", help="comma-separated image sizes")
    p.add_argument("--precision", default="bf16", choices=("both", "fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--channels-last", default="on", choices=("on", "off", "both"))
    p.add_argument("--malloc", default="keep", choices=("system", "keep"), help="as in train_throughput.py")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # worker: "peer,size"
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._one is not None:  # worker process: one configuration, one JSON line
        args.peer, size = args._one.split(",")
        args.size = int(size)
        print(json.dumps(run_config(args)))
        return

    device = get_device(None if args.device == "auto" else args.device)
    peers = args.peers.split(",")
    if unknown := set(peers) - set(PEERS):
        raise UsageError(f"unknown peer(s) {sorted(unknown)}; valid: {', '.join(PEERS)}")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    layouts = ["on", "off"] if args.channels_last == "both" else [args.channels_last]

    results, skipped = [], {}
    for peer in peers:
        for size in (int(s) for s in args.sizes.split(",")):
            for precision in precisions:
                for layout in layouts:
                    if peer in skipped:  # one failed import says it all
                        continue
                    cmd = [
                        sys.executable,
                        __file__,
                        "--_one",
                        f"{peer},{size}",
                        "--device",
                        str(device),
                        "--precision",
                        precision,
                        "--batch-size",
                        str(args.batch_size),
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--channels-last",
                        layout,
                        "--malloc",
                        args.malloc,
                    ]
                    cmd += ["--threads", str(args.threads)] if args.threads else []
                    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"benchmark of {peer} {size} px {precision} failed:\n{proc.stderr[-3000:]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    if "missing" in r:
                        skipped[peer] = r["missing"]
                        print(
                            f"skipping {peer}: {r['missing']}. To include it: pip install {PEERS[peer]} "
                            f"(or --target DIR --no-deps plus its imports, then PYTHONPATH=DIR; see the docstring)"
                        )
                    else:
                        results.append(r)

    tried = ", ".join("channels_last" if x == "on" else "contiguous (nchw)" for x in layouts)
    pb, pc, ps = peak_shape(quick=False)
    print(
        f"\nPeer UNet training throughput on {device} ({torch.get_num_threads()} threads, "
        f"torch {torch.__version__}), malloc={args.malloc}, layouts tried: {tried}"
    )
    print(
        f"peak: 3x3 conv {pc}->{pc} ch, {ps}x{ps}, batch {pb}, fwd+bwd, in the row's precision and layout, "
        "measured around its steps"
    )
    header = (
        f"{'peer':>10} {'size':>5} {'batch':>5} {'params':>8} {'GFLOP/img':>9} {'prec':>5} {'layout':>6} "
        f"{'img/s':>8} {'ms/step':>8} {'GFLOP/s':>8} {'peak':>6} {'util':>6} {'peak MB':>8} {'1st step s':>10}"
    )
    print(header)
    print("-" * len(header))
    if not results:
        print("nothing measured: no peer could be imported (see above)")
    for r in results:
        print(
            f"{r['peer']:>10} {r['image_size']:>5} {r['batch_size']:>5} {r['params'] / 1e6:>7.2f}M "
            f"{r['fwd_gflops_per_image']:>9.2f} {r['precision']:>5} {'cl' if r['channels_last'] else 'nchw':>6} "
            f"{r['images_per_s']:>8.2f} {r['step_ms']:>8.0f} {r['achieved_gflops']:>8.0f} "
            f"{r['conv_peak_gflops']:>6.0f} {r['utilisation']:>6.1%} {r['peak_rss_mb']:>8.0f} "
            f"{r['first_step_s']:>10.1f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "peers",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "malloc": args.malloc,
                "steps": args.steps,
                "warmup": args.warmup,
                "skipped": skipped,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    run(main)
