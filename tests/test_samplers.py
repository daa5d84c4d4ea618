"""Sampler correctness on the closed-form optimal denoiser of Gaussian data, where the answer is known."""

import pytest
import torch
from torch import nn

from ddpm.diffusion import PREDICTION_TYPES
from ddpm.oracle import GaussianDenoiser, gaussian_errors
from ddpm.samplers import METHODS, default_sampler, sample, set_timesteps
from ddpm.schedules import SCHEDULES, make_schedule

SHAPE = (1, 4, 4)
MEAN = torch.linspace(-0.5, 0.5, 16).reshape(SHAPE)
STD = torch.linspace(0.1, 0.6, 16).reshape(SHAPE)


def draw(model, schedule, n, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    kwargs.setdefault("clip_denoised", False)
    return sample(model, schedule, (n, *SHAPE), generator=g, progress=False, **kwargs)


@pytest.mark.parametrize(
    "method, steps, tol",
    [
        ("ddpm", None, 0.02),  # ancestral over all 1000 steps: only Monte Carlo error is left
        ("ddim", 50, 0.04),
        ("dpmpp_2m", 20, 0.02),
        ("dpmpp_2m", 10, 0.025),
        ("dpmpp_2m_sde", 20, 0.025),
        ("dpmpp_2m_sde", 10, 0.025),
    ],
)
def test_samplers_reproduce_the_data_distribution(method, steps, tol):
    s = make_schedule("linear")
    n = 3000 if method == "ddpm" else 20000
    x = draw(GaussianDenoiser(s, MEAN, STD), s, n, method=method, steps=steps)
    err = gaussian_errors(x, MEAN, STD)
    # per-element tolerances: the Monte Carlo error of a mean over n samples is ~std/sqrt(n) <= 0.011
    assert err["mean_err"] < 0.015, err
    assert err["w2"] < tol, err


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_needs_fewer_steps_than_ddim(schedule, solver):
    s = make_schedule(schedule)
    errs = {}
    for method, steps in [("ddim", 20), ("ddim", 50), (solver, 10), (solver, 20)]:
        errs[method, steps] = gaussian_errors(
            draw(GaussianDenoiser(s, MEAN, STD), s, 20000, method=method, steps=steps), MEAN, STD
        )["w2"]
    assert errs[solver, 20] < errs["ddim", 50], errs
    assert errs[solver, 10] < errs["ddim", 20], errs


class ConstantX0(nn.Module):
    """Predicts the same x0 at every step: DPM-Solver++'s second-order term (x0_t - x0_prev) is then zero."""

    def forward(self, x, t):
        return torch.full_like(x, 0.3)


@pytest.mark.parametrize("steps", [2, 7, 30])
def test_sde_dpm_solver_without_its_second_order_term_is_ddpm(steps):
    # The SDE step with D = x0 is DDPM's posterior q(x_prev | x_t, x0): same timesteps and noise draws give
    # the same x_t at every step (the final x0 is the constant itself for any sampler, so compare the paths).
    s = make_schedule("cosine", timesteps=100)

    def path(method):
        xs = []
        draw(
            ConstantX0(),
            s,
            64,
            seed=4,
            method=method,
            steps=steps,
            spacing="trailing",
            prediction_type="sample",
            callback=lambda i, t, x, x0: xs.append(x.clone()),
        )
        return torch.stack(xs)

    sde, ode = path("dpmpp_2m_sde"), path("dpmpp_2m")
    assert torch.allclose(sde, path("ddpm"), atol=1e-5), (sde - path("ddpm")).abs().max()
    # ... and the ODE solver is then DDIM with eta = 0, as DPM-Solver++(1) is
    assert torch.allclose(ode, path("ddim"), atol=1e-5), (ode - path("ddim")).abs().max()
    assert not torch.allclose(sde[1:], ode[1:], atol=1e-2)  # the SDE really adds noise


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta_one_on_all_steps_is_ddpm_with_posterior_variance(schedule):
    s = make_schedule(schedule, timesteps=200)
    oracle = GaussianDenoiser(s, MEAN, STD)
    a = draw(oracle, s, 256, method="ddpm", variance="posterior")
    b = draw(oracle, s, 256, method="ddim", steps=200, eta=1.0)
    assert torch.allclose(a, b, atol=2e-4), (a - b).abs().max()


def test_ddim_eta_zero_is_deterministic_given_x_T():
    s = make_schedule("linear")
    oracle = GaussianDenoiser(s, MEAN, STD)
    g = torch.Generator().manual_seed(3)
    x = sample(oracle, s, (64, *SHAPE), method="ddim", steps=20, generator=g, progress=False)
    # only x_T was drawn: the generator is exactly where drawing x_T alone leaves it
    g2 = torch.Generator().manual_seed(3)
    torch.randn((64, *SHAPE), generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())
    assert torch.equal(x, draw(oracle, s, 64, seed=3, method="ddim", steps=20, clip_denoised=True))


@pytest.mark.parametrize("method", METHODS)
def test_a_given_x_T_replaces_the_first_draw(method):
    # x_T given: the generator's draws go to the steps, so sample(x_T = the seed's first draw, generator in the
    # state that draw leaves) is sample(seed), for every method (ddim and dpmpp_2m: deterministic given x_T)
    s = make_schedule("linear")
    oracle = GaussianDenoiser(s, MEAN, STD)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn((8, *SHAPE), generator=g)
    given = sample(oracle, s, (8, *SHAPE), method=method, steps=10, generator=g, x_T=x_T, progress=False)
    assert torch.equal(given, draw(oracle, s, 8, seed=5, method=method, steps=10, clip_denoised=True))
    with pytest.raises(ValueError, match=r"x_T has shape \(8, 1, 4, 4\) but shape asks for \(4, 1, 4, 4\)"):
        sample(oracle, s, (4, *SHAPE), method=method, steps=10, x_T=x_T, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_prediction_types_give_the_same_samples(method):
    s = make_schedule("cosine", timesteps=100)
    outs = [
        draw(
            GaussianDenoiser(s, MEAN, STD, prediction_type=p),
            s,
            128,
            method=method,
            steps=10 if method != "ddpm" else None,
            prediction_type=p,
        )
        for p in ("epsilon", "sample", "v_prediction")
    ]
    assert torch.allclose(outs[0], outs[1], atol=1e-3) and torch.allclose(outs[0], outs[2], atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_images_and_callback_sees_each_step(method):
    s = make_schedule("linear", timesteps=50)
    oracle = GaussianDenoiser(s, MEAN, STD)
    seen = []
    a = draw(
        oracle,
        s,
        8,
        seed=1,
        method=method,
        steps=None if method == "ddpm" else 10,
        callback=lambda i, t, x, x0: seen.append((i, t, x.shape, float(x0.abs().max()))),
        clip_denoised=True,
    )
    b = draw(oracle, s, 8, seed=1, method=method, steps=None if method == "ddpm" else 10, clip_denoised=True)
    assert torch.equal(a, b)
    assert not torch.equal(
        a, draw(oracle, s, 8, seed=2, method=method, clip_denoised=True, steps=None if method == "ddpm" else 10)
    )
    assert [i for i, *_ in seen] == list(range(50 if method == "ddpm" else 10))
    assert seen[0][1] == 49 and all(m <= 1 for *_, m in seen)
    assert a.abs().max() <= 1


class TinyConditional(nn.Module):
    """output = x * w + embedding(y): linear, so guidance has a closed form."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.null_class = num_classes
        self.emb = nn.Embedding(num_classes + 1, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t, y):
        return self.drop(x) * 0.3 + self.emb(y).view(-1, 1, 1, 1)


def test_guidance_scale_one_is_the_conditional_model_and_w_extrapolates():
    torch.manual_seed(0)
    model = TinyConditional()
    s = make_schedule("linear", timesteps=20)
    y = torch.tensor([0, 1, 2, 1])
    plain = draw(model, s, 4, method="ddim", steps=5, y=y)
    guided_1 = draw(model, s, 4, method="ddim", steps=5, y=y, guidance_scale=1.0)
    assert torch.equal(plain, guided_1)
    assert model.training  # the sampler switched dropout off for the call and restored the mode

    class Manual(nn.Module):  # the formula out = u + w (c - u) written out
        null_class = None

        def forward(self, x, t, y):
            u = model(x, t, torch.full_like(y, model.null_class))
            return u + 3.0 * (model(x, t, y) - u)

    model.eval()
    assert torch.allclose(
        draw(model, s, 4, method="ddim", steps=5, y=y, guidance_scale=3.0),
        draw(Manual(), s, 4, method="ddim", steps=5, y=y),
        atol=1e-6,
    )


def test_respaced_ddpm_and_beta_variance():
    s = make_schedule("linear", timesteps=100)
    oracle = GaussianDenoiser(s, MEAN, STD)
    full = draw(oracle, s, 16, method="ddpm")
    assert torch.equal(full, draw(oracle, s, 16, method="ddpm", steps=100))
    beta = draw(oracle, s, 16, method="ddpm", variance="beta")
    assert not torch.allclose(full, beta)


def test_default_steps_never_exceed_the_schedule():
    s = make_schedule("cosine", timesteps=12)  # fewer than DDIM's 50 and DPM-Solver++'s 20 default steps
    seen = []
    for method in ("ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        draw(GaussianDenoiser(s, MEAN, STD), s, 2, method=method, callback=lambda i, t, x, x0: seen.append(t))
    assert len(seen) == 3 * 12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "euler"}, "valid: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde"),
        ({"method": "ddim", "steps": 0}, r"\[1, 1000\]"),
        ({"method": "ddim", "steps": 1001}, r"\[1, 1000\]"),
        ({"method": "ddpm", "eta": 0.5}, "applies to method='ddim' only"),
        ({"method": "ddim", "guidance_scale": 2.0}, "needs class labels"),
        ({"method": "ddim", "spacing": "quadratic"}, "valid: trailing"),
        ({"method": "ddpm", "variance": "learned"}, "valid: posterior, beta"),
        ({"method": "ddim", "prediction_type": "score"}, "valid: epsilon"),
    ],
)
def test_bad_arguments(kwargs, match):
    s = make_schedule("linear")
    with pytest.raises(ValueError, match=match):
        draw(GaussianDenoiser(s, MEAN, STD), s, 2, **kwargs)


def test_guidance_needs_a_null_class():
    s = make_schedule("linear")
    with pytest.raises(ValueError, match="null class"):
        draw(lambda x, t, y: x, s, 2, method="ddim", y=torch.zeros(2, dtype=torch.long), guidance_scale=2.0)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "logsnr"])
@pytest.mark.parametrize("steps", [1, 7, 50, 999, 1000])
def test_spacings_give_distinct_descending_training_timesteps(spacing, steps):
    ts = set_timesteps(make_schedule("cosine"), steps, spacing=spacing)
    assert len(ts) == steps and len(set(ts.tolist())) == steps
    assert (ts.diff() < 0).all() and ts.min() >= 0 and ts.max() <= 999
    if spacing in ("trailing", "linspace", "logsnr"):
        assert ts[0] == 999


def test_default_sampler_by_prediction_type_and_schedule():
    # eps needs the stochastic solver (deterministic paths keep its high-noise x0 error) on every schedule;
    # v samples best with DDIM on cosine and linear, with the SDE solver on offset-cosine
    for schedule in SCHEDULES:
        assert default_sampler("epsilon", schedule) == ("dpmpp_2m_sde", 20), schedule
        assert all(default_sampler(p, schedule)[0] in METHODS for p in PREDICTION_TYPES)
    assert default_sampler("v_prediction", "cosine") == default_sampler("v_prediction", "linear") == ("ddim", 20)
    assert default_sampler("v_prediction", "offset_cosine") == ("dpmpp_2m_sde", 20)
    with pytest.raises(ValueError, match="prediction_type"):
        default_sampler("score", "cosine")
    with pytest.raises(ValueError, match="schedule 'quad'"):
        default_sampler("v_prediction", "quad")


class PerStepNoise:
    """The reference for samplers._Noise: what sample() did before drawing ahead, one randn of the batch's
    shape on the CPU each time a step asks, copied to the device then."""

    def __init__(self, shape, count, *, generator, device):
        self.shape, self.generator, self.device = tuple(shape), generator, device

    def __call__(self):
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32).to(self.device)


@pytest.mark.parametrize("window_bytes", [None, 1900])  # all steps at once; two or three steps at a time
@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("ddpm", {"variance": "posterior"}),
        ("ddpm", {"variance": "beta", "steps": 13}),
        ("ddim", {"eta": 0.5, "steps": 10}),
        ("ddim", {"eta": 1.0, "steps": 17}),
        ("ddim", {"eta": 0.0, "steps": 10}),
        ("dpmpp_2m_sde", {"steps": 20}),
        ("dpmpp_2m", {"steps": 10}),
    ],
)
def test_noise_drawn_ahead_gives_the_images_of_per_step_draws(monkeypatch, method, kwargs, window_bytes):
    # A seed must give the same images bit for bit whether the noise is drawn ahead or as each step asks:
    # same numbers, same order, and the generator left where the per-step draws leave it (so the next
    # chunk of ddpm.sample.generate, drawn from the same generator, is unchanged too). 75 numbers per image:
    # not a multiple of 16, where one randn over all steps would give other numbers.
    from ddpm import samplers

    s = make_schedule("cosine", timesteps=60)
    mean, std = torch.linspace(-0.5, 0.5, 75).reshape(3, 5, 5), torch.linspace(0.1, 0.6, 75).reshape(3, 5, 5)
    oracle = GaussianDenoiser(s, mean, std)

    def two_chunks():
        g = torch.Generator().manual_seed(11)
        chunks = [sample(oracle, s, (n, 3, 5, 5), method=method, generator=g, progress=False, **kwargs) for n in (3, 2)]
        return chunks, g.get_state()

    if window_bytes is not None:
        monkeypatch.setattr(samplers, "NOISE_WINDOW_BYTES", window_bytes)
    (a, b), state = two_chunks()
    monkeypatch.setattr(samplers, "_Noise", PerStepNoise)
    (ref_a, ref_b), ref_state = two_chunks()
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b) and torch.equal(state, ref_state)


def test_noise_for_a_gpu_is_drawn_into_pinned_memory_and_copied_per_step(monkeypatch):
    from ddpm import samplers

    pinned, copies, empty = [], [], torch.empty

    def fake_empty(*args, pin_memory=False, **kwargs):  # pinning needs a CUDA driver: record it instead
        pinned.append(pin_memory)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(samplers, "to_device", lambda t, device: copies.append(device) or t.clone())
    monkeypatch.setattr(samplers, "NOISE_WINDOW_BYTES", 3 * 4 * 10)  # 3 draws of 10 numbers per window
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = samplers._Noise((2, 5), 7, generator=g, device=torch.device("cuda"))
    drawn = [noise() for _ in range(7)]
    assert pinned == [True, True, True] and copies == [torch.device("cuda")] * 7  # windows of 3, 3, 1
    assert all(torch.equal(x, torch.randn((2, 5), generator=ref)) for x in drawn)
    with pytest.raises(RuntimeError, match="more noise than"):
        noise()
    pinned.clear()
    for device in ("cpu", "mps"):  # nothing to overlap with on the CPU; MPS copies blocking from pageable memory
        samplers._Noise((2, 5), 1, generator=None, device=torch.device(device))()
    assert pinned == [False, False]
