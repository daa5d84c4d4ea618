"""ddpm-flowers: denoising diffusion (DDPM / DDIM / DPM-Solver++) for Flowers102 and any image folder.

The core API is re-exported here: `import ddpm`. Sampling is `ddpm.samplers.sample(...)`: the name
`ddpm.sample` belongs to the sampling command line (`python -m ddpm.sample`), and a function of the same
name here would be replaced by that module as soon as anything imported it.
"""

__version__ = "0.1.0"

from .device import autocast, autocast_dtype, get_device, seed_everything
from .diffusion import LOSS_TYPES, PREDICTION_TYPES, predict_epsilon, predict_x0, training_loss
from .editing import generate_from_noise, inpaint, interpolate, invert, slerp
from .oracle import GaussianDenoiser, gaussian_errors
from .samplers import DEFAULT_SPACING, DEFAULT_STEPS, METHODS, set_timesteps
from .schedules import SCHEDULES, NoiseSchedule, make_schedule

__all__ = [
    "autocast",
    "autocast_dtype",
    "get_device",
    "seed_everything",
    "LOSS_TYPES",
    "PREDICTION_TYPES",
    "predict_epsilon",
    "predict_x0",
    "training_loss",
    "generate_from_noise",
    "inpaint",
    "interpolate",
    "invert",
    "slerp",
    "GaussianDenoiser",
    "gaussian_errors",
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "METHODS",
    "set_timesteps",
    "SCHEDULES",
    "NoiseSchedule",
    "make_schedule",
]
