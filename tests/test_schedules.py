import math

import pytest
import torch

from ddpm.schedules import SCHEDULES, default_params, make_schedule


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


def test_sigmoid_matches_closed_form_and_clips():
    # abar_t = f(t+1)/f(0), f(u) = (sigmoid(end/tau) - sigmoid((start + u/T (end - start))/tau)) / (...)
    T, start, end, tau = 1000, -3.0, 3.0, 0.7
    s = make_schedule("sigmoid", timesteps=T, tau=tau)
    sig = lambda z: 1 / (1 + math.exp(-z))
    f = lambda u: sig(end / tau) - sig((start + u / T * (end - start)) / tau)
    for t in (0, 100, 500, 900, 998):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    # f(T) = 0: the last beta would be 1, it is clipped at max_beta
    assert s.betas[-1].item() == pytest.approx(0.999)
    assert s.alphas_cumprod[-1].item() == pytest.approx(f(T - 1) / f(0) * 0.001, rel=1e-9)
    assert s.params == {"start": -3.0, "end": 3.0, "tau": 0.7, "max_beta": 0.999}
    # a lower temperature keeps more signal early and drops it faster in the middle
    assert make_schedule("sigmoid", tau=0.3).alphas_cumprod[100] > s.alphas_cumprod[100]


def test_scaled_linear_is_linear_in_sqrt_beta():
    # beta_t = (sqrt(b0) + t/(T-1) (sqrt(b1) - sqrt(b0)))^2; abar_t = prod_{s<=t} (1 - beta_s), by hand
    T, b0, b1 = 1000, 0.00085, 0.012  # Stable Diffusion's values
    s = make_schedule("scaled_linear", timesteps=T, beta_start=b0, beta_end=b1)
    beta = lambda t: (math.sqrt(b0) + t / (T - 1) * (math.sqrt(b1) - math.sqrt(b0))) ** 2
    abar = 1.0
    for t in range(T):
        abar *= 1 - beta(t)
        if t in (0, 1, 250, 500, 999):
            assert s.betas[t].item() == pytest.approx(beta(t), rel=1e-9)
            assert s.alphas_cumprod[t].item() == pytest.approx(abar, rel=1e-9)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0047, rel=0.01)  # diffusers' SD scheduler: 0.00466
    # same ends as the linear schedule, but smaller betas in between: the signal lasts longer
    lin, quad = make_schedule("linear"), make_schedule("scaled_linear")
    assert quad.betas[0].item() == pytest.approx(1e-4) and quad.betas[-1].item() == pytest.approx(0.02)
    assert (quad.betas[1:-1] < lin.betas[1:-1]).all() and (quad.alphas_cumprod[1:] > lin.alphas_cumprod[1:]).all()


def test_default_params_are_what_make_schedule_accepts():
    for name in SCHEDULES:
        params = default_params(name)
        assert make_schedule(name, 100, **params).params == params
        params["x"] = 1.0  # a copy: changing it changes nothing
        assert "x" not in default_params(name)


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "quad"}, "valid: linear, cosine, offset_cosine, sigmoid, scaled_linear"),
        ({"name": "linear", "timesteps": 0}, "positive integer"),
        ({"name": "linear", "timesteps": 2.5}, "positive integer"),
        ({"name": "linear", "beta_end": 1.5}, "beta_start <= beta_end < 1"),
        ({"name": "linear", "beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
        ({"name": "cosine", "max_beta": 1.0}, "max_beta"),
        ({"name": "offset_cosine", "min_signal_rate": 0.99}, "min_signal_rate < max_signal_rate"),
        ({"name": "linear", "s": 0.1}, "valid: beta_start, beta_end"),
        ({"name": "sigmoid", "start": 3, "end": -3}, "start < end"),
        ({"name": "sigmoid", "tau": 0}, "tau > 0"),
        ({"name": "sigmoid", "max_beta": 1.0}, "max_beta"),
        ({"name": "scaled_linear", "beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
    ],
)
def test_bad_arguments_raise_with_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_out_of_range_timesteps_raise():
    s = make_schedule("linear", timesteps=10)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        s.add_noise(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([10]))


def test_schedule_sliders_offer_every_schedule_and_its_parameters(capsys):
    """Notebook 02's explorer: every SCHEDULES entry, with the sliders of exactly its parameters enabled."""
    pytest.importorskip("ipywidgets")
    from ddpm import viz

    defaults = {name: default_params(name) for name in SCHEDULES}
    box = viz.schedule_sliders(torch.zeros(3, 8, 8), make_schedule, defaults, value="sigmoid")
    name = box.children[0].children[0]
    sliders = {s.description: s for row in box.children[1:-2] for s in row.children}
    assert list(name.options) == list(SCHEDULES) and name.value == "sigmoid"
    assert set(sliders) == {p for d in defaults.values() for p in d}
    for schedule in SCHEDULES:
        name.value = schedule
        assert {p for p, s in sliders.items() if not s.disabled} == set(defaults[schedule])
        assert all(s.min <= s.value <= s.max for s in sliders.values())
    name.value = "scaled_linear"
    sliders["beta_end"].value, sliders["beta_start"].value = 0.005, 0.009  # the message, not a traceback
    assert "beta_start <= beta_end" in capsys.readouterr().out
