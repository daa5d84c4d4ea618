"""Noise schedules: how much signal survives at each of the T training timesteps.

Everything is precomputed in float64 on the CPU (as in improved-diffusion): the products of
thousands of numbers near 1 lose precision in float32. Values are cast to the data's dtype and
device only when they are gathered for a batch.

Notation (Ho et al. 2020): beta_t is the variance added at step t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. The forward process is
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "offset_cosine", "sigmoid", "scaled_linear")

_DEFAULTS = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "cosine": {"s": 0.008, "max_beta": 0.999},
    "offset_cosine": {"max_signal_rate": 0.95, "min_signal_rate": 0.02},
    "sigmoid": {"start": -3.0, "end": 3.0, "tau": 1.0, "max_beta": 0.999},
    # Named as diffusers names it (beta_schedule="scaled_linear"), so a diffusers or Stable Diffusion config
    # (there beta_start=0.00085, beta_end=0.012) ports by name and parameters; it is the "quad" schedule of
    # Ho et al.'s code, quadratic in t. The defaults are the linear schedule's, so the two differ in shape only.
    "scaled_linear": {"beta_start": 1e-4, "beta_end": 0.02},
}


def _linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"linear schedule needs 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # beta_t = (sqrt(beta_start) + t/(T-1) (sqrt(beta_end) - sqrt(beta_start)))^2: linear in sqrt(beta), so
    # the betas stay small for longer than the linear schedule's and the signal fades later.
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"scaled_linear schedule needs 0 < beta_start <= beta_end < 1, got "
            f"beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def _cosine_betas(T: int, s: float, max_beta: float) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
    # beta_t = 1 - abar(t+1)/abar(t), clipped so the last steps do not become singular.
    if s < 0:
        raise ValueError(f"cosine schedule needs s >= 0, got s={s}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"cosine schedule needs 0 < max_beta < 1, got max_beta={max_beta}")
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _sigmoid_betas(T: int, start: float, end: float, tau: float, max_beta: float) -> torch.Tensor:
    # Jabri et al. 2022 / Chen 2023 (as lucidrains' denoising-diffusion-pytorch): abar(t) = f(t)/f(0) with
    # f(t) = (sigmoid(end/tau) - sigmoid((start + t/T (end - start))/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)),
    # a sigmoid of a linear ramp from `start` to `end`; a smaller temperature tau makes the drop steeper. As for
    # cosine, beta_t = 1 - abar(t+1)/abar(t), clipped at max_beta (f(T) = 0 would make the last step singular).
    if not start < end:
        raise ValueError(f"sigmoid schedule needs start < end, got start={start}, end={end}")
    if not tau > 0:
        raise ValueError(f"sigmoid schedule needs tau > 0, got tau={tau}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"sigmoid schedule needs 0 < max_beta < 1, got max_beta={max_beta}")
    t = torch.arange(T + 1, dtype=torch.float64) / T
    v_start, v_end = torch.tensor([start / tau, end / tau], dtype=torch.float64).sigmoid()
    f = (v_end - ((start + t * (end - start)) / tau).sigmoid()) / (v_end - v_start)
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _offset_cosine_alphas_cumprod(T: int, max_signal_rate: float, min_signal_rate: float) -> torch.Tensor:
    # Keras DDIM / "Generative Deep Learning": signal rate cos(theta), noise rate sin(theta), with theta
    # linear in diffusion time from arccos(max_signal_rate) at time 0 to arccos(min_signal_rate) at time 1.
    # Timestep t in 0..T-1 sits at time t/(T-1), so the first and last steps hit the two rates exactly.
    if not 0.0 < min_signal_rate < max_signal_rate < 1.0:
        raise ValueError(
            "offset_cosine schedule needs 0 < min_signal_rate < max_signal_rate < 1, got "
            f"min_signal_rate={min_signal_rate}, max_signal_rate={max_signal_rate}"
        )
    time = torch.linspace(0, 1, T, dtype=torch.float64) if T > 1 else torch.ones(1, dtype=torch.float64)
    start, end = math.acos(max_signal_rate), math.acos(min_signal_rate)
    theta = start + time * (end - start)
    return torch.cos(theta) ** 2


class NoiseSchedule:
    """The float64 coefficient tables of one schedule, and the forward process q(x_t | x_0)."""

    def __init__(self, name: str, alphas_cumprod: torch.Tensor, params: dict):
        self.name = name
        self.params = dict(params)
        self._device_tables: dict = {}  # float tables copied to an accelerator once, on first use
        self.timesteps = len(alphas_cumprod)
        self.alphas_cumprod = abar = alphas_cumprod.to(torch.float64)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.alphas = abar / self.alphas_cumprod_prev
        self.betas = 1 - self.alphas
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt()
        # Posterior variance of q(x_{t-1} | x_t, x_0): beta~_t (Ho et al. eq. 7); the samplers' "posterior" choice
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - abar)
        # Signal-to-noise ratio abar / (1 - abar); its log is the natural axis to compare schedules on.
        self.snr_table = abar / (1 - abar)
        self.log_snr = self.snr_table.log()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"NoiseSchedule({self.name!r}, timesteps={self.timesteps}, {params})"

    @property
    def signal_rates(self) -> torch.Tensor:
        """sqrt(abar_t): the weight of the data in x_t."""
        return self.sqrt_alphas_cumprod

    @property
    def noise_rates(self) -> torch.Tensor:
        """sqrt(1 - abar_t): the weight of the noise in x_t."""
        return self.sqrt_one_minus_alphas_cumprod

    def to_dict(self) -> dict:
        """What make_schedule(**d) needs to rebuild this schedule (stored in checkpoints)."""
        return {"name": self.name, "timesteps": self.timesteps, **self.params}

    def gather(self, table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[timesteps] shaped (B, 1, 1, ...) to broadcast against `like`, in its dtype and device.

        The lookup happens on the timesteps' device, so a CUDA training step never waits for the host.
        """
        timesteps = torch.as_tensor(timesteps)
        if timesteps.device.type == "cpu":
            self._check_timesteps(timesteps)  # cheap on the CPU; on a GPU it would force a sync
        values = self._table_on(table, timesteps.device)[timesteps.long()]
        values = values.to(device=like.device, dtype=like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def _table_on(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return table
        key = (id(table), str(device))
        if key not in self._device_tables:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            self._device_tables[key] = table.to(device=device, dtype=dtype)
        return self._device_tables[key]

    def _check_timesteps(self, timesteps: torch.Tensor) -> None:
        if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= self.timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.timesteps - 1}] for this schedule, got "
                f"min={int(timesteps.min())}, max={int(timesteps.max())}"
            )

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample from q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (diffusers' argument order)."""
        return (
            self.gather(self.sqrt_alphas_cumprod, timesteps, original) * original
            + self.gather(self.sqrt_one_minus_alphas_cumprod, timesteps, original) * noise
        )

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float32 on the device of `timesteps`."""
        timesteps = torch.as_tensor(timesteps)
        ones = torch.ones(timesteps.shape, device=timesteps.device, dtype=torch.float32)
        return self.gather(self.snr_table, timesteps, ones).reshape(timesteps.shape)


def check_schedule_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def make_schedule(name: str, timesteps: int = 1000, **params) -> NoiseSchedule:
    """Build a named schedule with T = `timesteps` steps.

    "linear":        betas linear from beta_start=1e-4 to beta_end=0.02 (Ho et al. 2020)
    "cosine":        Nichol & Dhariwal 2021 with s=0.008, betas clipped at max_beta=0.999
    "offset_cosine": signal rate cos(theta), theta linear from arccos(max_signal_rate=0.95)
                     to arccos(min_signal_rate=0.02) (Keras DDIM)
    "sigmoid":       abar from a sigmoid of a ramp from start=-3 to end=3 at temperature tau=1, betas
                     clipped at max_beta=0.999 (Jabri et al. 2022; lucidrains' denoising-diffusion-pytorch)
    "scaled_linear": betas quadratic in t, linear in sqrt(beta) from beta_start=1e-4 to beta_end=0.02
                     (diffusers' name; Stable Diffusion uses beta_start=0.00085, beta_end=0.012)
    """
    check_schedule_name(name)
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer (300, 600, 1000 are common), got {timesteps!r}")
    unknown = set(params) - set(_DEFAULTS[name])
    if unknown:
        raise ValueError(
            f"{name} schedule got unknown parameter(s) {sorted(unknown)}; valid: {', '.join(_DEFAULTS[name])}"
        )
    p = {**_DEFAULTS[name], **{k: float(v) for k, v in params.items()}}
    if name == "offset_cosine":
        abar = _offset_cosine_alphas_cumprod(timesteps, **p)
    else:
        betas = {
            "linear": _linear_betas,
            "cosine": _cosine_betas,
            "sigmoid": _sigmoid_betas,
            "scaled_linear": _scaled_linear_betas,
        }[name](timesteps, **p)
        abar = torch.cumprod(1 - betas, 0)
    return NoiseSchedule(name, abar, p)


def default_params(name: str) -> dict:
    """The parameters of schedule `name` and their defaults: what make_schedule(name, T, **params) accepts."""
    check_schedule_name(name)
    return dict(_DEFAULTS[name])
