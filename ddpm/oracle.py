"""The exact denoiser of a Gaussian data distribution: a "perfectly trained model" with no training.

If x_0 ~ N(mu, diag(std^2)) then x_t = a x_0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)) is
Gaussian too, and the posterior means are closed-form:
    E[x_0 | x_t] = mu + a std^2 (x_t - a mu) / (a^2 std^2 + s^2)
    E[eps | x_t] = s (x_t - a mu) / (a^2 std^2 + s^2)
These are the minimisers of the training losses, so a sampler driven by this model should reproduce
N(mu, std^2); how far it lands from it measures the sampler's own error. Used by the sampler tests,
benchmarks/samplers.py and the sampling notebook.
"""

from __future__ import annotations

import torch

from .diffusion import check_prediction_type
from .schedules import NoiseSchedule


class GaussianDenoiser:
    """model(x_t, t) -> the optimal prediction (of `prediction_type`) for data N(mean, std^2), per element."""

    def __init__(
        self, schedule: NoiseSchedule, mean: torch.Tensor, std: torch.Tensor, *, prediction_type: str = "epsilon"
    ):
        check_prediction_type(prediction_type)
        self.schedule = schedule
        self.mean, self.std = mean.double(), std.double()
        self.prediction_type = prediction_type
        self.calls = 0  # network evaluations, for NFE counting

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        self.calls += 1
        x = x_t.double()
        a = self.schedule.gather(self.schedule.sqrt_alphas_cumprod, t, x)
        s = self.schedule.gather(self.schedule.sqrt_one_minus_alphas_cumprod, t, x)
        mean, var = self.mean.to(x.device), self.std.to(x.device) ** 2
        residual = (x - a * mean) / (a**2 * var + s**2)
        x0 = mean + a * var * residual
        eps = s * residual
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[self.prediction_type]
        return out.to(x_t.dtype)


def gaussian_errors(samples: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """How far samples (N, ...) are from N(mean, diag(std^2)), per element, averaged over elements.

    mean_err: RMS error of the sample means; std_err: RMS error of the sample stds;
    w2: the 2-Wasserstein distance between the fitted and the true diagonal Gaussians,
        W2^2 = sum_i (m_i - mu_i)^2 + (s_i - std_i)^2, divided by the dimension (per-element W2).
    """
    x = samples.double().flatten(1)
    mu, sd = mean.double().flatten(), std.double().flatten()
    m, s = x.mean(0), x.std(0)
    dim = x.shape[1]
    return {
        "mean_err": float(((m - mu) ** 2).mean().sqrt()),
        "std_err": float(((s - sd) ** 2).mean().sqrt()),
        "w2": float((((m - mu) ** 2).sum() + ((s - sd) ** 2).sum()) / dim) ** 0.5,
    }
