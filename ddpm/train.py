"""Training: the loop as small named steps (build, resume, one step, log, sample, save), DDP and the command line.

    python -m ddpm.train --preset quick --data-root path/to/flowers --out checkpoints/quick
    python -m ddpm.train --preset cpu64 --data-root data --out checkpoints/cpu64 --train.epochs 60
    python -m ddpm.train --out checkpoints/cpu64 --resume --max-steps 4000       # config from the run folder
    torchrun --nproc_per_node 4 -m ddpm.train --preset flowers128 --data-root data --out checkpoints/f128

Config keys and overrides: ddpm.config. From a notebook:
    from ddpm.config import preset
    from ddpm.train import train
    result = train(preset("quick", **{"data.root": "path/to/flowers"}), out_dir="checkpoints/quick")

train.batch_size is the number of images per optimizer step over all processes and micro-batches, so a
preset means the same optimisation on one GPU or eight. A run folder holds config.json, log.jsonl,
loss.png, samples/step_XXXXXXX.png and the checkpoints (see ddpm.checkpoint); an interrupted run
(Ctrl-C, a crash, a pre-empted job) goes on from its newest checkpoint with --resume, exactly where the
world size and batch settings are unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import diffusion, viz
from .checkpoint import UsageError
from .config import (
    PRESETS,
    ConfigError,
    RunConfig,
    TrainConfig,
    apply_overrides,
    parse_override_args,
    with_defaults,
)
from .data import IMAGE_EXTENSIONS, DataNotFoundError, detect_source
from .device import autocast, describe_precision, get_device, keep_freed_memory, needs_grad_scaler, seed_everything
from .ema import EMA
from .sample import generate
from .unet import UNet, fused_norm_for, preferred_memory_format, set_norm_path

# ---------------------------------------------------------------------------------------------- helpers


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant, cosine or linear
    decay to min_lr_ratio * lr at max_steps, over all the steps after warm-up or over the last decay_steps
    (constant until then: a run can be extended, then cooled down). Derived from the step alone, so resuming
    needs no scheduler state.
    """
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_decay == "none":
        return tc.lr
    start = tc.warmup_steps if tc.decay_steps is None else max(tc.warmup_steps, tc.max_steps - tc.decay_steps)
    progress = min(1.0, max(0.0, (step - start) / max(1, tc.max_steps - start)))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.lr_decay == "cosine" else 1.0 - progress
    min_lr = tc.lr * tc.min_lr_ratio
    return min_lr + shape * (tc.lr - min_lr)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.999), **optimizer_impl(device))


def optimizer_impl(device: torch.device | str) -> dict:
    """AdamW's implementation flags for `device`: fused (one kernel for all parameters) on CUDA and CPU,
    foreach (batched ops) on MPS, where fused support depends on the torch and macOS versions."""
    return {"fused": None, "foreach": True} if torch.device(device).type == "mps" else {"fused": True, "foreach": None}


def use_compile(tc: TrainConfig, device: torch.device) -> bool:
    """train.compile, or by default on CUDA only: the benchmarks measured torch.compile slower on the CPU."""
    return device.type == "cuda" if tc.compile is None else tc.compile


def configure_backends(device: torch.device) -> None:
    """Backend switches for training on `device`: on CUDA, cudnn.benchmark, since training shapes are fixed and
    the fastest convolution algorithm is then picked once (a process-wide switch: training owns the process)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def describe_device(device: torch.device, tc: TrainConfig) -> str:
    """What training on `device` gets, in one line: precision, layout and norm path, compile."""
    layout = "NCHW" if preferred_memory_format(device) == torch.contiguous_format else "channels_last"
    norm = "fused GroupNorm-SiLU-conv node" if fused_norm_for(device) else "F.group_norm + SiLU + Conv2d"
    compiled = "torch.compile on" if use_compile(tc, device) else "torch.compile off"
    return f"{device}: {describe_precision(device, tc.precision)}; {layout}, {norm}; {compiled}"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup_dist(device_pref: str, *, timeout_s: float = 600.0) -> tuple[DistInfo, torch.device]:
    """DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise. A collective
    that waits longer than timeout_s for a peer (one that hangs, or died before the rendezvous) raises."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(), get_device(device_pref)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # the rank itself comes from the process group
    device = get_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise RuntimeError("DDP on MPS is not supported; use device='cpu' (Gloo) or CUDA (NCCL)")
    created = False
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, created), device


def resolve_config(cfg: RunConfig, dataset, world_size: int) -> RunConfig:
    """The config as the run will use it, fixed once before building: num_classes from the data for a
    conditional run, and epoch settings turned into steps (one epoch = one pass of every rank's shard)."""
    tc = cfg.train
    if tc.conditional and cfg.model.num_classes is None:
        if dataset.num_classes is None:
            raise ConfigError(
                f"train.conditional=true needs class labels, but the {cfg.data.source} data at "
                f"{cfg.data.root} has none; use --train.conditional false"
            )
        cfg = apply_overrides(cfg, {"model.num_classes": dataset.num_classes})
    elif not tc.conditional and cfg.model.num_classes is not None:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but train.conditional=false; set "
            "--train.conditional true, or --model.num_classes none for an unconditional model"
        )
    micro = tc.batch_size // (world_size * tc.grad_accum)
    steps_per_epoch = max(1, (len(dataset) // world_size) // micro // tc.grad_accum)
    return RunConfig(model=cfg.model, diffusion=cfg.diffusion, train=cfg.train.in_steps(steps_per_epoch), data=cfg.data)


def check_batch_split(tc: TrainConfig, world_size: int) -> int:
    """Images per micro-batch on each process."""
    per_rank = tc.batch_size // (world_size * tc.grad_accum)
    if per_rank < 1 or per_rank * world_size * tc.grad_accum != tc.batch_size:
        raise ConfigError(
            f"batch_size={tc.batch_size} must divide evenly into world_size={world_size} x "
            f"grad_accum={tc.grad_accum} micro-batches"
        )
    return per_rank


def _check_resumable(saved: dict, cfg: RunConfig, path: Path) -> None:
    """Refuse a checkpoint whose model, diffusion or data stream differs; mention changed training settings."""
    saved, current = with_defaults(saved), cfg.to_dict()
    ckpt.check_compatible(saved["model"], current["model"], what="model config", source=path)
    ckpt.check_compatible(saved["diffusion"], current["diffusion"], what="diffusion config", source=path)
    data_keys = ("source", "image_size", "split")
    ckpt.check_compatible(
        {k: saved["data"].get(k) for k in data_keys},
        {k: current["data"][k] for k in data_keys},
        what="data config",
        source=path,
    )
    saved_train, current_train = dict(saved["train"]), dict(current["train"])
    if saved_train["lr_decay"] == current_train["lr_decay"] == "none":
        for key in ("max_steps", "epochs"):  # at a constant rate, a longer run repeats the shorter one's steps
            del saved_train[key], current_train[key]
    changed = ckpt.config_differences(saved_train, current_train, prefix="train.")
    if changed:
        print(
            "resuming with changed training settings (the run will not repeat exactly):\n  " + "\n  ".join(changed),
            file=sys.stderr,
        )


def _read_history(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row torn by a kill mid-append: the rows after the checkpoint go anyway
            break
    return [r for r in rows if r["step"] <= upto]


@dataclass
class TrainResult:
    step: int  # the last step trained
    run_dir: Path
    checkpoint: Path | None  # the newest checkpoint (run_dir/latest.pt)
    config: RunConfig
    history: list[dict]  # the loss log rows: step, epoch, loss, lr, grad_norm, images_per_s, elapsed_s, cpu_s
    samples: list[Path]  # sample grids written by this call
    log_path: Path | None
    plot_path: Path | None
    model: torch.nn.Module  # the trained model (live weights; unwrapped from DDP / compile)
    ema: object  # its EMA (use `with result.ema.swapped_in(): ...` to sample)

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.history]


# ---------------------------------------------------------------------------------------------- the loop


def train(
    config: RunConfig,
    *,
    out_dir,
    resume: bool = False,
    max_steps: int | None = None,
    callback=None,
    progress: bool = True,
    evaluator=None,
) -> TrainResult:
    """Train `config`, writing checkpoints, samples and logs to `out_dir`.

    resume:    continue from out_dir's newest checkpoint (model, EMA, optimizer, grad scaler, RNG, data
               position), so N steps + resume + N steps equals 2N steps straight. Without it, out_dir must
               hold no checkpoints yet.
    max_steps: stop after this many total steps (default config.train.max_steps, or train.epochs' worth).
               The LR schedule still follows the config, so stopping early and resuming changes nothing.
    callback:  callback(step, info) on each log step (rank 0): info is the loss-log row plus "run_dir"
               (e.g. ddpm.viz.TrainingMonitor()).
    evaluator: for train.eval_every, a ddpm.metrics.FIDEvaluator of the real images to use (default: one
               built on the training images at the first evaluation).
    Under torchrun (WORLD_SIZE > 1) this runs DDP; only rank 0 writes files.
    """
    d, device = setup_dist(config.train.device, timeout_s=config.train.dist_timeout_s)
    loop = None
    try:
        loop = TrainLoop(
            RunConfig.from_dict(config.to_dict()),
            Path(out_dir),
            d=d,
            device=device,
            callback=callback,
            progress=progress,
            evaluator=evaluator,
        )
        loop.start(resume)
        return loop.run(max_steps)
    finally:
        if getattr(loop, "lock", None) is not None:
            loop.lock.release()  # now, not when the loop object is collected
        if d.created and dist.is_initialized():
            dist.destroy_process_group()


class TrainLoop:
    """One training run, as improved-diffusion's TrainLoop: start() builds or resumes, run() steps."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        d: DistInfo,
        device: torch.device,
        callback=None,
        progress: bool = True,
        evaluator=None,
    ):
        if cfg.data.source == "folder" and cfg.data.root is None:
            raise ConfigError("data.source='folder' needs the image folder: pass --data-root PATH (data.root)")
        self.cfg, self.run_dir, self.d, self.device = cfg, run_dir, d, device
        self.callback, self.progress = callback, progress
        self.per_rank = check_batch_split(cfg.train, d.world_size)
        self.log_path, self.plot_path = run_dir / "log.jsonl", run_dir / "loss.png"
        self.step, self.history, self.samples = 0, [], []
        self.evaluator = evaluator  # a ddpm.metrics.FIDEvaluator; None: built before the first step
        self.eval_off = False  # train.eval_every asked for, but no Inception weights: trains without FID
        self.compile_s = None

    # -- build and resume

    def start(self, resume: bool) -> None:
        if self.d.main:  # one live run per folder; taking the lock also proves the folder writable, before any work
            self.lock = ckpt.RunLock(self.run_dir).acquire()
            weakref.finalize(self, self.lock.release)  # when this loop is collected, or at exit
        state, path = self._find_state(resume)
        dataset = self._load_data()
        self.cfg = resolve_config(self.cfg, dataset, self.d.world_size)
        if state is not None:
            _check_resumable(state["config"], self.cfg, path)
        self._build(dataset)
        self.dataset = dataset  # the real images of the FID evaluations
        if state is not None:
            self._restore(state)
        elif self.d.enabled:
            seed_everything(self.cfg.train.seed + self.d.rank)  # timesteps/noise differ per rank; weights from rank 0
        self._open_log()
        if self.d.main:
            print(f"training on {describe_device(self.device, self.cfg.train)}", file=sys.stderr)

    def _find_state(self, resume: bool) -> tuple[dict | None, Path | None]:
        latest = ckpt.find_latest(self.run_dir)
        if not resume:
            if latest is not None:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints; pass --resume (resume=True) to "
                    "continue that run, or choose a new --out folder"
                )
            return None, None
        if latest is None:
            raise FileNotFoundError(
                f"resume asked for, but {self.run_dir} holds no checkpoint (latest.pt or "
                "step_XXXXXXX.pt); start without --resume"
            )
        return ckpt.load_checkpoint(latest), latest  # every rank reads the same checkpoint

    def _load_data(self):
        from .data import load_dataset

        dc = self.cfg.data

        def load():
            return load_dataset(dc.source, dc.root, image_size=dc.image_size, split=dc.split, cache_dir=dc.cache_dir)

        dataset = load() if self.d.main else None  # rank 0 builds the uint8 cache first: no race on writing it
        self.d.barrier()
        return dataset if dataset is not None else load()

    def _build(self, dataset) -> None:
        from .data import BatchStream

        cfg, tc, device = self.cfg, self.cfg.train, self.device
        self.schedule = cfg.diffusion.make_schedule()
        seed_everything(tc.seed)
        self.raw_model = UNet(cfg.model)
        set_norm_path(self.raw_model, device)  # the CPU's fused GroupNorm node, or the plain modules on CUDA/MPS
        self.raw_model.to(device, memory_format=preferred_memory_format(device))
        self.ema = EMA(
            self.raw_model,
            decay=tc.ema_decay,
            update_after_step=tc.ema_update_after_step,
            update_every=tc.ema_update_every,
            warmup=tc.ema_warmup,
        )
        self.optimizer = make_optimizer(self.raw_model, tc, device)
        # fp16 needs loss scaling (its range ends at 65504); bf16 and fp32 do not, and a disabled scaler is a no-op
        self.scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, tc.precision))
        self.stream = BatchStream(
            dataset, self.per_rank, seed=tc.seed, rank=self.d.rank, world_size=self.d.world_size, device=device
        )
        self.model = self.ddp_model = self.raw_model
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.model = self.ddp_model = DDP(self.raw_model, device_ids=ids)
        configure_backends(device)
        if use_compile(tc, device):
            self.model = torch.compile(self.model)

    def _restore(self, state: dict) -> None:
        tc, d = self.cfg.train, self.d
        self.raw_model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        # the EMA settings of this run win over the checkpoint's (a change was reported)
        self.ema.decay, self.ema.update_after_step = tc.ema_decay, tc.ema_update_after_step
        self.ema.update_every, self.ema.warmup = tc.ema_update_every, tc.ema_warmup
        # The checkpoint may come from another device type: its fused/foreach flags must be this device's
        # *before* loading, because load_state_dict places the `step` counters by them.
        for g in state["optimizer"]["param_groups"]:
            g.update(optimizer_impl(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        try:  # the exact data position and RNG draws, where this run has the same shape as the saved one
            if int(state.get("world_size", 1)) != d.world_size:
                raise ValueError(
                    f"the checkpoint was made on {state.get('world_size')} process(es), this run has {d.world_size}"
                )
            self.stream.load_state_dict(state["data"][d.rank])
            ckpt.restore_rng_state(state["rng"][d.rank])
        except ValueError as err:
            print(
                f"resuming approximately ({err}): the data order and noise draws will differ from an uninterrupted run",
                file=sys.stderr,
            )
            self.stream.seek(self.step * tc.grad_accum)
            seed_everything(tc.seed + 1000 * self.step + d.rank)

    def _open_log(self) -> None:
        if not self.d.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomically(self.run_dir / "config.json", self.cfg.to_json() + "\n")
        self.history = _read_history(self.log_path, self.step)
        rows = "".join(json.dumps(r) + "\n" for r in self.history)
        ckpt.write_text_atomically(self.log_path, rows)  # drops rows past the checkpoint

    # -- the hot loop: no host-device sync except at log, checkpoint and sample steps

    def run(self, stop: int | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        stop = tc.max_steps if stop is None else int(stop)
        self._prepare_evaluation()
        self.raw_model.train()
        self._reset_counters()
        bar = tqdm(
            total=stop,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and self.d.main),
        )
        try:
            while self.step < stop:
                if self.compile_s is None:
                    self._timed_first_step()
                else:
                    self.train_step()
                bar.update(1)
                do_ckpt = self.step % tc.checkpoint_every == 0 or self.step == stop
                do_sample = tc.sample_every > 0 and (self.step % tc.sample_every == 0 or self.step == stop)
                do_eval = self._evaluating() and (self.step % tc.eval_every == 0 or self.step == stop)
                if self.step % tc.log_every == 0 or do_ckpt or do_sample or do_eval:
                    self._log(bar, self.evaluate() if do_eval and self.d.main else {})
                    self._save_and_sample(do_ckpt, do_sample)
        finally:
            bar.close()
        self.d.barrier()
        d = self.d
        return TrainResult(
            step=self.step,
            run_dir=self.run_dir,
            checkpoint=ckpt.find_latest(self.run_dir),
            config=self.cfg,
            history=self.history,
            samples=self.samples,
            log_path=self.log_path if d.main else None,
            plot_path=self.plot_path if d.main and self.plot_path.exists() else None,
            model=self.raw_model,
            ema=self.ema,
        )

    def _reset_counters(self) -> None:
        device = self.device
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # steps the fp16 scaler skipped
        self.nonfinite_at = torch.full((), -1, dtype=torch.long, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.last_sync_step, self.last_sync_time = self.step, time.perf_counter()
        self.start_time, self.start_cpu = time.perf_counter(), time.process_time()
        last = self.history[-1] if self.history else {}
        self.elapsed_before, self.cpu_before = last.get("elapsed_s", 0.0), last.get("cpu_s", 0.0)

    def _timed_first_step(self) -> None:
        """The first step, timed: under torch.compile it is where the compiling happens, and the log says so."""
        from .device import synchronize

        t0 = time.perf_counter()
        self.train_step()
        synchronize(self.device)
        self.compile_s = time.perf_counter() - t0
        if use_compile(self.cfg.train, self.device) and self.d.main:
            print(f"torch.compile: the first step took {self.compile_s:.1f} s (compiling)", file=sys.stderr)

    def train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches, with loss scaling under fp16, clipping and the EMA."""
        tc, dt = self.cfg.train, self.cfg.diffusion
        lr = lr_at(self.step, tc)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            x, y = self._next_batch()
            # gradients are all-reduced only on the last micro-batch of a step
            last = micro == tc.grad_accum - 1
            no_sync = self.ddp_model.no_sync() if self.d.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(self.device, tc.precision):
                    loss = diffusion.training_loss(
                        self.model,
                        self.schedule,
                        x,
                        y=y,
                        prediction_type=dt.prediction_type,
                        loss_type=dt.loss_type,
                        min_snr_gamma=dt.min_snr_gamma,
                    )
                self.scaler.scale(loss / tc.grad_accum).backward()
            step_loss += loss.detach()
        self._optimizer_step()
        self.step += 1
        step_loss /= tc.grad_accum
        self.loss_sum += step_loss
        first_bad = torch.isfinite(step_loss) | (self.nonfinite_at >= 0)
        self.nonfinite_at = torch.where(first_bad, self.nonfinite_at, torch.full_like(self.nonfinite_at, self.step))

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        tc = self.cfg.train
        x, y = next(self.stream)
        x = x.contiguous(memory_format=preferred_memory_format(self.device))  # as the model's weights
        if not tc.conditional:
            return x, None
        if tc.class_dropout > 0:  # drop labels to the null class: teaches the unconditional model too
            drop = torch.rand(y.shape, device=self.device) < tc.class_dropout
            y = torch.where(drop, torch.full_like(y, self.raw_model.null_class), y)
        return x, y

    def _optimizer_step(self) -> None:
        tc = self.cfg.train
        scaling = self.scaler.is_enabled()
        if tc.grad_clip > 0 or scaling:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            # With the scaler on, the norm is also how a skipped step is seen without a sync: the scaler skips
            # exactly the steps whose gradients hold an inf or NaN, which makes the norm non-finite.
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
            if scaling:
                self.skipped += (~torch.isfinite(self.grad_norm)).long()
        self.scaler.step(self.optimizer)  # a plain optimizer.step() when the scaler is off
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()

    def _log(self, bar, scores: dict) -> None:
        """Sync point: the loss averaged over the steps since the last one (and over ranks), one log row."""
        d, tc = self.d, self.cfg.train
        stats = torch.stack([self.loss_sum.float(), self.grad_norm.float().reshape(()), self.skipped.float()])
        bad = self.nonfinite_at.clone()
        if d.enabled:
            dist.all_reduce(stats)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            stats /= d.world_size
        if int(bad) >= 0:
            raise FloatingPointError(
                f"the training loss became non-finite at step {int(bad)}; stopping. The last good checkpoint is "
                f"{ckpt.find_latest(self.run_dir)}. Lower train.lr, set train.grad_clip, or use precision=fp32."
            )
        now = time.perf_counter()
        trained_s = now - self.last_sync_time - scores.get("eval_s", 0.0)  # images/s counts training only
        n_steps = self.step - self.last_sync_step
        row = {
            "step": self.step,
            "epoch": round(self.stream.step / self.stream.batches_per_epoch, 4),
            "loss": stats[0].item() / n_steps,
            "lr": lr_at(self.step - 1, tc),
            "grad_norm": stats[1].item() if tc.grad_clip > 0 else None,
            "images_per_s": n_steps * tc.batch_size / max(trained_s, 1e-9),
            "elapsed_s": self.elapsed_before + now - self.start_time,
            "cpu_s": self.cpu_before + time.process_time() - self.start_cpu,
            **scores,  # fid, kid, eval_s at evaluation steps
        }  # cpu_s: the cost on a shared machine
        if self.scaler.is_enabled():
            row.update(skipped_steps=int(stats[2].item()), loss_scale=self.scaler.get_scale())
        if self.compile_s is not None and use_compile(tc, self.device) and len(self.history) == 0:
            row["compile_s"] = self.compile_s
        self.loss_sum.zero_()
        self.skipped.zero_()
        self.last_sync_step = self.step
        if d.main:
            self.history.append(row)
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(
                epoch=f"{row['epoch']:.2f}",
                loss=f"{row['loss']:.4f}",
                img_s=f"{row['images_per_s']:.0f}",
                refresh=False,
            )
            if self.callback is not None:
                self.callback(self.step, {**row, "run_dir": self.run_dir})

    def _evaluating(self) -> bool:
        return self.cfg.train.eval_every > 0 and not self.eval_off

    def _prepare_evaluation(self) -> None:
        """Before the first step, for train.eval_every: Inception (downloaded if missing and the network allows)
        and the real images' features (cached on disk), so a missing piece shows now, not hours in. Without
        weights the run trains on without FID (the presets ask for it), saying so once."""
        from .metrics import FIDEvaluator, InceptionWeightsNotFound, load_inception

        tc = self.cfg.train
        if not (self._evaluating() and self.d.main and self.evaluator is None):
            return
        try:
            extractor = load_inception(device=self.device, download=True)
        except InceptionWeightsNotFound as err:
            self.eval_off = True
            print(f"warning: no FID/KID during this run (train.eval_every={tc.eval_every}; 0 turns it off): {err}",
                  file=sys.stderr)  # fmt: skip
            return
        self.evaluator = FIDEvaluator(self.dataset, extractor=extractor, num_real=tc.eval_num_real, device=self.device)

    def evaluate(self) -> dict:
        """FID and KID of train.eval_n EMA samples (the model's default sampler, the run's seed) against the
        training images, with the evaluator _prepare_evaluation built; the best by FID so far is kept as
        run_dir/best.pt (EMA weights)."""
        tc, start = self.cfg.train, time.perf_counter()
        with self.ema.swapped_in():
            images = generate(self.raw_model, self.schedule, self.cfg, n=tc.eval_n, seed=tc.seed,
                              precision=tc.precision, progress=False)  # fmt: skip
        scores = self.evaluator.score(images)
        fid, kid = float(scores["fid"]), float(scores["kid_mean"])
        if fid < min((r["fid"] for r in self.history if "fid" in r), default=math.inf):
            note = f"best FID {fid:.2f} (KID {kid:.5f}) of {tc.eval_n} samples at step {self.step}"
            state = ckpt.exported(self.ema.shadow_state_dict(), self.cfg.to_dict(), self.step, torch.float32, note)
            ckpt.save_checkpoint(self.run_dir / "best.pt", state)
        return {"fid": fid, "kid": kid, "eval_s": time.perf_counter() - start}

    def _save_and_sample(self, do_ckpt: bool, do_sample: bool) -> None:
        if do_ckpt:
            self.save()
        if do_sample and self.d.main:
            self.write_samples()
        if (do_ckpt or do_sample) and self.d.main:
            viz.loss_figure(self.history).savefig(self.plot_path)
        self.last_sync_time = time.perf_counter()  # images/s counts training, not checkpoint or sampling time

    # -- outputs

    def write_samples(self) -> Path:
        """An EMA sample grid through the same generate() users call, from the same start noise every time
        (the run's seed), so the grids of a run are frames of one progression."""
        tc = self.cfg.train
        with self.ema.swapped_in():
            images = generate(
                self.raw_model,
                self.schedule,
                self.cfg,
                n=tc.sample_n,
                method=tc.sample_method,
                steps=tc.sample_steps,
                seed=tc.seed,
                precision=tc.precision,
                progress=False,
            )
        path = viz.save_grid(images, self.run_dir / "samples" / f"step_{self.step:07d}.png")
        self.samples.append(path)
        return path

    def save(self) -> Path | None:
        """A checkpoint of everything resume needs (rank 0 writes it, atomically)."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.raw_model.parameters()]).all()):
            raise FloatingPointError(
                f"the weights became non-finite by step {self.step} (the loss was still finite: "
                f"exploding gradients? lower train.lr or set train.grad_clip); not saving. "
                f"The last good checkpoint is {ckpt.find_latest(self.run_dir)}"
            )
        rng = self.d.gather(ckpt.capture_rng_state())
        data = self.d.gather(self.stream.state_dict())
        if not self.d.main:
            return None
        state = {
            "format": 1,
            "version": ckpt.package_version(),
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lr": lr_at(max(self.step - 1, 0), self.cfg.train),
            "rng": rng,
            "data": data,
            "world_size": self.d.world_size,
        }
        return ckpt.save_run_checkpoint(self.run_dir, state, step=self.step, keep_last=self.cfg.train.keep_last)


# ---------------------------------------------------------------------------------------------- CLI


def _config_from_args(args, rest: list[str]) -> RunConfig:
    """The run's config from the command line: a preset (or, with --resume, the run folder's newest
    checkpoint) plus overrides. Everything that can be known before any work is checked here, so a mistake
    is refused before anything is written: UsageError, or ValueError from the config's own checks."""
    overrides = parse_override_args(rest)
    if args.data_root is not None:
        overrides["data.root"] = args.data_root
    if args.max_steps is not None:
        overrides["train.max_steps"] = str(args.max_steps)
    if args.epochs is not None:
        overrides["train.epochs"] = str(args.epochs)
    saved = _resume_config(Path(args.out)) if args.resume else None
    if args.preset is not None:
        config = PRESETS[args.preset]()
    elif saved is not None:  # the checkpoint's own config: the one its weights were trained with
        config = saved
    else:
        raise UsageError("--preset is required for a new run (one of " + ", ".join(PRESETS) + ")")
    if _detects_source(args, overrides):
        config = _with_detected_source(config, Path(args.data_root))
    return apply_overrides(config, overrides)


def _detects_source(args, overrides: dict) -> bool:
    """Whether the data source comes from what --data-root holds: given a root, and no --data.source."""
    given = {k.lstrip("-").replace("-", "_") for k in overrides}
    return args.data_root is not None and not given & {"source", "data.source"}


def _resume_config(out: Path) -> RunConfig:
    """The config of the newest checkpoint in `out`, read and checked now, so that a corrupt, foreign or pickled
    file, or weights that do not fit their config, are refused before the data is loaded."""
    latest = ckpt.find_latest(out)
    if latest is None:
        raise UsageError(
            f"--resume asked for, but {out} holds no checkpoint (latest.pt or step_XXXXXXX.pt); start without --resume"
        )
    return ckpt.read_run_config(latest)


def _with_detected_source(config: RunConfig, root: Path) -> RunConfig:
    """--data-root without --data.source: a Flowers102 root trains as flowers102, a folder of images as
    "folder". An existing folder with neither keeps a Flowers102 preset's source (it downloads there)."""
    source = detect_source(root)
    if source is None and config.data.source == "folder":
        raise DataNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}, searched recursively, "
            "and no flowers-102/ in it; put your images there or pass another --data-root"
        )
    if source is None or source == config.data.source:
        return config
    return apply_overrides(config, {"data.source": source, **({"data.split": "all"} if source == "folder" else {})})


def _check_environment(config: RunConfig, out: Path, resume: bool) -> None:
    """What the config alone cannot say: whether its device is there, whether the batch splits over the
    processes, whether a new run would land on an old run's checkpoints; plus the label rules resolve_config
    would otherwise report only once the data is loaded."""
    if not resume and ckpt.find_latest(out) is not None:
        raise UsageError(
            f"{out} already holds checkpoints; pass --resume to continue that run, or choose a new --out folder"
        )
    try:
        get_device(config.train.device)
    except (RuntimeError, ValueError) as err:  # only from checking the device name
        raise UsageError(f"--train.device {config.train.device}: {err}") from err
    try:
        check_batch_split(config.train, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        raise UsageError(str(err)) from err
    if config.data.source == "folder" and config.data.root is None:
        raise UsageError("data.source=folder needs the image folder: pass --data-root PATH")
    if config.train.conditional and config.model.num_classes is None and config.data.source == "folder":
        raise UsageError(
            "--train.conditional true needs class labels, and a folder of images has none; "
            "use --train.conditional false or Flowers102"
        )


def main(argv: list[str] | None = None) -> TrainResult:
    """The command line. A mistake in what was asked is one `error: ...` line and exit status 2, with nothing
    written; a failure part-way (a full disk, non-finite loss) is one such line and status 1, the newest
    checkpoint intact. Bugs keep their traceback."""
    parser = ckpt.UsageParser(
        prog="python -m ddpm.train",
        allow_abbrev=False,
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a DDPM. Any config key can be overridden with --section.key VALUE or --key VALUE "
        "(where unique), e.g. --train.lr 2e-4 --model.base_channels 64 --image_size 32.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="starting config (required unless --resume)")
    parser.add_argument(
        "--data-root",
        help="sets data.root: a Flowers102 root (holding flowers-102/) or a folder "
        "of images; which one is detected unless --data.source is given",
    )
    parser.add_argument("--out", required=True, help="run folder: checkpoints, samples, log.jsonl, loss.png")
    parser.add_argument("--max-steps", type=int, help="sets train.max_steps")
    parser.add_argument("--epochs", type=float, help="sets train.epochs: passes over the data instead of max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    args, rest = parser.parse_known_args(argv)
    try:
        try:
            config = _config_from_args(args, rest)
        except ValueError as err:  # the config's own checks (unknown key, bad value); nothing else runs here
            raise UsageError(str(err)) from err
        if args.print_config:
            print(config.to_json())
            return None
        _check_environment(config, Path(args.out), args.resume)
    except UsageError as err:
        ckpt.exit_with_error(err)
    keep_freed_memory()  # CPU steps reuse freed memory instead of page-faulting it back: 6-18% faster
    try:
        result = train(config, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
    except UsageError as err:  # found once training started: data that cannot be used, a locked folder
        ckpt.exit_with_error(err)
    except (FloatingPointError, ckpt.CheckpointWriteError) as err:  # the message names the last good checkpoint
        ckpt.exit_with_error(err, code=1)
    except OSError as err:
        if err.errno not in _OUT_OF_SPACE:
            raise
        ckpt.exit_with_error(
            f"could not write {err.filename or 'a file'} in {args.out} ({err.strerror}); the newest "
            f"complete checkpoint is {ckpt.find_latest(args.out)}; free some space, then --resume",
            code=1,
        )
    except Exception as err:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        _exit_dist_failure(err, Path(args.out))
    if result.log_path is not None:
        last = result.history[-1]["loss"] if result.history else float("nan")
        print(f"step {result.step}: last loss {last:.4f}; checkpoint {result.checkpoint}")
    return result


_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # writes the run cannot go on without


def _exit_dist_failure(err: Exception, out: Path):
    """Under torchrun one failed process stops the others at their next collective (Gloo and NCCL raise when a
    peer's connection closes): show this process's traceback, then one line on what to do."""
    import traceback

    traceback.print_exc()
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    ckpt.exit_with_error(
        f"process {rank} of {world} of this DDP run stopped ({type(err).__name__}: "
        f"{ckpt.one_line(err)[:300]}); if another process failed first, its own error says why. "
        f"The newest complete checkpoint is {ckpt.find_latest(out)}: restart every process with "
        "--resume",
        code=1,
    )


if __name__ == "__main__":
    main()
