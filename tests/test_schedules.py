import math

import pytest
import torch

from ddpm.schedules import SCHEDULES, make_schedule


def test_linear_golden_values():
    s = make_schedule("linear")
    assert s.timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # diffusers' DDPMScheduler golden value for the linear schedule
    assert s.posterior_variance[487].item() == pytest.approx(0.00979, abs=1e-5)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)
    assert s.betas.dtype == torch.float64


def test_cosine_matches_closed_form_and_clips():
    T, s_ = 1000, 0.008
    s = make_schedule("cosine", timesteps=T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_offset_cosine_hits_its_rates_and_is_linear_in_angle():
    s = make_schedule("offset_cosine", timesteps=300)
    assert s.signal_rates[0].item() == pytest.approx(0.95)
    assert s.signal_rates[-1].item() == pytest.approx(0.02)
    theta = torch.arccos(s.signal_rates)
    assert torch.allclose(theta.diff(), theta.diff()[0].expand(299), atol=1e-12)
    assert torch.allclose(s.signal_rates**2 + s.noise_rates**2, torch.ones(300, dtype=torch.float64))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 300, 600, 1000])
def test_tables_are_consistent(name, T):
    s = make_schedule(name, timesteps=T)
    abar = s.alphas_cumprod
    assert len(abar) == T and (abar > 0).all() and (abar < 1).all()
    assert (abar.diff() < 0).all()
    assert torch.allclose(torch.cumprod(s.alphas, 0), abar, rtol=1e-10)
    # posterior variance: beta_t (1 - abar_{t-1}) / (1 - abar_t), zero at t = 0
    assert s.posterior_variance[0].item() == pytest.approx(0.0, abs=1e-12)
    assert (s.posterior_variance <= s.betas + 1e-15).all()
    assert torch.allclose(s.snr_table, abar / (1 - abar))


def test_add_noise_is_q_x_t_given_x0():
    s = make_schedule("linear")
    x0 = torch.full((20000, 1), 0.5)
    t = torch.full((20000,), 300)
    g = torch.Generator().manual_seed(0)
    xt = s.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    abar = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)
    assert xt.dtype == torch.float32
    assert s.add_noise(x0.bfloat16(), x0.bfloat16(), t).dtype == torch.bfloat16


def test_snr_and_round_trip():
    s = make_schedule("cosine", timesteps=600, s=0.01)
    t = torch.tensor([0, 10, 599])
    assert torch.allclose(s.snr(t), (s.alphas_cumprod / (1 - s.alphas_cumprod))[t].float())
    again = make_schedule(**s.to_dict())
    assert torch.equal(again.betas, s.betas) and again.params == s.params


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "quadratic"}, "valid: linear, cosine, offset_cosine"),
    ({"name": "linear", "timesteps": 0}, "positive integer"),
    ({"name": "linear", "timesteps": 2.5}, "positive integer"),
    ({"name": "linear", "beta_end": 1.5}, "beta_start <= beta_end < 1"),
    ({"name": "linear", "beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
    ({"name": "cosine", "max_beta": 1.0}, "max_beta"),
    ({"name": "offset_cosine", "min_signal_rate": 0.99}, "min_signal_rate < max_signal_rate"),
    ({"name": "linear", "s": 0.1}, "valid: beta_start, beta_end"),
])
def test_bad_arguments_raise_with_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_out_of_range_timesteps_raise():
    s = make_schedule("linear", timesteps=10)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        s.add_noise(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([10]))
