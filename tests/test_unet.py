"""ddpm.unet: embedding closed form, presets and configs, zero-init, conditioning, attention placement,
checkpointing, bf16/fp16 and channels_last, the two norm paths and their choice by device (the fused
GroupNorm node itself: tests/test_ops.py)."""

import dataclasses
import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import ddpm.unet as unet_module
from ddpm import ops
from ddpm.unet import (
    Attention,
    UNet,
    UNetConfig,
    preferred_memory_format,
    set_norm_path,
    timestep_embedding,
    unet_preset,
)

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
    assert torch.allclose(timestep_embedding(t, 8, max_period=16)[2, 1], torch.tensor(math.cos(10 * 16**-0.25)))


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
    c = UNetConfig(
        image_size=32,
        base_channels=16,
        channel_mults=(1, 2, 2),
        num_res_blocks=2,
        groups=4,
        head_dim=16,
        attention_resolutions=(16,),
    )
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


def test_patch_size_runs_the_first_level_at_a_fraction_of_the_image():
    c = UNetConfig(**{**TINY, "image_size": 16, "attention_resolutions": (4,), "patch_size": 2})
    assert c.resolutions == (8, 4)
    model = perturbed(UNet(c))
    first_level = []
    model.in_conv.register_forward_hook(lambda m, i, o: first_level.append(tuple(o.shape[1:])))
    x, t = batch(c)
    with torch.no_grad():
        ref = model(x, t)
        assert ref.shape == x.shape and first_level == [(16, 8, 8)]
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
        assert torch.allclose(cl, ref, atol=1e-5)
        # the output conv's channel 4c + 2i + j is colour c at offset (i, j) of every 2 x 2 patch
        model.out_conv.weight.zero_()
        model.out_conv.bias.zero_()
        model.out_conv.bias[4 * 2 + 2 * 1 + 0] = 1.0
        out = model(x, t)
    want = torch.zeros_like(x)
    want[:, 2, 1::2, 0::2] = 1.0
    assert torch.equal(out, want)
    # a checkpoint written before patch_size existed loads as patch_size 1
    old = {k: v for k, v in tiny().to_dict().items() if k != "patch_size"}
    assert UNetConfig.from_dict(old).patch_size == 1
    with pytest.raises(ValueError, match="patch_size=3 must be a positive divisor of image_size=16"):
        tiny(patch_size=3)
    with pytest.raises(ValueError, match="divisible by patch_size=4 x 2"):
        UNetConfig(image_size=16, channel_mults=(1, 2, 2, 2), patch_size=4)


# --- the norm paths: fused (CPU) and plain (CUDA, MPS) -----------------------------------------


def norm_flags(model: UNet) -> list[bool]:
    return [m.fused_norm for m in model.modules() if isinstance(m, (unet_module.ResBlock, Attention, UNet))]


@pytest.mark.parametrize(
    "device,fused,memory_format",
    [
        (torch.device("cpu"), True, torch.channels_last),
        (torch.device("cuda", 0), False, torch.channels_last),
        (torch.device("mps"), False, torch.contiguous_format),
        ("mps", False, torch.contiguous_format),  # a device's name works too
    ],
    ids=["cpu", "cuda", "mps", "mps-name"],
)
def test_norm_path_and_layout_by_device(device, fused, memory_format):
    model = UNet(tiny(), fused_norm=not fused)
    assert set_norm_path(model, device) is model  # chooses without moving the model: no such device needed
    flags = norm_flags(model)
    assert len(flags) > 3 and flags == [fused] * len(flags)
    assert preferred_memory_format(device) == memory_format
    assert all(norm_flags(UNet(tiny())))  # the default: the CPU's path, as before the choice existed


def test_norm_paths_share_state_dicts():
    fused, plain = UNet(tiny(num_classes=3)), UNet(tiny(num_classes=3), fused_norm=False)
    a, b = fused.state_dict(), plain.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    plain.load_state_dict(perturbed(fused).state_dict())  # strict: a checkpoint loads into either path
    assert all(torch.equal(p, q) for p, q in zip(fused.parameters(), plain.parameters()))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_norm_paths_same_outputs_and_gradients(memory_format):
    # fp32: the two paths differ only in the order of their reductions, measured 1.3e-6 of the output's
    # largest value and 2.6e-6 of each gradient's; the tolerance, 2e-5 of the largest value, is 8x that
    c = tiny(image_size=16, num_classes=3)
    fused = perturbed(UNet(c)).to(memory_format=memory_format)
    plain = UNet(c, fused_norm=False).to(memory_format=memory_format)
    plain.load_state_dict(fused.state_dict())
    x, t = batch(c)
    x, y = x.contiguous(memory_format=memory_format), torch.tensor([0, 3])
    outs, grads = [], []
    for model in (fused, plain):
        with (
            mock.patch.object(ops.GroupNormAct, "apply", wraps=ops.GroupNormAct.apply) as node,
            mock.patch.object(ops.GroupNormActConv, "apply", wraps=ops.GroupNormActConv.apply) as conv_node,
        ):
            out = model(x, t, y)
        assert (node.call_count + conv_node.call_count > 0) == (model is fused)  # the path is the one asked for
        assert out.is_contiguous(memory_format=memory_format)
        out.square().mean().backward()
        outs.append(out)
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert (outs[0] - outs[1]).abs().max() <= 2e-5 * outs[0].abs().max()
    for k, g in grads[0].items():
        assert (g - grads[1][k]).abs().max() <= 2e-5 * g.abs().max(), k
    assert any(g.abs().max() > 0 for g in grads[1].values())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_fp16_autocast_close_to_fp32(fused):
    c = tiny(image_size=16)
    model = perturbed(UNet(c, fused_norm=fused), std=0.1)
    x, t = batch(c)
    with torch.no_grad():
        ref = model(x, t)
        with (
            torch.autocast("cpu", dtype=torch.float16),
            mock.patch.object(torch, "softmax", wraps=torch.softmax) as softmax,
        ):
            out = model(x, t)
    # the attention's softmax runs in fp32 (here the CPU's matmul form; elsewhere SDPA's kernels do it inside)
    layers = sum(isinstance(m, Attention) for m in model.modules())
    assert softmax.call_count == layers > 0
    assert all(call.kwargs["dtype"] == torch.float32 for call in softmax.call_args_list)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.01  # measured 0.0015 (bf16: 0.012)
