"""Samplers: DDPM (ancestral), DDIM and DPM-Solver++(2M), deterministic or stochastic, behind one `sample(...)`.

All of them walk a descending list of *training* timesteps t_0 > t_1 > ... > t_{n-1} and end at "clean"
(abar = 1). At each step the model's output is turned into a prediction of x_0 (and of eps), so every
method works with every prediction type. With fewer steps than T the list is a subsequence of the
training timesteps ("respacing"); the coefficients then use abar at the two timesteps a step joins.

All random noise comes from a CPU torch.Generator and is then moved to the device, so a seed gives the
same images on CPU, CUDA and MPS. Each call draws x_T and every step's noise ahead, in the order the steps
use them, and copies each to the device as its step comes (_Noise): no step waits for a host-to-device copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import to_device
from .diffusion import check_prediction_type, predict_epsilon, predict_x0
from .schedules import NoiseSchedule, check_schedule_name

METHODS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
SPACINGS = ("trailing", "leading", "linspace", "logsnr")
VARIANCES = ("posterior", "beta")
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmpp_2m": 20, "dpmpp_2m_sde": 20}  # None: all T training timesteps
# DPM-Solver++ steps in log-SNR, so an even log-SNR grid suits it: on the Gaussian oracle it cuts the ODE
# solver's error at 20 steps 2-6x against "trailing" (benchmarks/samplers.py). DDPM/DDIM keep "trailing".
# (On a briefly trained model the ODE solver scored better with "trailing", which stops at t = T/steps - 1
# and skips the lowest noise levels: docs/quality.md.)
DEFAULT_SPACING = {"ddpm": "trailing", "ddim": "trailing", "dpmpp_2m": "logsnr", "dpmpp_2m_sde": "logsnr"}
# The sampler to use when none is named (generate, training-time grids), by prediction type and schedule.
# Why, in short (the FID runs: docs/quality.md): an epsilon model's error at the noisiest steps becomes saturated
# colour on a deterministic path, which the SDE solver's fresh noise washes out; v-prediction is well conditioned,
# and there DDIM-20 beat the SDE solver on cosine/linear while the SDE solver won on offset-cosine (two seeds);
# "sample" was not measured, so it gets the choice that held up for both measured types.
_SDE, _DDIM = ("dpmpp_2m_sde", 20), ("ddim", 20)


def default_sampler(prediction_type: str, schedule: str) -> tuple[str, int]:
    """(method, steps) to sample a model trained with `prediction_type` on the `schedule` named (a
    ddpm.schedules.SCHEDULES entry) when the user names no method."""
    check_prediction_type(prediction_type)
    check_schedule_name(schedule)
    if prediction_type == "v_prediction" and schedule != "offset_cosine":
        return _DDIM
    return _SDE


def default_guidance(config) -> float:
    """The classifier-free guidance weight w a model (its ddpm.config.Config) samples with unless told
    otherwise: a conditional model's train.sample_guidance_scale (saved in its checkpoint; its training grids
    used it too), 1 for an unconditional one."""
    return config.train.sample_guidance_scale if config.model.num_classes is not None else 1.0


def set_timesteps(schedule: NoiseSchedule | int, steps: int, *, spacing: str = "trailing") -> torch.Tensor:
    """The `steps` training timesteps a sampler visits, descending (diffusers' names for the spacings).

    "trailing" ends at T-1 and spreads evenly below it (Lin et al. 2023: the first step then starts
    from (almost) pure noise, which is what x_T ~ N(0, I) assumes); "leading" starts at 0 and
    steps by T // steps; "linspace" rounds an even grid over [0, T-1]; "logsnr" spaces them evenly
    in log-SNR from t = T-1 down to t = 0 (needs the schedule, not just T), which puts more steps
    at low noise where fine detail is decided: DPM-Solver++'s natural grid (Lu et al. 2022).
    """
    T = schedule if isinstance(schedule, int) else schedule.timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the training timesteps), got {steps!r}")
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[:steps] - 1
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "linspace":
        ts = np.round(np.linspace(T - 1, 0, steps)).astype(np.int64)
    elif spacing == "logsnr":
        if isinstance(schedule, int):
            raise ValueError("spacing='logsnr' needs the NoiseSchedule, not only the number of timesteps")
        ts = _logsnr_timesteps(schedule.log_snr.numpy(), steps)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return torch.tensor(np.asarray(ts, dtype=np.int64).tolist(), dtype=torch.long)


def _logsnr_timesteps(log_snr: np.ndarray, steps: int, *, floor: float = -10.0) -> np.ndarray:
    """Training timesteps nearest to an even log-SNR grid, made strictly decreasing (log-SNR falls with t).

    The grid starts at T-1 but spaces the rest from log-SNR `floor` (abar ~ 4.5e-5, where x_t is noise to
    four decimals): the cosine schedule reaches -20 there, and steps spent at such SNRs change nothing.
    """
    T = len(log_snr)
    targets = np.linspace(max(log_snr[-1], floor), log_snr[0], steps)
    targets[0] = log_snr[-1]
    ts = np.searchsorted(-log_snr, -targets).clip(0, T - 1)
    # Nearest of the two neighbours, then push apart any duplicates (possible when steps is close to T).
    below = (ts - 1).clip(0, T - 1)
    ts = np.where(np.abs(log_snr[below] - targets) < np.abs(log_snr[ts] - targets), below, ts)
    for i in range(1, steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(steps - 1, -1, -1):
        ts[i] = max(ts[i], steps - 1 - i)
    return ts


def _model_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _guided_output(model, x, t, y, guidance_scale, null_class):
    """The model's output, with classifier-free guidance: out = uncond + w (cond - uncond) (Ho & Salimans 2022)."""
    if y is None:
        return model(x, t).float()
    if guidance_scale == 1.0:
        return model(x, t, y).float()
    # One batched call for the conditional and the unconditional half.
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)])).float()
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _check_args(model, schedule, method, eta, variance, y, guidance_scale, batch, prediction_type):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    check_prediction_type(prediction_type)
    if eta != 0.0 and method != "ddim":
        raise ValueError(f"eta={eta} applies to method='ddim' only (got method={method!r})")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    if guidance_scale != 1.0:
        if y is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs class labels y (a conditional model)")
        if getattr(model, "null_class", None) is None:
            raise ValueError(
                "classifier-free guidance needs a model with a null class (model.null_class); "
                "train with conditional=True and class dropout"
            )
    if y is not None and y.shape[0] != batch:
        raise ValueError(f"y has {y.shape[0]} labels but shape asks for a batch of {batch}")


def sample(
    model,
    schedule: NoiseSchedule,
    shape,
    *,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    y: torch.Tensor | int | None = None,
    guidance_scale: float = 1.0,
    clip_denoised: bool = True,
    progress: bool = True,
    callback=None,
    spacing: str | None = None,
    variance: str = "posterior",
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw a batch of images x_0 of `shape` (B, C, H, W) from `model`, starting at x_T ~ N(0, I).

    model:        a callable model(x_t, t) or model(x_t, t, y); t holds *training* timesteps (B,).
    method:       "ddpm" (ancestral; `variance` "posterior" = beta~_t or "beta" = beta_t),
                  "ddim" (`eta` 0 deterministic ... 1 ancestral), "dpmpp_2m" (DPM-Solver++ 2M, an ODE
                  solver) or "dpmpp_2m_sde" (its SDE form: fresh noise every step, like DDPM).
    steps:        network evaluations; None = DEFAULT_STEPS[method] (all T for ddpm).
    spacing:      which training timesteps `steps` visits (see set_timesteps); None = DEFAULT_SPACING[method].
    y, guidance_scale: class labels and classifier-free guidance weight (1 = plain conditional).
    clip_denoised: clamp each x_0 prediction (and the result) to [-1, 1].
    callback:     callback(i, t, x_t, x0_pred) after each network evaluation (strips, GIFs).
    x_T:          the start noise, of `shape` (default: drawn from `generator`), e.g. an inverted image's
                  (ddpm.editing.invert) or a blend of two seeds' (ddpm.editing.interpolate).
    Returns float32 images on `device` (default: the model's device).
    An nn.Module is put in eval mode (dropout off) for the call and restored after.
    """
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            return _sample(
                model,
                schedule,
                shape,
                method=method,
                steps=steps,
                eta=eta,
                prediction_type=prediction_type,
                generator=generator,
                y=y,
                guidance_scale=guidance_scale,
                clip_denoised=clip_denoised,
                progress=progress,
                callback=callback,
                spacing=spacing,
                variance=variance,
                device=device,
                x_T=x_T,
            )
    finally:
        if was_training:
            model.train()


def _sample(
    model,
    schedule,
    shape,
    *,
    method,
    steps,
    eta,
    prediction_type,
    generator,
    y,
    guidance_scale,
    clip_denoised,
    progress,
    callback,
    spacing,
    variance,
    device,
    x_T,
):
    batch = shape[0]
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.long)
    _check_args(model, schedule, method, eta, variance, y, guidance_scale, batch, prediction_type)
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape asks for {tuple(shape)}")
    y = to_device(y, device) if y is not None else None
    if steps is None:  # the method's default, but never more steps than the schedule has (T may be small)
        steps = None if DEFAULT_STEPS[method] is None else min(DEFAULT_STEPS[method], schedule.timesteps)
    timesteps = set_timesteps(
        schedule,
        schedule.timesteps if steps is None else steps,
        spacing=DEFAULT_SPACING[method] if spacing is None else spacing,
    )
    null_class = getattr(model, "null_class", None)
    pairs = _step_pairs(timesteps, schedule.alphas_cumprod)
    draws = sum(_draws_noise(method, abar_t, abar_prev, eta=eta) for _, _, abar_t, abar_prev in pairs)
    # x_T (unless given), then each stochastic step's noise
    noise = _Noise(shape, draws + (x_T is None), generator=generator, device=device)

    x = noise() if x_T is None else x_T.to(device=device, dtype=torch.float32)
    solver = (
        _DPMSolverPP2M(schedule, noise=noise if method == "dpmpp_2m_sde" else None)
        if method.startswith("dpmpp")
        else None
    )
    for i, (t, prev, abar_t, abar_prev) in enumerate(tqdm(pairs, desc=method, disable=not progress, leave=False)):
        t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
        out = _guided_output(model, x, t_batch, y, guidance_scale, null_class)
        x0 = predict_x0(schedule, x, t_batch, out, prediction_type)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if callback is not None:
            callback(i, t, x, x0)
        if method == "ddpm":
            x = _ddpm_step(x, x0, abar_t, abar_prev, variance=variance, noise=noise)
        elif method == "ddim":
            # eps consistent with the (possibly clipped) x0, as in DDIM's eq. 12
            eps = (
                predict_epsilon(schedule, x, t_batch, out, prediction_type)
                if not clip_denoised
                else (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
            )
            x = _ddim_step(x0, eps, abar_t, abar_prev, eta=eta, noise=noise)
        else:
            x = solver(x, x0, t, prev)
    return x.clamp(-1, 1) if clip_denoised else x


def _step_pairs(timesteps: torch.Tensor, abar: torch.Tensor) -> list[tuple[int, int, float, float]]:
    """(t, prev, abar_t, abar_prev) for each step; the last step goes to prev = -1, "clean" (abar = 1)."""
    ts = timesteps.tolist()
    prevs = ts[1:] + [-1]
    return [(t, prev, float(abar[t]), float(abar[prev]) if prev >= 0 else 1.0) for t, prev in zip(ts, prevs)]


def _draws_noise(method: str, abar_t: float, abar_prev: float, *, eta: float) -> bool:
    """Whether the step from abar_t to abar_prev draws noise: the same tests the step functions make."""
    if abar_prev == 1.0:  # every method's last step lands on x_0 without noise
        return False
    if method == "ddim":
        return _ddim_sigma(abar_t, abar_prev, eta) > 0
    return method in ("ddpm", "dpmpp_2m_sde")


# How much noise one sample() call draws ahead at a time: all of it for the usual calls (a 20-step solver at
# batch 64 and 64 px needs 66 MB), in windows for long ones (DDPM's 1000 steps: 3.1 GB at that size).
NOISE_WINDOW_BYTES = 256 * 2**20


class _Noise:
    """x_T and then every stochastic step's noise for one sample() call, in the order the steps ask for it.

    Drawn ahead (NOISE_WINDOW_BYTES at a time) on the generator's device, into pinned memory when it goes
    to a GPU, then copied one step at a time with to_device (non-blocking on CUDA). Drawing each step's
    noise on the CPU and copying it with a blocking .to(device) made the host wait for the GPU at every step.
    Every tensor is its own randn draw of one step's shape, as the per-step draws were, so a seed gives the
    same images as before, bit for bit (one randn over all steps would not: torch fills a tensor in blocks
    of 16 numbers, so a step whose size is not a multiple of 16 would take other numbers).
    """

    def __init__(self, shape, count: int, *, generator: torch.Generator | None, device: torch.device):
        self.shape, self.left, self.generator, self.device = tuple(shape), count, generator, device
        self.host = generator.device if generator is not None else torch.device("cpu")
        self.per_window = max(1, NOISE_WINDOW_BYTES // (4 * max(1, math.prod(self.shape))))
        self.window, self.used = [], 0

    def __call__(self) -> torch.Tensor:
        if self.used == len(self.window):
            self._draw()
        self.used += 1
        return to_device(self.window[self.used - 1], self.device)

    def _draw(self) -> None:
        n = min(self.left, self.per_window)
        if n == 0:
            raise RuntimeError("a sampler step asked for more noise than _draws_noise counted (a bug in ddpm.samplers)")
        pin = self.device.type == "cuda" and self.host.type == "cpu"
        window = torch.empty((n, *self.shape), dtype=torch.float32, device=self.host, pin_memory=pin)
        for row in window:
            row.normal_(generator=self.generator)  # what torch.randn(shape, generator=...) does
        self.window, self.used, self.left = window, 0, self.left - n


def _ddpm_step(x, x0, abar_t, abar_prev, *, variance, noise):
    """Sample from p(x_prev | x_t) = N(mu~(x_t, x0_hat), sigma^2) (Ho et al. eq. 7, respaced).

    With alpha = abar_t / abar_prev and beta = 1 - alpha (one step of the respaced chain):
    mu~ = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t,
    sigma^2 = beta~ = beta (1 - abar_prev) / (1 - abar_t) ("posterior") or beta ("beta").
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 + (math.sqrt(alpha) * (1 - abar_prev) / (1 - abar_t)) * x
    if abar_prev == 1.0:  # the last step lands on x_0: no noise
        return mean
    var = beta * (1 - abar_prev) / (1 - abar_t) if variance == "posterior" else beta
    return mean + math.sqrt(var) * noise()


def _ddim_sigma(abar_t, abar_prev, eta):
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))


def _ddim_step(x0, eps, abar_t, abar_prev, *, eta, noise):
    """DDIM (Song et al. 2021, eq. 12):
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    eta = 1 on all T steps is DDPM with the posterior variance; eta = 0 is deterministic.
    """
    sigma = _ddim_sigma(abar_t, abar_prev, eta)
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    return x + sigma * noise() if sigma > 0 else x


class _DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the data-prediction form, and its SDE form (their App. B).

    With a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t), lambda_t = log(a_t / s_t) and h = lambda_next - lambda_t:
        ODE: x_next = (s_next / s_t) x_t - a_next (e^{-h} - 1) D,
        SDE: x_next = (s_next / s_t) e^{-h} x_t + a_next (1 - e^{-2h}) D + s_next sqrt(1 - e^{-2h}) z,
        D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h   (D = x0_t on the first step).
    With D = x0_t the SDE step is exactly DDPM's posterior q(x_next | x_t, x0_t): the SDE form is DDPM
    with a second-order x0, so it keeps DDPM's habit of washing the network's errors out with fresh noise.
    The last step goes to abar = 1 (s = 0, lambda = inf), where the update is simply x_0 = x0_t.
    """

    def __init__(self, schedule: NoiseSchedule, *, noise=None):
        self.abar = schedule.alphas_cumprod
        self.noise = noise  # None: the ODE solver; else a callable giving the next step's noise
        self.x0_prev = None
        self.h_prev = None

    def _rates(self, t):
        abar = float(self.abar[t])
        return math.sqrt(abar), math.sqrt(1 - abar)

    def __call__(self, x, x0, t, prev):
        if prev < 0:
            return x0
        a_t, s_t = self._rates(t)
        a_next, s_next = self._rates(prev)
        h = math.log(a_next / s_next) - math.log(a_t / s_t)
        if self.x0_prev is None:
            d = x0
        else:
            r = self.h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self.x0_prev
        self.x0_prev, self.h_prev = x0, h
        if self.noise is None:
            return (s_next / s_t) * x - (a_next * math.expm1(-h)) * d
        keep = -math.expm1(-2 * h)  # 1 - e^{-2h}
        x_mean = ((s_next / s_t) * math.exp(-h)) * x + (a_next * keep) * d
        return x_mean + (s_next * math.sqrt(keep)) * self.noise()
