"""The trained models this repository ships under checkpoints/: small, fp16, weights_only, and they sample."""

from pathlib import Path

import pytest
import torch

from ddpm import checkpoint as ckpt
from ddpm.sample import generate

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = ["cond32.pt", "cpu64.pt"]  # each with its command, cost and FID/KID in checkpoints/README.md


def test_the_shipped_models_are_there_and_documented():
    readme = (CHECKPOINTS / "README.md").read_text()
    for name in SHIPPED:
        assert (CHECKPOINTS / name).is_file(), f"checkpoints/{name} is missing"
        assert f"`{name}`" in readme, f"checkpoints/README.md does not describe {name}"
    assert sorted(p.name for p in CHECKPOINTS.glob("*.pt")) == sorted(SHIPPED), "an undocumented model file"


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_is_small_fp16_ema_weights(name):
    path = CHECKPOINTS / name
    assert path.stat().st_size <= 10 * 2**20
    state = torch.load(path, map_location="cpu", weights_only=True)  # the same safe path as every checkpoint
    assert state["weights"] == "ema" and "optimizer" not in state and "ema" not in state
    assert all(v.dtype == torch.float16 for v in state["model"].values() if v.is_floating_point())
    assert state["step"] > 0 and state["note"].startswith("python -m ddpm.train")  # the command that made it


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_samples_deterministically(name):
    torch.set_num_threads(1)
    model, schedule, config = ckpt.load_model(CHECKPOINTS / name, device="cpu")
    assert next(model.parameters()).dtype == torch.float32  # loaded in fp32 for any device
    a = generate(model, schedule, config, n=2, steps=4, seed=3, progress=False)
    b = generate(model, schedule, config, n=2, steps=4, seed=3, progress=False)
    size = config.model.image_size
    assert a.shape == (2, 3, size, size) and torch.isfinite(a).all() and a.abs().max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, schedule, config, n=2, steps=4, seed=4, progress=False))
    assert a.std() > 0.1  # an image, not a constant


def test_the_shipped_conditional_model_draws_the_class_asked_for():
    torch.set_num_threads(1)
    model, schedule, config = ckpt.load_model(CHECKPOINTS / "cond32.pt", device="cpu")
    assert config.model.num_classes == 102  # Flowers102's classes (and the null class for guidance)

    def yellowness(label, guidance=1.0):  # mean of red and green over blue, in [-1, 1] units
        images = generate(model, schedule, config, n=4, steps=6, seed=3, class_label=label, guidance_scale=guidance,
                          progress=False)  # fmt: skip
        r, g, b = images.mean((0, 2, 3))
        return float((r + g) / 2 - b), images

    sunflowers, plain = yellowness(53)
    coneflowers, _ = yellowness(16)  # purple coneflower
    assert sunflowers > coneflowers + 0.2, (sunflowers, coneflowers)
    assert not torch.equal(yellowness(53, guidance=3.0)[1], plain)  # the guidance weight is applied


def test_the_shipped_64px_model_is_what_the_cpu64_preset_trains():
    # checkpoints/README.md reproduces cpu64.pt with `--preset cpu64`: the preset and the file must not drift apart
    import dataclasses

    from ddpm import config as C

    _, _, config = ckpt.load_model(CHECKPOINTS / "cpu64.pt", device="cpu")
    preset = C.preset("cpu64")
    assert config.model.num_classes == 102 and preset.train.conditional  # the preset takes its classes from the data
    assert dataclasses.replace(config.model, num_classes=None) == preset.model and config.diffusion == preset.diffusion
    assert torch.load(CHECKPOINTS / "cpu64.pt", map_location="cpu", weights_only=True)["step"] == preset.train.max_steps
    keys = ("batch_size", "lr", "warmup_steps", "ema_decay", "ema_warmup", "seed", "lr_decay", "sample_guidance_scale")
    for key in keys:
        assert getattr(config.train, key) == getattr(preset.train, key), key
