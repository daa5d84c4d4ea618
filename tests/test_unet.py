"""ddpm.unet: embedding closed form, the fused GroupNorm against PyTorch's, presets and configs,
zero-init, conditioning, attention placement, checkpointing, bf16 and channels_last."""

import dataclasses
import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ddpm.device import saved_tensor_bytes
from ddpm.unet import Attention, UNet, UNetConfig, group_norm, timestep_embedding, unet_preset
import ddpm.unet as unet_module

# Small enough for milliseconds per forward; same code path as the presets.
TINY = {"base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1, "groups": 4, "head_dim": 16}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second OpenMP thread only adds synchronisation, and when other jobs share the
    # CPU its spin-waits make these tests several times slower. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(image_size=16, **kw) -> UNetConfig:
    return UNetConfig(**{"image_size": image_size, "attention_resolutions": (image_size // 2,), **TINY, **kw})


def perturbed(model: UNet, seed: int = 0, std: float = 0.05) -> UNet:
    """Random weights everywhere, including the zero-initialised layers, so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(config: UNetConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return x, t


# --- timestep embedding -----------------------------------------------------------------------


def test_embedding_matches_closed_form():
    t = torch.tensor([0, 1, 10, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    for row, tv in zip(emb, t.tolist()):
        freqs = [10000 ** (-i / 4) for i in range(4)]
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        assert torch.allclose(row, torch.tensor(expected), atol=1e-4)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # t = 0
    # max_period changes the frequencies: f_1 = max_period ** -1/4
    assert torch.allclose(timestep_embedding(t, 8, max_period=16)[2, 1], torch.tensor(math.cos(10 * 16 ** -0.25)))


def test_embedding_rows_distinct_and_odd_dim():
    emb = timestep_embedding(torch.arange(1000), 64)
    d = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert d.min() > 1e-2  # every timestep gets its own code
    odd = timestep_embedding(torch.arange(5), 7)
    assert odd.shape == (5, 7)
    assert torch.equal(odd[:, 6], torch.zeros(5))
    assert torch.allclose(odd[:, :6], timestep_embedding(torch.arange(5), 6))
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 2), 8)


# --- the fused GroupNorm ----------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act,scale_shift,conv", [(True, True, None), (True, False, None), (False, False, None),
                                                  (True, True, "bias"), (True, False, "bias"), (True, True, "no bias")])
def test_group_norm_equals_unfused_ops(channels_last, act, scale_shift, conv):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12).double()
    conv = torch.nn.Conv2d(12, 8, 3, padding=1, bias=conv == "bias").double() if conv else None
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 12, 5, 5, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ss = [torch.randn(3, 12, dtype=torch.float64, requires_grad=True) for _ in range(2)] if scale_shift else []
    inputs = [x, norm.weight, norm.bias, *ss, *(conv.parameters() if conv else [])]

    h = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    if ss:
        h = h * (1 + ss[0][:, :, None, None]) + ss[1][:, :, None, None]
    h = F.silu(h) if act else h
    ref = conv(h) if conv else h
    out = group_norm(x, norm, scale=ss[0] if ss else None, shift=ss[1] if ss else None, act=act, conv=conv)
    assert torch.allclose(out, ref, atol=1e-12)
    go = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, inputs, go), torch.autograd.grad(out, inputs, go)):
        assert torch.allclose(a, b, atol=1e-10)


def test_group_norm_gradcheck():
    norm = torch.nn.GroupNorm(2, 4).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fused = lambda x, w, b, s, sh: group_norm(x, norm, scale=s, shift=sh, act=True)
    assert torch.autograd.gradcheck(fused, (x, norm.weight, norm.bias, scale, shift))


def test_group_norm_bf16_close_to_fp32():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32)
    x = (torch.randn(2, 32, 8, 8) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    s = torch.randn(2, 32) * 0.1
    ref = group_norm(x, norm, scale=s, shift=s, act=True)
    out = group_norm(x.bfloat16(), norm, scale=s.bfloat16(), shift=s.bfloat16(), act=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - ref).abs().max() < 0.03


def test_group_norm_conv_gradcheck():
    norm = torch.nn.GroupNorm(2, 4).double()
    conv = torch.nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fused = lambda x, w, b, s, sh, cw, cb: group_norm(x, norm, scale=s, shift=sh, act=True, conv=conv)
    assert torch.autograd.gradcheck(fused, (x, norm.weight, norm.bias, scale, shift, conv.weight, conv.bias))


def test_group_norm_conv_saves_one_activation_and_autocasts_like_conv2d():
    torch.manual_seed(0)
    norm, conv = torch.nn.GroupNorm(8, 32), torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(4, 32, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    one = x.numel() * 2  # one bf16 activation of x's size
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16()
        unfused = saved_tensor_bytes(lambda: conv(group_norm(xb, norm, act=True)))
        fused = saved_tensor_bytes(lambda: group_norm(xb, norm, act=True, conv=conv))
        out = group_norm(xb, norm, act=True, conv=conv)
        ref = conv(group_norm(xb, norm, act=True))
    assert one * 2 <= unfused < one * 2.5 and one <= fused < one * 1.5, (unfused, fused, one)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    out.float().square().mean().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# --- configs and presets ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["simple", "attention"])
def test_presets(size, variant):
    c = unet_preset(size, variant)
    assert c.image_size == size and c.num_res_blocks == 2
    if variant == "simple":
        assert c.attention_resolutions == () and not c.mid_attention
    else:
        assert c.attention_resolutions == (16,) and c.mid_attention
    assert all(ch % 32 == 0 for ch in c.level_channels)  # widths that vectorise well
    assert unet_preset(size, variant, num_classes=102).num_classes == 102
    # any field can be overridden, image_size too (a 32 px architecture trained at 64 px)
    assert unet_preset(32, variant, image_size=64).image_size == 64


def test_preset_errors_name_valid_values():
    with pytest.raises(ValueError, match=r"image_size=48.*\(32, 64, 128\)"):
        unet_preset(48)
    with pytest.raises(ValueError, match=r"'fancy'.*simple.*attention"):
        unet_preset(32, "fancy")
    with pytest.raises(ValueError, match="unknown UNetConfig overrides.*'widht'"):
        unet_preset(32, widht=3)
    with pytest.raises(ValueError, match=r"\[12\] are not feature-map sizes.*\(32, 16, 8\)"):
        unet_preset(32, attention_resolutions=(12,))
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(image_size=32, base_channels=40, groups=32)
    with pytest.raises(ValueError, match="divisible by 2"):
        UNetConfig(image_size=36, channel_mults=(1, 2, 2, 2))


def test_config_json_round_trip():
    c = unet_preset(64, num_classes=10, gradient_checkpointing=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert isinstance(d["channel_mults"], list)  # JSON has no tuples...
    back = UNetConfig.from_dict(d)
    assert back == c and isinstance(back.channel_mults, tuple) and isinstance(back.attention_resolutions, tuple)
    assert UNetConfig.from_dict(json.loads(c.to_json())) == c
    assert dataclasses.asdict(back) == c.to_dict()
    with pytest.raises(ValueError, match="unknown UNetConfig keys.*'bogus'"):
        UNetConfig.from_dict({**c.to_dict(), "bogus": 1})


# --- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["simple", "attention"])
def test_preset_structure_output_shape(size, variant):
    # the preset's levels and attention, at small widths for speed
    c = unet_preset(size, variant, base_channels=16, groups=4, head_dim=16, num_res_blocks=1)
    model = UNet(c)
    x, t = batch(c, b=1)
    with torch.no_grad():
        out = perturbed(model)(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_real_preset_forward_batch_1():
    c = unet_preset(32)
    model = UNet(c)
    n_params = sum(p.numel() for p in model.parameters())
    assert 3e6 < n_params < 5e6  # the size the preset table documents
    x, t = batch(c, b=1)
    with torch.no_grad():
        assert model(x, t).shape == (1, 3, 32, 32)


def test_zero_init_output_is_zero():
    c = tiny()
    x, t = batch(c, b=3)
    out = UNet(c)(x, t)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()  # and the output conv still learns from step one


def test_conditional_needs_labels_and_uses_them():
    c = tiny(num_classes=5)
    model = perturbed(UNet(c))
    assert model.null_class == 5 and model.class_emb.num_embeddings == 6
    assert UNet(tiny()).null_class is None
    x, t = batch(c)
    with pytest.raises(ValueError, match="class-conditional.*null_class"):
        model(x, t)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(x, t, torch.tensor([1]))
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([3, 3]))
        null = model(x, t, torch.tensor([model.null_class] * 2))
    assert (a - b).abs().max() > 1e-4 and (a - null).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unconditional"):
        UNet(tiny())(x, t, torch.tensor([0, 0]))


def test_t_shapes():
    c = tiny()
    model = perturbed(UNet(c))
    x, _ = batch(c)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])))
        with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
            model(x, torch.tensor([1, 2, 3]))
        # different t, different output
        assert (model(x, torch.tensor([1, 1])) - model(x, torch.tensor([900, 900]))).abs().max() > 1e-4


def test_attention_at_configured_resolutions():
    sizes = []
    c = UNetConfig(image_size=32, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=2, groups=4,
                   head_dim=16, attention_resolutions=(16,))
    model = UNet(c)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    # 2 on the way down, 3 on the way up (num_res_blocks + 1), 1 in the middle
    assert len(attn) == 2 + 3 + 1
    for m in attn:
        m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
    with mock.patch.object(unet_module, "attention", wraps=unet_module.attention) as spy, torch.no_grad():
        model(*batch(c))
    assert sorted(sizes) == [8] + [16] * 5 and spy.call_count == 6
    assert model.mid[0].attn.heads == 2  # 32 channels / head_dim 16
    simple = UNet(dataclasses.replace(c, attention_resolutions=(), mid_attention=False))
    assert not any(isinstance(m, Attention) for m in simple.modules())


@pytest.mark.parametrize("tokens", [64, 256])
def test_matmul_attention_matches_sdpa(tokens):
    # on CPU, short sequences skip the SDPA kernel (faster there): the same values and gradients
    torch.manual_seed(0)
    qkv = torch.randn(3, 2, 2, tokens, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 2, tokens, 16, dtype=torch.float64)
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as spy:
        out = unet_module.attention(*qkv)
    assert spy.call_count == 0
    (grad,) = torch.autograd.grad(out, qkv, g)
    ref = F.scaled_dot_product_attention(*qkv)
    (ref_grad,) = torch.autograd.grad(ref, qkv, g)
    assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(grad, ref_grad, atol=1e-10)
    # in bf16 (under autocast in the UNet) the softmax runs in fp32 and the result stays bf16
    low = unet_module.attention(*qkv.detach().bfloat16())
    assert low.dtype == torch.bfloat16 and (low.double() - ref).abs().max() < 0.05


def test_long_sequences_use_sdpa():
    # the (heads, N, N) probabilities of the matmul form would be large: SDPA's kernel never stores them
    n = unet_module.MATMUL_ATTENTION_MAX_TOKENS + 1
    q = torch.randn(1, 1, n, 8)
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as spy:
        out = unet_module.attention(q, q, q)
    assert spy.call_count == 1 and out.shape == q.shape


def test_gradient_checkpointing_same_gradients():
    c = tiny(image_size=16, num_classes=3)
    plain = perturbed(UNet(c))
    ckpt = UNet(dataclasses.replace(c, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = batch(c)
    y = torch.tensor([0, 3])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        with mock.patch("ddpm.unet.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as spy:
            (model(x, t, y) ** 2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert spy.call_count == (0 if model is plain else len(model.down) - 1 + 2 + len(model.up) - 1)
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7), k
    assert any(g.abs().max() > 0 for g in grads[1].values())


def test_bf16_autocast_close_to_fp32():
    c = tiny(image_size=16)
    model = perturbed(UNet(c), std=0.1)
    x, t = batch(c)
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.float32  # the output conv runs in fp32
    assert (out - ref).norm() / ref.norm() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_same_result():
    c = tiny(image_size=16)
    model = perturbed(UNet(c))
    x, t = batch(c)
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = model(inp, t)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(out, ref, atol=1e-5)
    model(x.contiguous(memory_format=torch.channels_last), t).sum().backward()
