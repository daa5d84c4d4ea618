"""Sample images from a checkpoint: one grid PNG plus every image on its own.

    python -m ddpm.sample --ckpt checkpoints/f64 --n 64 --seed 0 --out grid.png   # the model's default sampler
    python -m ddpm.sample --ckpt checkpoints/f64 --n 64 --method dpmpp_2m_sde --steps 20 --out grid.png
    # -> grid.png and grid/000.png ... grid/063.png
    python -m ddpm.sample --ckpt checkpoints/cond32.pt --classes 53,72,16 --guidance-scale 2 --out classes.png
    # class-conditional: one row per class -> classes.png, classes/, classes_labelled.png (rows named)

--ckpt takes a checkpoint file or a run folder (its latest.pt). EMA weights are used unless --no-ema.
The start noise comes from a CPU generator seeded by --seed, so a seed gives the same images on any device.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import samplers
from .checkpoint import UsageError, UsageParser, exit_with_error, load_model
from .device import PRECISIONS, autocast, get_device
from .viz import class_grid_figure, class_names, save_figure, save_grid


def generate(
    model,
    schedule,
    config,
    *,
    n: int,
    method: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    seed: int = 0,
    class_label=None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    progress: bool = True,
    callback=None,
) -> torch.Tensor:
    """n images in [-1, 1] (float32, CPU) from a model returned by ddpm.checkpoint.load_model.

    method:      a ddpm.samplers.METHODS entry; None: the model's own (ddpm.samplers.default_sampler), at its
                 steps unless `steps` says otherwise.
    spacing:     which training timesteps the steps visit (ddpm.samplers.set_timesteps); None: the method's own.
    class_label: for a conditional model, the class of every image (an int), of each image (n ints, e.g. one
                 row per class), or None: classes 0, 1, 2, ... in turn (the training set's share of each).
    guidance_scale: classifier-free guidance weight w (1 = none); None: the model's own (samplers.default_guidance).
    batch_size:  images per sampler call (default all n); the chunks draw from one generator in turn,
                 so the same (seed, batch_size) gives the same images.
    callback:    passed to ddpm.samplers.sample: callback(i, t, x_t, x0_pred) at every step of every chunk.
    """
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    if method is None:
        method, default_steps = samplers.default_sampler(config.diffusion.prediction_type, config.diffusion.schedule)
        steps = default_steps if steps is None else steps
    labels = class_labels(class_label, n, config.model.num_classes)
    guidance_scale = samplers.default_guidance(config) if guidance_scale is None else guidance_scale
    device = next(model.parameters()).device
    size = config.model.image_size
    generator = torch.Generator().manual_seed(seed)
    batch_size = batch_size or n
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        with autocast(device, precision):
            chunks.append(
                samplers.sample(
                    model,
                    schedule,
                    (m, config.model.in_channels, size, size),
                    method=method,
                    steps=steps,
                    spacing=spacing,
                    eta=eta,
                    prediction_type=config.diffusion.prediction_type,
                    generator=generator,
                    y=labels[start : start + m] if labels is not None else None,
                    guidance_scale=guidance_scale,
                    progress=progress,
                    callback=callback,
                    device=device,
                )
                .float()
                .cpu()
            )
    return torch.cat(chunks)


def class_labels(class_label, n: int, num_classes: int | None) -> torch.Tensor | None:
    """The n labels generate() conditions on (see its class_label), checked against the model's classes."""
    if num_classes is None:
        if class_label is not None:
            raise ValueError(f"class_label={class_label} needs a class-conditional model; this one is unconditional")
        return None
    if class_label is None:
        return torch.arange(n) % num_classes
    labels = torch.as_tensor(class_label, dtype=torch.long).flatten()
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"class_label has {labels.numel()} labels for n={n} images; give one, or one per image")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class_label={class_label} is out of range: this model has classes 0..{num_classes - 1}")
    return labels


def labels_in_turn(start: int, n: int, num_classes: int | None) -> list[int] | None:
    """Classes start, start + 1, ... (mod num_classes) for n images; None for an unconditional model. What
    generate()'s default gives one call, carried on across a stream of calls: pass it as class_label for the
    batch that begins at image `start`, and every class keeps its share of the whole."""
    return None if num_classes is None else [(start + i) % num_classes for i in range(n)]


def class_rows(model, schedule, config, classes, *, per_class: int = 8, **kwargs) -> torch.Tensor:
    """One row of `per_class` images for each class in `classes`, in that order (kwargs: as for generate)."""
    labels = [c for c in classes for _ in range(per_class)]
    return generate(model, schedule, config, n=len(labels), class_label=labels, **kwargs)


def save_images(images: torch.Tensor, out, *, nrow: int | None = None) -> tuple[Path, list[Path]]:
    """Write `images` ([-1, 1]) as the grid `out` and as out-without-suffix/000.png, 001.png, ..."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"--out {out} should name an image file such as grid.png")
    save_grid(images, out, nrow=nrow)
    folder = out.with_suffix("")
    folder.mkdir(exist_ok=True)
    width = max(3, len(str(len(images) - 1)))
    paths = [save_grid(image[None], folder / f"{i:0{width}d}.png", padding=0) for i, image in enumerate(images)]
    return out, paths


def main(argv: list[str] | None = None) -> tuple[Path, list[Path]]:
    """The command line. A mistake in what was asked (a missing or unreadable checkpoint, a bad --n, --steps or
    --out, a device that is not there) is one `error: ...` line and exit status 2, before anything is written."""
    p = UsageParser(
        prog="python -m ddpm.sample", allow_abbrev=False, description="Sample a grid of images from a ddpm checkpoint."
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run folder (uses its latest.pt)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument(
        "--method",
        default=None,
        choices=samplers.METHODS,
        help="default: the model's own (ddpm.samplers.default_sampler, by its prediction type and schedule)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="network evaluations (default: 20 with the default method; if --method is given, "
        "ddpm all T, ddim 50, dpmpp_2m and dpmpp_2m_sde 20)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (ddim only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="grid PNG; the single images go to a folder of the same name")
    p.add_argument(
        "--class-label",
        type=int,
        default=None,
        help="class of every image (conditional models; default: classes in turn)",
    )
    p.add_argument(
        "--classes",
        type=_class_list,
        default=None,
        help="conditional models: one row of --per-class images per class, e.g. 53,72,16; also writes the grid "
        "with each row labelled by its flower name (OUT_labelled.png)",
    )
    p.add_argument("--per-class", type=int, default=8, help="images per row with --classes")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance weight (1 = none); default: the model's own (its train.sample_guidance_scale)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per sampler call (memory); default all")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    p.add_argument("--device", default=None, help="auto (default), cuda, mps or cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        _check_args(args)
        device = _check_device(args.device)
        model, schedule, config = load_model(args.ckpt, use_ema=not args.no_ema, device=device)
        _check_against_model(args, config)
    except UsageError as err:
        exit_with_error(err)
    labels, nrow = args.class_label, args.nrow
    if args.classes is not None:  # one row per class
        labels, nrow = [c for c in args.classes for _ in range(args.per_class)], args.per_class
    images = generate(
        model,
        schedule,
        config,
        n=args.n if args.classes is None else len(labels),
        method=args.method,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        class_label=labels,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        precision=args.precision,
        progress=not args.no_progress,
    )
    grid, paths = save_images(images, args.out, nrow=nrow)
    print(f"wrote {grid} and {len(paths)} images in {grid.with_suffix('')}/")
    if args.classes is not None:
        names = class_names(config.model.num_classes)
        labelled = grid.with_name(f"{grid.stem}_labelled.png")
        w = samplers.default_guidance(config) if args.guidance_scale is None else args.guidance_scale
        title = f"guidance {w:g}, seed {args.seed}"
        save_figure(class_grid_figure(images, [f"{c}: {names[c]}" for c in args.classes], title=title), labelled)
        print(f"wrote {labelled} (rows labelled by class)")
    return grid, paths


def _class_list(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        message = f"{text!r} is not a comma-separated list of class numbers, e.g. 53,72,16"
        raise argparse.ArgumentTypeError(message) from None
    return classes


def _check_args(args) -> None:
    """What can be checked before the model is loaded: counts, and where the images will go."""
    if args.classes is not None and args.class_label is not None:
        raise UsageError("--classes draws one row per class; --class-label gives all images one class: use one")
    for name in ("n", "steps", "batch_size", "nrow", "per_class"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.eta < 0:
        raise UsageError(f"--eta {args.eta}: must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(
            f"--out {out}: name an image file such as grid.png (the single images go to a folder of the same name)"
        )
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name an image file such as {out / 'grid.png'}")
    existing = next(q for q in [out.parent, *out.parent.parents] if q.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out}: cannot write there ({existing} is "
            f"{'not a folder' if not existing.is_dir() else 'not writable'}); choose another path"
        )


def _check_device(name: str | None):
    try:
        return get_device(name)
    except (RuntimeError, ValueError) as err:  # only from checking the name: a device not there, or no device
        raise UsageError(f"--device {name}: {err}") from err


def _check_against_model(args, config) -> None:
    """What depends on the model: steps up to its timesteps, DDIM's eta, classes and guidance."""
    T, conditional = config.diffusion.timesteps, config.model.num_classes is not None
    if args.steps is not None and args.steps > T:
        raise UsageError(f"--steps {args.steps}: this model was trained with {T} timesteps, so at most {T}")
    method = args.method or samplers.default_sampler(config.diffusion.prediction_type, config.diffusion.schedule)[0]
    if args.eta != 0 and method != "ddim":
        raise UsageError(f"--eta {args.eta} applies to --method ddim only (the method here is {method})")
    if args.guidance_scale not in (None, 1.0) and not conditional:
        raise UsageError("--guidance-scale needs a class-conditional model; this one is unconditional (leave it out)")
    for option, classes in (("--class-label", [args.class_label]), ("--classes", args.classes or [])):
        if not conditional and any(c is not None for c in classes):
            raise UsageError(f"{option} needs a class-conditional model; this one is unconditional")
        bad = [c for c in classes if c is not None and not 0 <= c < config.model.num_classes]
        if bad:
            raise UsageError(f"{option} {bad[0]}: this model has classes 0 to {config.model.num_classes - 1}")


if __name__ == "__main__":
    main()
