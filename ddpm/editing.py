"""Editing with a trained model: interpolation between start noises, DDIM inversion, RePaint inpainting.

ddpm.samplers draws images from fresh noise; everything here starts from something given: two seeds'
start noises (interpolate), a real image (invert, then generate_from_noise), or an image with a hole
(inpaint). The step equations are the samplers' own (ddpm.samplers._ddpm_step and _ddim_step), so they
live in one place.

Notation as in ddpm.samplers: a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t), x_t = a_t x_0 + s_t eps.
A mask is 1 where a pixel is known (kept) and 0 where it is to be filled, as RePaint's "keep" masks.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import samplers
from .diffusion import predict_epsilon, predict_x0
from .samplers import DEFAULT_SPACING, DEFAULT_STEPS, sample, set_timesteps
from .schedules import NoiseSchedule

INPAINT_METHODS = ("ddpm", "ddim")


@contextlib.contextmanager
def _eval_inference(model):
    """inference_mode, and an nn.Module in eval mode (dropout off) for the duration, as sample() does."""
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _labels(model, y, batch: int) -> torch.Tensor | None:
    """Class labels (batch,): an int for every image; None on a class-conditional model: its null class, "no
    label" (what classifier-free guidance trains), so editing a real image needs no class unless one is wanted."""
    if y is None:
        null = getattr(model, "null_class", None)
        return None if null is None else torch.full((batch,), null, dtype=torch.long)
    return torch.full((batch,), y, dtype=torch.long) if isinstance(y, int) else y


# ---------------------------------------------------------------------------------------------- interpolation


def slerp(a: torch.Tensor, b: torch.Tensor, w) -> torch.Tensor:
    """Spherical interpolation from a (w = 0) to b (w = 1), each taken as one vector (Shoemake 1985):

        slerp(a, b, w) = sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b,
        cos(theta) = <a, b> / (|a| |b|).

    Why not the straight line: two N(0, I) draws in D dimensions are nearly orthogonal with norm ~ sqrt(D),
    so (a + b) / 2 has norm ~ sqrt(D / 2): noise with half the variance the model was trained to start from
    (its images come out grey and flat). The arc keeps the norm (White 2016, "Sampling generative networks").
    w: a number (returns a's shape) or a sequence of n weights (returns (n, *a.shape)).
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    weights = torch.as_tensor(w, dtype=torch.float64)
    if weights.ndim > 1:
        raise ValueError(f"w must be a number or a 1-D sequence of weights, got shape {tuple(weights.shape)}")
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum() / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    wt = weights.reshape(weights.shape + (1,) * a.ndim)
    if theta < 1e-6:  # (anti)parallel: the arc is the line
        out = (1 - wt) * a64 + wt * b64
    else:
        out = (torch.sin((1 - wt) * theta) * a64 + torch.sin(wt * theta) * b64) / torch.sin(theta)
    return out.to(a.dtype)


def start_noise(config, seed: int) -> torch.Tensor:
    """x_T of seed `seed`, (1, C, H, W): the start noise of ddpm.sample.generate(..., n=1, seed=seed)."""
    size = config.model.image_size
    return torch.randn((1, config.model.in_channels, size, size), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _mixed_class_embedding(model, a: int, b: int, weights: torch.Tensor):
    """While active, the UNet's class embedding of every labelled row i is (1 - w_i) e_a + w_i e_b.

    The UNet adds class_emb(y) to its time embedding (ddpm.unet.UNet.forward), so mixing the two rows of
    the embedding table is interpolating the conditioning itself. A forward hook on model.class_emb does it
    without a change to the UNet; rows labelled with the null class (the unconditional half of guidance)
    keep their embedding.
    """
    table = getattr(model, "class_emb", None)
    if table is None:
        raise ValueError("class interpolation needs a class-conditional ddpm UNet (one with model.class_emb)")

    def hook(module, inputs, output):
        labelled = inputs[0] != model.null_class
        mixed = torch.lerp(module.weight[a], module.weight[b], weights.to(module.weight)[:, None])
        output = output.clone()
        output[labelled] = mixed.to(output.dtype)
        return output

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def interpolate(
    model,
    schedule: NoiseSchedule,
    config,
    *,
    seeds: tuple[int, int] = (0, 1),
    classes: tuple[int, int] | None = None,
    n: int = 8,
    steps: int = 20,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1] on the CPU, from seed a's image to seed b's.

    Start noise i is slerp(x_T(a), x_T(b), i / (n - 1)) (x_T of a seed: start_noise), and each is sampled
    with deterministic DDIM (eta = 0), so every image is a function of its start noise alone and the strip
    changes smoothly. The ends are the seeds' own DDIM images (ddpm.sample.generate(n=1, seed=..., method="ddim")
    starts from the same noise).
    classes:  (class a, class b) on a class-conditional model: the class embedding moves from a to b
              along with the noise (_mixed_class_embedding); None: the null class ("no label").
              Equal seeds give a strip of the class change alone.
    """
    if n < 2:
        raise ValueError(f"n={n}: an interpolation strip needs at least its two ends")
    weights = torch.linspace(0, 1, n, dtype=torch.float64)
    x_T = slerp(start_noise(config, seeds[0])[0], start_noise(config, seeds[1])[0], weights).float()
    num_classes = config.model.num_classes
    if classes is not None and num_classes is None:
        raise ValueError(f"classes={classes} needs a class-conditional model; this one is unconditional")
    if classes is not None and not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes={classes} out of range: this model has classes 0..{num_classes - 1}")
    y, mixing = None, contextlib.nullcontext()
    if num_classes is not None:
        y = torch.full((n,), classes[0] if classes is not None else num_classes, dtype=torch.long)
        if classes is not None:
            mixing = _mixed_class_embedding(model, classes[0], classes[1], weights.float())
    with mixing:
        images = generate_from_noise(
            model,
            schedule,
            x_T,
            steps=steps,
            prediction_type=config.diffusion.prediction_type,
            y=y,
            guidance_scale=guidance_scale,
            clip_denoised=clip_denoised,
            progress=progress,
        )
    return images.float().cpu()


# ---------------------------------------------------------------------------------------------- DDIM inversion


def generate_from_noise(
    model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    steps: int = 50,
    prediction_type: str = "epsilon",
    y: torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    spacing: str = DEFAULT_SPACING["ddim"],
    clip_denoised: bool = False,
    progress: bool = False,
    callback=None,
) -> torch.Tensor:
    """x_0 from the given start noise x_T by deterministic DDIM (eta = 0): the way back of invert.

    y: labels (B,), one int for all, or None (on a conditional model: the null class, "no label").
    clip_denoised is off by default: clamping x0 predictions is not invertible, so a reconstruction
    (invert then generate_from_noise) wants it off; turn it on to draw images from made-up noise.
    """
    return sample(
        model,
        schedule,
        tuple(x_T.shape),
        method="ddim",
        steps=steps,
        eta=0.0,
        prediction_type=prediction_type,
        y=_labels(model, y, x_T.shape[0]),
        guidance_scale=guidance_scale,
        clip_denoised=clip_denoised,
        progress=progress,
        callback=callback,
        spacing=spacing,
        x_T=x_T,
    )


def invert(
    model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    steps: int = 50,
    prediction_type: str = "epsilon",
    y: torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    spacing: str = DEFAULT_SPACING["ddim"],
    progress: bool = False,
) -> torch.Tensor:
    """x_T for the images x0 (B, C, H, W): the DDIM ODE run from the data up to noise (Song et al. 2021, sec. 4.3).

    DDIM's deterministic step (eq. 12, eta = 0) from level t to the level below, t',
        x_t' = a_t' x0_hat + s_t' eps(x_t, t),   x0_hat = (x_t - s_t eps(x_t, t)) / a_t,
    is run the other way, up through the timesteps generate_from_noise comes down (same `steps`, `spacing`):
        x_t = a_t x0_hat + s_t eps(x_t', t),     x0_hat = (x_t' - s_t' eps(x_t', t)) / a_t',
    starting at x0 (a = 1, s = 0). The model is asked at the point it has, x_t', for the level it goes to, t
    (as diffusers' DDIMInverseScheduler and null-text inversion do): eps(x_t, t) is not known before x_t
    is. That is the approximation, exact as the steps shrink, so the error of a round trip falls with `steps`
    (inversion_errors). y as in generate_from_noise. Returns float32 on the model's device.
    """
    device = samplers._model_device(model)
    batch = x0.shape[0]
    y = _labels(model, y, batch)
    samplers._check_args(model, schedule, "ddim", 0.0, "posterior", y, guidance_scale, batch, prediction_type)
    y = y.to(device) if y is not None else None
    null_class = getattr(model, "null_class", None)
    x = x0.to(device=device, dtype=torch.float32)
    abar_from = 1.0  # x0: the clean level
    with _eval_inference(model):
        for t in set_timesteps(schedule, steps, spacing=spacing).flip(0).tolist():
            t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
            out = samplers._guided_output(model, x, t_batch, y, guidance_scale, null_class)
            eps = predict_epsilon(schedule, x, t_batch, out, prediction_type)
            abar_to = float(schedule.alphas_cumprod[t])
            x0_hat = (x - math.sqrt(1 - abar_from) * eps) / math.sqrt(abar_from)
            x = math.sqrt(abar_to) * x0_hat + math.sqrt(1 - abar_to) * eps
            abar_from = abar_to
    return x


def inversion_errors(
    model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    steps=(10, 20, 50, 100),
    prediction_type: str = "epsilon",
    y: torch.Tensor | int | None = None,
    spacing: str = DEFAULT_SPACING["ddim"],
) -> list[dict]:
    """The round trip x0 -> invert -> generate_from_noise -> x0' for each number of steps (each way).

    One row per entry of `steps`: steps, nfe (network evaluations, both ways), rmse and max_abs of x0' - x0
    (per pixel, over all images), and x_T's std (1 for noise the sampler would draw). Print with
    inversion_table(rows).
    """
    rows = []
    for n in steps:
        x_T = invert(model, schedule, x0, steps=n, prediction_type=prediction_type, y=y, spacing=spacing)
        back = generate_from_noise(model, schedule, x_T, steps=n, prediction_type=prediction_type, y=y, spacing=spacing)
        err = (back.double().cpu() - x0.double().cpu()).flatten()
        rows.append(
            {
                "steps": n,
                "nfe": 2 * n,
                "rmse": float(err.pow(2).mean().sqrt()),
                "max_abs": float(err.abs().max()),
                "x_T_std": float(x_T.double().std()),
            }
        )
    return rows


def inversion_table(rows: list[dict]) -> str:
    """inversion_errors' rows as a Markdown table."""
    lines = ["| steps | NFE | RMSE | max abs error | std of x_T |", "|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {r['steps']} | {r['nfe']} | {r['rmse']:.2e} | {r['max_abs']:.2e} | {r['x_T_std']:.3f} |" for r in rows
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- masks


def _size(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w)


def rectangle_mask(size, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) float mask of an image of `size` (S or (H, W)): 0 in the rectangle (to fill), 1 elsewhere."""
    h, w = _size(size)
    if not (0 <= top and 0 <= left and height > 0 and width > 0 and top + height <= h and left + width <= w):
        raise ValueError(
            f"rectangle top={top}, left={left}, height={height}, width={width} does not fit inside an image of {h}x{w}"
        )
    mask = torch.ones(1, 1, h, w)
    mask[..., top : top + height, left : left + width] = 0
    return mask


def center_square_mask(size, fraction: float = 0.5) -> torch.Tensor:
    """(1, 1, H, W) mask with the centre square of side `fraction` of the short side to fill (0)."""
    h, w = _size(size)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    side = max(1, round(fraction * min(h, w)))
    return rectangle_mask((h, w), (h - side) // 2, (w - side) // 2, side, side)


def mask_from_image(path_or_tensor, *, size=None, threshold: float = 0.5) -> torch.Tensor:
    """A user's mask as (1, 1, H, W) floats: white (> threshold) = known, black = to fill.

    path_or_tensor: an image file (any mode; converted to grey), or a tensor (H, W), (1, H, W) or
    (1, 1, H, W) with values in [0, 1] (uint8 in [0, 255], bool as is). size: S or (H, W) to resize to
    (nearest neighbour, so the mask stays binary); None keeps the image's size.
    """
    if isinstance(path_or_tensor, (str, Path)):
        from PIL import Image  # torchvision depends on Pillow

        with Image.open(path_or_tensor) as img:
            grey = torch.frombuffer(bytearray(img.convert("L").tobytes()), dtype=torch.uint8)
            values = grey.reshape(img.height, img.width).float() / 255
    else:
        values = torch.as_tensor(path_or_tensor)
        values = values.float() / 255 if values.dtype == torch.uint8 else values.float()
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"a mask is one grey image, (H, W) or (1, H, W); got shape {tuple(values.shape)}")
    values = values[None, None]
    if size is not None:
        values = torch.nn.functional.interpolate(values, size=_size(size), mode="nearest")
    return (values > threshold).float()


# ---------------------------------------------------------------------------------------------- RePaint


def repaint_path(steps: int, *, jump_length: int = 1, resample: int = 0) -> list[int]:
    """The positions RePaint visits: 0 is the first (noisiest) sampler timestep, steps - 1 the last, steps clean.

    It walks down one position at a time; at every position p >= jump_length with (steps - 1 - p) a multiple
    of jump_length it goes back up jump_length positions and comes down again, `resample` times (RePaint's
    jump schedule: jump_length j, and r = resample + 1 passes over each stretch of j steps). resample=0 is
    plain sampling; jump_length=1 is the paper's Algorithm 1 with U = resample + 1.
    """
    if jump_length < 1 or resample < 0:
        raise ValueError(f"need jump_length >= 1 and resample >= 0, got jump_length={jump_length}, resample={resample}")
    jumps = {p: resample for p in range(jump_length, steps) if (steps - 1 - p) % jump_length == 0}
    path, p = [0], 0
    while p < steps:
        p += 1
        path.append(p)
        if jumps.get(p, 0) > 0:
            jumps[p] -= 1
            p -= jump_length
            path.append(p)
    return path


def _checked_mask(mask, image: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask, dtype=torch.float32)
    try:
        torch.broadcast_shapes(mask.shape, image.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to image {tuple(image.shape)}"
        ) from None
    return mask


def inpaint(
    model,
    schedule: NoiseSchedule,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: str = "ddpm",
    steps: int | None = None,
    jump_length: int = 1,
    resample: int = 0,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    y: torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    variance: str = "posterior",
    spacing: str | None = None,
    progress: bool = False,
    callback=None,
) -> torch.Tensor:
    """Fill the pixels of `image` where `mask` is 0, keeping those where it is 1: RePaint (Lugmayr et al. 2022).

    Every step from level t down to t' combines (their eq. 8)
        x_t'^known   ~ q(x_t' | x_0) = N(a_t' image, s_t'^2 I)   (schedule.add_noise; the image itself at t' = clean)
        x_t'^unknown ~ the sampler's step from x_t                (DDPM ancestral, or DDIM with `eta`)
        x_t' = mask * x_t'^known + (1 - mask) * x_t'^unknown.
    The known pixels never see the unknown ones, so on its own this fills the hole with something that
    fits the rest only loosely. Resampling (their sec. 4.2) lets the two mix: at the jumps of
    repaint_path(steps, jump_length=..., resample=...) the whole image goes back up j steps,
        x_t ~ q(x_t | x_t') = N(sqrt(abar_t / abar_t') x_t', (1 - abar_t / abar_t') I),
    and comes down again, so the model harmonises the two parts at every noise level.

    image: (B, C, H, W), values in the unknown pixels are ignored; mask: broadcastable to it, 1 = known.
    steps, spacing: as in ddpm.samplers.sample (None: the method's defaults; ddpm: all T). Network
    evaluations: len(repaint_path(...)) - 1 less the jumps. callback(i, t, x_t, x0_pred) at every evaluation.
    Returns float32 images on the model's device; the known pixels equal `image` exactly.
    """
    if method not in INPAINT_METHODS:
        raise ValueError(f"inpaint works with method {' or '.join(INPAINT_METHODS)}, got {method!r}")
    mask = _checked_mask(mask, image)
    batch, device = image.shape[0], samplers._model_device(model)
    y = _labels(model, y, batch)
    samplers._check_args(model, schedule, method, eta, variance, y, guidance_scale, batch, prediction_type)
    if steps is None:
        steps = schedule.timesteps if DEFAULT_STEPS[method] is None else min(DEFAULT_STEPS[method], schedule.timesteps)
    timesteps = set_timesteps(schedule, steps, spacing=DEFAULT_SPACING[method] if spacing is None else spacing)
    pairs = samplers._step_pairs(timesteps, schedule.alphas_cumprod)  # (t, t', abar_t, abar_t') per position
    abar = [a for _, _, a, _ in pairs] + [1.0]  # abar at each position, 1 at the end (clean)
    image, mask = image.to(device=device, dtype=torch.float32), mask.to(device)
    y = y.to(device) if y is not None else None
    null_class = getattr(model, "null_class", None)

    def noise():  # drawn on the generator's device (the CPU by default), as the samplers do
        return torch.randn(image.shape, generator=generator, device=generator.device if generator else "cpu").to(device)

    def step(x, t, abar_t, abar_next):  # the sampler's step for the unknown pixels, and its x0 guess
        t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
        out = samplers._guided_output(model, x, t_batch, y, guidance_scale, null_class)
        x0 = predict_x0(schedule, x, t_batch, out, prediction_type)
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        if method == "ddpm":
            return samplers._ddpm_step(x, x0, abar_t, abar_next, variance=variance, noise=noise), x0
        if clip_denoised:  # the eps that agrees with the clipped x0
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        else:
            eps = predict_epsilon(schedule, x, t_batch, out, prediction_type)
        return samplers._ddim_step(x0, eps, abar_t, abar_next, eta=eta, noise=noise), x0

    path = repaint_path(steps, jump_length=jump_length, resample=resample)
    x, evaluations = noise(), 0
    with _eval_inference(model):
        for p, q in zip(path, path[1:]):
            if q < p:  # jump back up: x_q ~ q(x_q | x_p)
                x = math.sqrt(abar[q] / abar[p]) * x + math.sqrt(1 - abar[q] / abar[p]) * noise()
                continue
            t, t_next, abar_t, abar_next = pairs[p]
            unknown, x0 = step(x, t, abar_t, abar_next)
            if callback is not None:
                callback(evaluations, t, x, x0)
            evaluations += 1
            known = image if t_next < 0 else schedule.add_noise(image, noise(), torch.full((batch,), t_next))
            x = mask * known + (1 - mask) * unknown
    return x.clamp(-1, 1) if clip_denoised else x
