"""The training objective, and the conversions between what a model predicts and x_0 / epsilon.

A model sees x_t = a_t x_0 + s_t eps (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t)) and predicts one of
    "epsilon":       eps                          (Ho et al. 2020)
    "sample":        x_0
    "v_prediction":  v = a_t eps - s_t x_0        (Salimans & Ho 2022)
The samplers use the same conversions, so every prediction type samples with every method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOSS_TYPES = ("mse", "l1", "huber")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _rates(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    return (
        schedule.gather(schedule.sqrt_alphas_cumprod, t, like),
        schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, like),
    )


def get_target(
    schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the model should output for x_t = add_noise(x0, noise, t)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a, s = _rates(schedule, t, x0)
    return a * noise - s * x0


def predict_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x_0 implied by the model's output: x_0 = (x_t - s_t eps) / a_t, or x_0 = a_t x_t - s_t v."""
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    a, s = _rates(schedule, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a
    return a * x_t - s * model_output


def predict_epsilon(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """eps implied by the model's output: eps = (x_t - a_t x_0) / s_t, or eps = s_t x_t + a_t v."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    a, s = _rates(schedule, t, x_t)
    if prediction_type == "sample":
        return (x_t - a * model_output) / s
    return s * x_t + a * model_output


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per prediction type.

    The paper's weight on the x_0 loss is min(SNR, gamma). An eps loss equals SNR times the x_0 loss,
    and a v loss equals (SNR + 1) times it, so the same weighting there is min(SNR, gamma) / SNR and
    min(SNR, gamma) / (SNR + 1).
    """
    check_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "epsilon":
        return clipped / snr
    return clipped / (snr + 1)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """torch.randn_like(x), drawn in the standard layout and then laid out like x: on CPU, randn_like of a
    channels_last tensor takes a serial path, 9x slower (10 ms of a 64 px batch-32 training step)."""
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        noise = noise.contiguous(memory_format=torch.channels_last)
    return noise


def training_loss(
    model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    y: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    loss_type: str = "mse",
    min_snr_gamma: float | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loss for one batch: E_{t, eps} [ w(t) * loss(model(x_t, t), target) ].

    t is uniform on {0, ..., T-1} and eps ~ N(0, I), both drawn on x0's device from the global torch
    RNG (seeded, and saved in checkpoints, so a resumed run draws the same) unless given.
    """
    check_loss_type(loss_type)
    check_prediction_type(prediction_type)
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
    if min_snr_gamma is not None and loss_type != "mse":
        # the weights rescale a *squared* error to min(SNR, gamma) x the x0 error; on l1/huber they would not
        raise ValueError(f"min_snr_gamma is defined for loss_type='mse' only, got loss_type={loss_type!r}")
    batch = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, schedule.timesteps, (batch,), device=x0.device)
    if noise is None:
        noise = randn_like(x0)
    x_t = schedule.add_noise(x0, noise, timesteps)
    output = model(x_t, timesteps) if y is None else model(x_t, timesteps, y)
    target = get_target(schedule, x0, noise, timesteps, prediction_type)
    output, target = output.float(), target.float()  # the loss in fp32 under any autocast
    if loss_type == "mse":
        per_elem = F.mse_loss(output, target, reduction="none")
    elif loss_type == "l1":
        per_elem = F.l1_loss(output, target, reduction="none")
    else:
        per_elem = F.smooth_l1_loss(output, target, reduction="none", beta=1.0)
    per_sample = per_elem.flatten(1).mean(1)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(schedule.snr(timesteps), min_snr_gamma, prediction_type)
    return per_sample.mean()
