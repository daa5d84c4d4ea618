import pytest
import torch

from ddpm.diffusion import (
    PREDICTION_TYPES,
    get_target,
    min_snr_weight,
    predict_epsilon,
    predict_x0,
    randn_like,
    training_loss,
)
from ddpm.oracle import GaussianDenoiser
from ddpm.schedules import make_schedule


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    return x0, noise, t


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_invert_the_target(batch, prediction_type):
    s = make_schedule("cosine")
    x0, noise, t = batch
    xt = s.add_noise(x0, noise, t)
    target = get_target(s, x0, noise, t, prediction_type)
    assert torch.allclose(predict_x0(s, xt, t, target, prediction_type), x0, atol=1e-3)
    assert torch.allclose(predict_epsilon(s, xt, t, target, prediction_type), noise, atol=1e-3)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error(batch, prediction_type):
    # Whatever the parametrisation, the weighted loss must equal min(SNR, gamma) * ||x0_hat - x0||^2.
    s = make_schedule("linear")
    x0, noise, t = batch
    xt = s.add_noise(x0, noise, t)
    target = get_target(s, x0, noise, t, prediction_type)
    output = target + 0.1 * torch.randn_like(target)
    raw = ((output - target) ** 2).flatten(1).mean(1).double()
    x0_err = ((predict_x0(s, xt, t, output, prediction_type) - x0) ** 2).flatten(1).mean(1).double()
    snr = s.snr(t).double()
    weighted = min_snr_weight(snr, 5.0, prediction_type) * raw
    assert torch.allclose(weighted, snr.clamp(max=5.0) * x0_err, rtol=1e-3)


def test_training_loss_matches_a_hand_computation(batch):
    s = make_schedule("linear")
    x0, noise, t = batch
    model = lambda x, tt: 0.5 * x
    loss = training_loss(model, s, x0, timesteps=t, noise=noise)
    expected = ((0.5 * s.add_noise(x0, noise, t) - noise) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    l1 = training_loss(model, s, x0, timesteps=t, noise=noise, loss_type="l1")
    assert l1.item() == pytest.approx((0.5 * s.add_noise(x0, noise, t) - noise).abs().mean().item(), rel=1e-6)
    huber = training_loss(model, s, x0, timesteps=t, noise=noise, loss_type="huber")
    assert 0 < huber.item() < loss.item()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_optimal_denoiser_beats_a_perturbed_one(prediction_type):
    # For Gaussian data the closed-form posterior mean minimises the expected loss.
    s = make_schedule("linear")
    mean, std = torch.zeros(2, 2, 2), torch.full((2, 2, 2), 0.5)
    oracle = GaussianDenoiser(s, mean, std, prediction_type=prediction_type)
    torch.manual_seed(0)
    x0 = mean + std * torch.randn(4096, 2, 2, 2)
    t = torch.randint(0, 1000, (4096,))
    noise = torch.randn_like(x0)
    best = training_loss(oracle, s, x0, prediction_type=prediction_type, timesteps=t, noise=noise)
    worse = training_loss(
        lambda x, tt: oracle(x, tt) * 1.1, s, x0, prediction_type=prediction_type, timesteps=t, noise=noise
    )
    assert best.item() < worse.item()


def test_conditional_model_receives_labels(batch):
    s = make_schedule("linear")
    x0, _, _ = batch
    seen = {}

    def model(x, t, y):
        seen["y"] = y
        return torch.zeros_like(x)

    y = torch.arange(8)
    training_loss(model, s, x0, y=y)
    assert torch.equal(seen["y"], y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction_type": "score"}, "valid: epsilon, sample, v_prediction"),
        ({"loss_type": "l2"}, "valid: mse, l1, huber"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
        ({"min_snr_gamma": 5.0, "loss_type": "l1"}, "min_snr_gamma is defined for loss_type='mse' only"),
    ],
)
def test_bad_arguments(batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        training_loss(lambda x, t: x, make_schedule("linear"), batch[0], **kwargs)


def test_training_noise_is_laid_out_like_x0():
    # the model sees x_t in x0's memory format (channels_last on the fast path), with the same draws
    # as torch.randn for the same seed
    x0 = torch.zeros(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    noise = randn_like(x0)
    torch.manual_seed(0)
    assert torch.equal(noise, torch.randn(2, 3, 8, 8)) and noise.is_contiguous(memory_format=torch.channels_last)
    seen = {}

    def model(x, t):
        seen["x"] = x
        return x

    training_loss(model, make_schedule("linear"), x0)
    assert seen["x"].is_contiguous(memory_format=torch.channels_last)
    assert randn_like(torch.zeros(4, 3)).shape == (4, 3) and randn_like(torch.zeros(2, 3, 8, 8)).is_contiguous()
