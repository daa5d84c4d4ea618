"""ddpm.ema: the average in closed form, warm-up, update_after_step / update_every, buffers,
swapped_in (also on errors), exact resume through a weights_only checkpoint, wrapped models."""

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ddpm.ema import EMA, unwrap
from ddpm.unet import UNet, UNetConfig


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("stat", torch.zeros(2))  # float buffer: averaged
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # int buffer: copied

    def set(self, value: float):
        with torch.no_grad():
            self.w.fill_(value)
            self.stat.fill_(2 * value)
            self.count.fill_(int(value))


def expected_average(values, decays, start):
    avg = start
    for v, d in zip(values, decays):
        avg = d * avg + (1 - d) * v
    return avg


def test_closed_form_constant_decay():
    model, d = Toy(), 0.9
    model.set(1.0)
    ema = EMA(model, decay=d, warmup=False)
    values = [3.0, -1.0, 0.5, 2.0, 7.0]
    for v in values:
        model.set(v)
        ema.update()
    k = len(values)
    # shadow_k = d^k w_0 + sum_i (1 - d) d^(k-i) w_i
    closed = d**k * 1.0 + sum((1 - d) * d ** (k - i) * v for i, v in enumerate(values, start=1))
    assert torch.allclose(ema.shadow["w"], torch.full((3,), closed))
    assert torch.allclose(ema.shadow["stat"], torch.full((2,), 2 * closed))  # buffers follow
    assert ema.shadow["count"].item() == 7 and ema.shadow["count"].dtype == torch.long
    assert ema.step == ema.num_updates == k


def test_warmup_decay_schedule():
    model = Toy()
    ema = EMA(model, decay=0.5)
    decays = []
    for i in range(20):
        decays.append(ema.current_decay())
        model.set(float(i))
        ema.update()
    # min(decay, (1 + n) / (10 + n)): 0.1, 2/11, 3/12, ... until it reaches decay
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 3 / 12])
    assert max(decays) == 0.5 and decays[-1] == 0.5
    assert torch.allclose(ema.shadow["w"], torch.full((3,), expected_average(range(20), decays, 0.0)))


def test_warmup_w_sets_the_schedule_and_how_far_back_the_average_looks():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=4)
    decays = []
    for i in range(6):
        decays.append(ema.current_decay())
        model.set(float(i))
        ema.update()
    assert decays == pytest.approx([1 / 4, 2 / 5, 3 / 6, 0.5, 0.5, 0.5])  # min(decay, (1 + n) / (4 + n))
    assert torch.allclose(ema.shadow["w"], torch.full((3,), expected_average(range(6), decays, 0.0)))

    # before the cap, the average weights step k by k^(w - 2): with live weight k at step k, the shadow
    # is the mean step, (w - 1)/w of the way through the run
    n = 3000
    for w in (4, 10):
        model = Toy()
        ema = EMA(model, decay=0.999999, warmup=w)
        for k in range(1, n + 1):
            model.set(float(k))
            ema.update()
        assert ema.shadow["w"][0].item() / n == pytest.approx((w - 1) / w, abs=0.005), w


def test_warmup_checkpoints_from_before_the_knob():
    ema = EMA(Toy())
    state = ema.state_dict()
    assert state["warmup"] == 10.0
    for old, value in ((True, 10.0), (False, 0.0)):  # what checkpoints saved before warmup took a number
        state["warmup"] = old
        ema.load_state_dict(state)
        assert ema.warmup == value
    assert ema.current_decay() == ema.decay  # none


def test_update_after_step_and_every():
    model = Toy()
    ema = EMA(model, decay=0.5, update_after_step=3, update_every=2, warmup=False)
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    shadows = []
    for v in values:
        model.set(v)
        ema.update()
        shadows.append(ema.shadow["w"][0].item())
    assert shadows[:3] == [1.0, 2.0, 3.0]  # steps 1..3 copy the live weights
    assert shadows[3] == 3.0  # step 4: (4 - 3) % 2 != 0, skipped
    assert shadows[4] == 0.5 * 3.0 + 0.5 * 5.0  # step 5: averaged
    assert shadows[5] == shadows[4]  # step 6: skipped
    assert shadows[6] == 0.5 * shadows[4] + 0.5 * 7.0
    assert ema.num_updates == 2 and ema.step == 8
    # with warm-up the first averaging update after the copies uses n = 0: decay 0.1
    ema2 = EMA(model, decay=0.999, update_after_step=2)
    for v in (1.0, 2.0, 10.0):
        model.set(v)
        ema2.update()
    assert ema2.shadow["w"][0].item() == pytest.approx(0.1 * 2.0 + 0.9 * 10.0)


def test_swapped_in_restores_live_weights_even_on_error():
    model = Toy()
    model.set(1.0)
    ema = EMA(model, decay=0.5, warmup=False)
    model.set(5.0)
    ema.update()  # shadow 3.0, live 5.0
    param = model.w
    with ema.swapped_in() as m:
        assert m is model and torch.equal(model.w, torch.full((3,), 3.0)) and model.stat[0].item() == 6.0
    assert torch.equal(model.w, torch.full((3,), 5.0)) and model.stat[0].item() == 10.0
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        assert model.w[0].item() == 3.0
        raise RuntimeError("boom")
    assert torch.equal(model.w, torch.full((3,), 5.0)) and model.count.item() == 5
    assert model.w is param  # same Parameter object: the optimizer still holds the right tensors


def test_state_dict_resumes_identically():
    torch.manual_seed(0)
    config = UNetConfig(
        image_size=8,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        groups=4,
        attention_resolutions=(4,),
        head_dim=8,
    )
    model = UNet(config)
    ema = EMA(model, decay=0.99, update_after_step=2, update_every=2)

    def train_step(m, g):  # stands in for an optimizer step
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)

    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        train_step(model, g)
        ema.update()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what checkpoint.load_checkpoint does

    resumed_model = UNet(config)
    resumed_model.load_state_dict(saved["model"])
    resumed = EMA(resumed_model, decay=0.5)  # settings come from the state
    resumed.load_state_dict(saved["ema"])
    assert resumed.decay == 0.99 and resumed.update_every == 2 and resumed.step == 5
    for m, e in ((model, ema), (resumed_model, resumed)):
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            train_step(m, g)
            e.update()
    assert resumed.step == ema.step and resumed.num_updates == ema.num_updates
    for k, v in ema.shadow_state_dict().items():
        assert torch.equal(resumed.shadow[k], v), k

    # the shadow loads into a fresh model, and the average differs from the live weights
    fresh = UNet(config)
    fresh.load_state_dict(ema.shadow_state_dict())
    assert not torch.equal(fresh.in_conv.weight, model.in_conv.weight)

    wrong = EMA(UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1,), groups=4, attention_resolutions=())))
    with pytest.raises(ValueError, match="does not match this model"):
        wrong.load_state_dict(saved["ema"])


def test_wrapped_models_and_bf16_live_weights():
    inner = Toy()

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel (.module)
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (._orig_mod)
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    assert unwrap(Wrapper(Compiled(inner))) is inner
    ema = EMA(Wrapper(inner))
    assert list(ema.shadow_state_dict()) == ["w", "stat", "count"]  # no "module." prefix
    inner.load_state_dict(ema.shadow_state_dict())

    half = Toy().to(torch.bfloat16)
    ema = EMA(half, decay=0.5, warmup=False)
    assert ema.shadow["w"].dtype == torch.float32  # the shadow keeps full precision
    half.set(1.0)
    ema.update()
    assert ema.shadow["w"][0].item() == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay=1.0"):
        EMA(Toy(), decay=1.0)
    with pytest.raises(ValueError, match="update_every"):
        EMA(Toy(), update_every=0)
    for w in (1, 0.5, -2):  # w = 1 would never move the shadow: (1 + n) / (1 + n) = 1
        with pytest.raises(ValueError, match=f"warmup={w} must be 0"):
            EMA(Toy(), warmup=w)


def counted_unet(config):
    """A small UNet laid out as train.py lays it out, plus an integer buffer (copied, not averaged)."""
    model = UNet(config).to(memory_format=torch.channels_last)
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    return model


def test_mps_flat_shadow_equals_the_per_tensor_lerp(monkeypatch):
    # On MPS the float shadow is one flat buffer updated by one lerp (torch has no MPS foreach kernels).
    # Forced here on the CPU: every update, copy, warm-up decay, buffer and resume must equal the foreach path.
    import ddpm.ema as ema_module

    assert ema_module._use_flat({"w": SimpleNamespace(device=torch.device("mps"))}, ["w"])
    assert not ema_module._use_flat({"w": torch.zeros(1)}, ["w"])

    torch.manual_seed(0)
    config = UNetConfig(
        image_size=8,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        groups=4,
        attention_resolutions=(4,),
        head_dim=8,
    )
    model = counted_unet(config)
    plain = EMA(model, decay=0.9, update_after_step=2, update_every=2)
    monkeypatch.setattr(ema_module, "_use_flat", lambda shadow, floats: bool(floats))
    flat = EMA(model, decay=0.9, update_after_step=2, update_every=2)
    assert flat._flat is not None and plain._flat is None
    assert flat._flat.numel() == sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert all(flat.shadow[k].stride() == plain.shadow[k].stride() for k in plain.names)  # layouts kept

    g = torch.Generator().manual_seed(1)
    for step in range(9):
        if step == 6:  # the live layout changes under the EMA: gathered by a copy then, still right
            model.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            model.count += 1
        plain.update()
        flat.update()
        for k in plain.names:
            assert torch.equal(flat.shadow[k], plain.shadow[k]), (step, k)
    assert flat.shadow["count"].item() == 8 and flat.num_updates == plain.num_updates == 3  # updates 4, 6, 8

    resumed = EMA(counted_unet(config), decay=0.5)
    resumed.load_state_dict(flat.state_dict())  # loads into the flat buffer's views
    assert resumed._flat is not None and all(torch.equal(resumed.shadow[k], plain.shadow[k]) for k in plain.names)
    fresh = counted_unet(config)
    fresh.load_state_dict(resumed.shadow_state_dict())
    with flat.swapped_in():
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    half = Toy().to(torch.bfloat16)  # bf16 live weights: gathered, then cast to the fp32 shadow in one op
    flat_half = EMA(half, decay=0.5, warmup=False)
    monkeypatch.undo()
    plain_half = EMA(half, decay=0.5, warmup=False)
    half.set(1.5)
    flat_half.update()
    plain_half.update()
    assert flat_half._flat is not None and flat_half._flat.dtype == torch.float32
    assert all(torch.equal(flat_half.shadow[k], plain_half.shadow[k]) for k in plain_half.names)
