"""ddpm-flowers: denoising diffusion (DDPM / DDIM / DPM-Solver++) for Flowers102 and any image folder.

The public API, re-exported so a notebook needs one import: `import ddpm`.
"""

__version__ = "0.1.0"

from .device import autocast, autocast_dtype, get_device, seed_everything
from .diffusion import LOSS_TYPES, PREDICTION_TYPES, predict_epsilon, predict_x0, training_loss
from .oracle import GaussianDenoiser, gaussian_errors
from .samplers import DEFAULT_STEPS, METHODS, sample, set_timesteps
from .schedules import SCHEDULES, NoiseSchedule, make_schedule
