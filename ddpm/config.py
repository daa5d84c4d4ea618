"""Run configs: the dataclasses saved inside every checkpoint, the named presets, and the override parser.

    from ddpm.config import preset, apply_overrides, RunConfig
    config = preset("folder32", **{"data.root": "my_photos", "train.lr": "4e-4"})
    RunConfig.from_json(config.to_json()) == config        # round-trips; saved as run_dir/config.json

Overrides are `--section.key value` (sections: model, diffusion, train, data) or a plain `--key value`
when only one section has that key (`--lr 2e-4` is `--train.lr 2e-4`); `--image_size 32` sets both
model.image_size and data.image_size. Dashes and underscores are the same. Values are parsed by the
field's type: bools as true/false, None as none, tuples as 1,2,2, dicts as JSON.

Why each preset is what it is, with the measurements: docs/quality.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import diffusion, samplers
from .checkpoint import UsageError
from .data import SOURCES, SPLITS
from .device import PRECISIONS
from .schedules import make_schedule
from .unet import UNetConfig, check_keys, unet_preset

LR_DECAYS = ("none", "cosine", "linear")


class ConfigError(UsageError, ValueError):
    """A run config that cannot train as asked (found when the data is known); the CLI prints it as one line."""


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"  # a ddpm.schedules.SCHEDULES name
    timesteps: int = 1000
    schedule_params: dict = field(default_factory=dict)  # e.g. {"beta_end": 0.02}; defaults per schedule
    prediction_type: str = "epsilon"  # a ddpm.diffusion.PREDICTION_TYPES name
    loss_type: str = "mse"  # a ddpm.diffusion.LOSS_TYPES name
    min_snr_gamma: float | None = None  # 5.0 is the paper's choice; None = plain loss

    def __post_init__(self):
        diffusion.check_prediction_type(self.prediction_type)
        diffusion.check_loss_type(self.loss_type)
        if self.min_snr_gamma is not None and self.loss_type != "mse":
            raise ValueError(f"min_snr_gamma is defined for loss_type='mse' only, got loss_type={self.loss_type!r}")
        self.make_schedule()  # fails here, with make_schedule's message, on a bad name or parameter

    def make_schedule(self):
        return make_schedule(self.schedule, self.timesteps, **self.schedule_params)


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per optimizer step, over all processes and micro-batches
    lr: float = 2e-4
    weight_decay: float = 0.0  # applied to weight matrices/kernels only, not to biases and norms
    warmup_steps: int = 500
    lr_decay: str = "none"  # LR_DECAYS: after warm-up, to min_lr_ratio * lr at max_steps
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None  # decay over the last N steps only, constant before (warmup-stable-decay)
    max_steps: int = 50_000
    epochs: float | None = None  # passes over the data; when set, it decides max_steps
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    ema_decay: float = 0.9995
    ema_warmup: float = 10.0  # w of decay_t = min(ema_decay, (1 + n) / (w + n)); smaller: longer average; 0: none
    ema_update_after_step: int = 0
    ema_update_every: int = 1
    precision: str = "auto"  # PRECISIONS; auto: see ddpm.device.autocast_dtype
    compile: bool | None = None  # torch.compile the training step; None: on CUDA only (slower on CPU)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 2000  # steps; 0 = never
    sample_every_epochs: float | None = None  # when set, decides sample_every
    sample_n: int = 64
    sample_method: str | None = None  # None: the model's default (samplers.default_sampler)
    sample_steps: int = 20
    sample_guidance_scale: float = 1.0  # conditional models: the guidance w of the grids and of ddpm.sample's default
    checkpoint_every: int = 2000  # steps
    checkpoint_every_epochs: float | None = None  # when set, decides checkpoint_every
    eval_every: int = 0  # steps between FID/KID evaluations of the EMA model (0 = never; the presets: < 10%); best.pt
    eval_n: int = 256  # generated images per evaluation (FID is biased upward at small counts)
    eval_num_real: int | None = None  # training images scored against (None = all)
    keep_last: int = 3  # step_XXXXXXX.pt files kept (0 = all)
    conditional: bool = False  # class-conditional (Flowers102 labels); num_classes from the data
    class_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    device: str = "auto"  # "auto" | "cuda" | "mps" | "cpu"
    dist_timeout_s: float = 600.0  # DDP: a peer silent this long (hung, or gone before the rendezvous) stops the run

    def __post_init__(self):
        checks = {
            "lr_decay": (self.lr_decay in LR_DECAYS, f"one of {LR_DECAYS}"),
            "min_lr_ratio": (0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1] (0: decay to zero)"),
            "decay_steps": (self.decay_steps is None or self.decay_steps >= 1, ">= 1, or none (all steps)"),
            "precision": (self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            "sample_method": (
                self.sample_method is None or self.sample_method in samplers.METHODS,
                f"none or one of {samplers.METHODS}",
            ),
            "class_dropout": (0.0 <= self.class_dropout < 1.0, "in [0, 1)"),
            "ema_decay": (0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            "ema_warmup": (self.ema_warmup == 0 or self.ema_warmup > 1, "0 (none) or > 1"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "sample_every": (self.sample_every >= 0, ">= 0 (0 = never)"),
            "eval_every": (self.eval_every >= 0, ">= 0 (0 = never)"),
            "eval_n": (self.eval_n >= 2, ">= 2 (KID needs two images)"),
        }
        positive = (
            "batch_size",
            "grad_accum",
            "max_steps",
            "log_every",
            "checkpoint_every",
            "lr",
            "epochs",
            "sample_every_epochs",
            "checkpoint_every_epochs",
            "dist_timeout_s",
        )
        for name in positive:
            value = getattr(self, name)
            checks[name] = (value is None or value > 0, "a positive value")
        bad = [(k, hint) for k, (ok, hint) in checks.items() if not ok]
        if bad:
            raise ValueError(
                "bad train config: " + "; ".join(f"{k}={getattr(self, k)!r} (expected {hint})" for k, hint in bad)
            )

    def in_steps(self, steps_per_epoch: int) -> TrainConfig:
        """This config with the epoch settings turned into steps (max_steps, sample_every, checkpoint_every)."""

        def steps(epochs: float) -> int:
            return max(1, math.ceil(epochs * steps_per_epoch))

        changes = {}
        if self.epochs is not None:
            changes["max_steps"] = steps(self.epochs)
        if self.sample_every_epochs is not None:
            changes["sample_every"] = steps(self.sample_every_epochs)
        if self.checkpoint_every_epochs is not None:
            changes["checkpoint_every"] = steps(self.checkpoint_every_epochs)
        return dataclasses.replace(self, **changes)


@dataclass
class DataConfig:
    source: str = "flowers102"  # SOURCES: "flowers102" | "folder"
    root: str | None = None  # flowers102: the folder holding flowers-102/; folder: the images.
    # None = $DATA_ROOT, else "data" (see ddpm.data.load_dataset)
    image_size: int = 64
    split: str = "all"  # flowers102: SPLITS
    cache_dir: str | None = None  # None = ddpm.data's default cache folder

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data source={self.source!r} is not one of {SOURCES}")
        if self.split not in SPLITS:
            raise ValueError(f"data split={self.split!r} is not one of {SPLITS}")


SECTIONS = {"model": UNetConfig, "diffusion": DiffusionConfig, "train": TrainConfig, "data": DataConfig}


@dataclass
class RunConfig:
    model: UNetConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section_from_dict(cls, value, name))
        if self.model.image_size != self.data.image_size:
            raise ValueError(
                f"model.image_size={self.model.image_size} but data.image_size={self.data.image_size}; "
                "set both (the plain override --image_size N does)"
            )
        T = self.diffusion.timesteps
        if self.train.sample_steps > T:
            # caught here, not at the first sample grid hours into the run
            raise ValueError(f"train.sample_steps={self.train.sample_steps} exceeds diffusion.timesteps={T}")

    def to_dict(self) -> dict:
        return {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
        if "model" not in d:
            raise ValueError("config has no 'model' section")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> RunConfig:
        return cls.from_json(Path(path).read_text())


def _section_to_dict(section) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dataclasses.asdict(section)


def with_defaults(saved: dict) -> dict:
    """A saved config dict with each key added since it was written at its default.

    A new setting's default is what the code that wrote the checkpoint did, so comparing the filled dict
    with today's config reports only real changes. Keys the checkpoint has are kept as they are.
    """
    return {**saved, **{name: {**_section_to_dict(cls()), **saved.get(name, {})} for name, cls in SECTIONS.items()}}


def _section_from_dict(cls, d: dict, name: str):
    check_keys(d, {f.name for f in dataclasses.fields(cls)}, f"key(s) in config section '{name}'")
    return cls.from_dict(d) if hasattr(cls, "from_dict") else cls(**d)


# ---------------------------------------------------------------------------------------------- presets
# One line each on why; the measurements behind them are in docs/quality.md.


def preset(name: str, **overrides) -> RunConfig:
    """A named starting config; `overrides` are {key: value} as on the command line (apply_overrides)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[name](), overrides) if overrides else PRESETS[name]()


def _folder32_objective() -> DiffusionConfig:
    # v-prediction + min-SNR-5 on offset-cosine: half the FID of epsilon on cosine at 32 px (docs/quality.md).
    return DiffusionConfig(schedule="offset_cosine", prediction_type="v_prediction", min_snr_gamma=5.0)


def _folder32() -> RunConfig:
    # Every knob measured at equal CPU budgets (lr, EMA, batch, attention, width, depth, schedule): docs/quality.md.
    # A constant lr: decaying it linearly to zero over the whole run scored the same (docs/quality.md,
    # "A constant learning rate, not one decaying to zero"), and a constant rate lets a run be extended exactly.
    return RunConfig(
        model=unet_preset(32, "attention"),
        data=DataConfig(source="folder", image_size=32),
        diffusion=_folder32_objective(),
        train=TrainConfig(
            batch_size=64, lr=8e-4, max_steps=20_000, sample_every=1000, checkpoint_every=1000, ema_decay=0.999,
            eval_every=1000,  # one evaluation costs 4% of the 1,000 steps it follows (docs/quality.md)
        ),
    )  # fmt: skip


def _cpu64() -> RunConfig:
    # 64 px for a laptop CPU: folder32's UNet (32 x (1, 2, 4), 3.9M params) on 2x2 patches, so its top level runs
    # at 32 px. Per CPU-second it beat a 16-channel 64 px level over the same levels, 117.3 FID against 137.8 in
    # 4 CPU-hours (docs/quality.md, "cpu64"). folder32's objective and lr; a constant rate: decaying it to zero
    # over the whole run lost 24 FID, over the last 450 steps it tied (docs/quality.md, "cpu64").
    # Class-conditional, sampled at guidance w = 2: in the same 4 CPU-hours 102.3 FID against 117.3 unconditional
    # (docs/quality.md, "Class labels and guidance"). It needs Flowers102's labels: on an image folder add
    # --train.conditional false.
    return RunConfig(
        model=unet_preset(64, "attention", base_channels=32, channel_mults=(1, 2, 4), groups=8, patch_size=2),
        data=DataConfig(image_size=64),
        diffusion=_folder32_objective(),
        train=TrainConfig(
            # 3,350 steps: 3.95 CPU-hours on two cores. No FID during the run (eval_every=0): evaluations would take
            # it past the 4-hour budget; benchmarks/guidance.py scores the result afterwards.
            batch_size=64, lr=8e-4, max_steps=3350, sample_every=250, checkpoint_every=250, keep_last=2,
            ema_decay=0.999, eval_every=0, conditional=True, sample_guidance_scale=2.0,
        ),
    )  # fmt: skip


def _flowers64() -> RunConfig:
    # folder32's objective: at 64 px, equal budgets, it beat epsilon on cosine by far (docs/quality.md,
    # "flowers64 and flowers128"). The lr and warm-up stay this wider UNet's own: not measured here. A constant
    # rate, as folder32 and cpu64: a linear decay to zero over the whole run lost 24 FID at 64 px and tied at
    # 32 px (docs/quality.md, "A learning rate decaying to zero, at 64 px").
    return RunConfig(
        model=unet_preset(64, "attention"),
        data=DataConfig(image_size=64),
        diffusion=_folder32_objective(),
        train=TrainConfig(batch_size=64, lr=2e-4, max_steps=50_000, warmup_steps=1000, eval_every=5000),
    )


def _flowers128() -> RunConfig:
    # folder32's objective, carried over from 32 and 64 px unmeasured (a CPU-hour buys a few hundred steps here).
    return RunConfig(
        model=unet_preset(128, "attention"),
        data=DataConfig(image_size=128),
        diffusion=_folder32_objective(),
        train=TrainConfig(batch_size=32, lr=1e-4, max_steps=100_000, warmup_steps=1000, eval_every=5000),
    )


def _quick() -> RunConfig:
    # Same code path as the real presets, sized for a laptop CPU: about a minute, and the loss visibly falls
    # (from ~1.0 to ~0.2); the samples are still blobs, which is what a minute buys.
    model = unet_preset(32, "simple", base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1)
    return RunConfig(
        model=model,
        data=DataConfig(image_size=32),
        train=TrainConfig(
            batch_size=16,
            lr=1e-3,
            warmup_steps=20,
            max_steps=200,
            ema_decay=0.99,
            log_every=10,
            sample_every=100,
            sample_n=16,
            sample_steps=20,
            checkpoint_every=100,
            keep_last=2,
            precision="fp32",
            device="cpu",
        ),
    )


PRESETS = {"cpu64": _cpu64, "flowers64": _flowers64, "flowers128": _flowers128, "folder32": _folder32, "quick": _quick}


# ---------------------------------------------------------------------------------------------- overrides


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _resolve_key(key: str) -> list[tuple[str, str]]:
    key = key.lstrip("-").replace("-", "_")
    keys = valid_keys()
    if "." in key:
        if key in keys:
            return [tuple(key.split(".", 1))]
        matches = []
    else:
        matches = [tuple(k.split(".", 1)) for k in keys if k.split(".", 1)[1] == key]
        if key == "image_size":
            return matches  # one idea, two sections: keep them equal
        if len(matches) > 1:
            raise ValueError(f"--{key} is ambiguous; use one of " + ", ".join(f"--{s}.{f}" for s, f in matches))
    if not matches:
        close = difflib.get_close_matches(key, keys + [k.split(".", 1)[1] for k in keys], n=3)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        listing = "\n  ".join(
            f"{name}: " + ", ".join(f.name for f in dataclasses.fields(cls)) for name, cls in SECTIONS.items()
        )
        raise ValueError(
            f"unknown option --{key}{hint}; valid options are --section.key (or --key where only one "
            f"section has it):\n  {listing}"
        )
    return matches


def _parse_value(text: str, tp, name: str):
    """Parse a command-line string as the dataclass field type `tp` (int, float, str, bool, X | None, tuple, dict)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return _parse_value(text, next(a for a in args if a is not type(None)), name)
    if tp is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError(f"--{name} {text!r}: expected true or false")
    if tp is tuple or origin is tuple:
        items = [t.strip() for t in text.strip("()[] ").split(",") if t.strip()]
        return tuple(_parse_value(t, args[0] if args else str, name) for t in items)
    if tp is dict or origin is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"--{name} {text!r}: expected a JSON object like '{{\"beta_end\": 0.02}}'")
        return value
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"--{name} {text!r}: expected {tp.__name__}") from None
    return text


def parse_override_args(tokens: list[str]) -> dict[str, str]:
    """['--train.lr', '2e-4', '--seed=3'] -> {'train.lr': '2e-4', 'seed': '3'}."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}; options look like --train.lr 2e-4")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"{token} needs a value (bools take true/false)")
            key, value = token[2:], tokens[i + 1]
            i += 2
        out[key] = value
    return out


def apply_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """A new RunConfig with {key: value} applied; keys as on the command line, values strings or Python values."""
    d = config.to_dict()
    for key, value in overrides.items():
        for section, name in _resolve_key(key):
            if isinstance(value, str):
                hints = typing.get_type_hints(SECTIONS[section])
                value_ = _parse_value(value, hints[name], f"{section}.{name}")
            else:
                value_ = value
            d[section][name] = list(value_) if isinstance(value_, tuple) else value_
    return RunConfig.from_dict(d)
