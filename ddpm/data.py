"""Training data: Oxford Flowers102 or any folder of images, decoded once into a uint8 cache.

    dataset = load_dataset("flowers102", "data", image_size=64)      # ImageDataset, uint8 (N, 3, 64, 64)
    stream = BatchStream(dataset, batch_size=128, seed=0, device="cuda")
    x, y = next(stream)                                               # x float32 in [-1, 1], y int64

Decoding JPEGs is the slow part of a data pipeline, and a 64 px dataset of 8,189 images is only
100 MB, so we decode, centre-crop and resize every image exactly once (in a thread pool), keep the
result as one uint8 tensor in memory and on disk (under cache_root(): data/cache in a checkout), and do
the per-step work (gather, flip, scale to [-1, 1]) on whole batches on the training device. That
leaves nothing for DataLoader workers to do, and makes every batch a pure function of (seed, step):
resuming at step k replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .checkpoint import UsageError, save_checkpoint
from .device import to_device

log = logging.getLogger(__name__)

SOURCES = ("flowers102", "folder")
SPLITS = ("all", "train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # matched case-insensitively

# Oxford Flowers102, laid out as torchvision.datasets.Flowers102 expects: ROOT/flowers-102/{jpg/, *.mat}
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS_FILES = ("102flowers.tgz", "imagelabels.mat", "setid.mat")
FLOWERS_SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # names inside setid.mat
FLOWERS_NUM_CLASSES = 102

PACKAGE_DIR = Path(__file__).resolve().parent  # ddpm/: in a checkout, or in site-packages when installed
CACHE_FORMAT = 2  # bump when preprocessing or the payload changes: old cache files then no longer match their key
MAX_NAMED = 10  # how many file names a warning lists before it says "and N more"


class DataNotFoundError(UsageError, FileNotFoundError):
    """No data where it was asked for: a missing folder, no images in it, Flowers102 absent and not downloadable."""


class DataError(UsageError, ValueError):
    """Data that is there but cannot be used as asked: unreadable files, a bad argument, too few images."""


# -----------------------------------------------------------------------------
# The dataset


class ImageDataset(Dataset):
    """Images preprocessed to uint8 (N, 3, S, S), with optional int64 class labels (N,).

    __getitem__ returns (float32 (3, S, S) in [-1, 1], randomly flipped left-right; label or -1), for
    use with a torch DataLoader. Training should prefer BatchStream, which does the same per batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        num_classes: int | None = None,
        source_info: dict | None = None,
        files: list[str] | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and (labels.shape != (len(images),) or labels.dtype != torch.int64):
            raise ValueError(f"labels must be int64 ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.source_info = dict(source_info or {})
        self.files = files  # names of the source files, relative to the root, in image order

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_unit_range(self.images[index])
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index]) if self.labels is not None else -1

    def __repr__(self) -> str:
        n, _, s, _ = self.images.shape
        source = self.source_info.get("source")
        return f"ImageDataset({n} images, {s}x{s}, num_classes={self.num_classes}, source={source!r})"


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; exact at both ends (0 -> -1.0, 255 -> 1.0)."""
    return images.float().div_(127.5).sub_(1.0)


def load_dataset(
    source: str = "flowers102",
    root: str | Path | None = None,
    *,
    image_size: int,
    split: str = "all",
    cache_dir: str | Path | None = None,
    download: bool = True,
    num_workers: int | None = None,
) -> ImageDataset:
    """Load `source` under `root` as an ImageDataset of centre-cropped, resized uint8 images.

    source: "flowers102" (root holds flowers-102/, as for torchvision; downloaded there if missing and
        download=True; split "all" = train + val + test = 8,189 images, or one of "train", "val", "test";
        labels 0..101) or "folder" (every .jpg/.jpeg/.png/.webp under root, recursively; no labels).
    root: defaults to $DATA_ROOT, else "data".
    cache_dir: where the decoded uint8 tensor is kept (default: cache_root()). The cache file's
        name holds a hash of the source, root, split, image_size and every file's name, size and mtime,
        so any change to the files makes a new one.
    num_workers: decoding threads (default: one per CPU core).
    """
    _check_args(source, split, image_size)
    root = Path(root if root is not None else os.environ.get("DATA_ROOT", "data")).expanduser()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()

    if source == "flowers102":
        paths, labels, n_missing, meta_files = _flowers_files(root, split, download=download)
        base, num_classes = root / "flowers-102", FLOWERS_NUM_CLASSES
    else:
        paths, labels, n_missing, meta_files = _folder_files(root), None, 0, []
        base, num_classes = root, None
    key = _cache_key(source, root, split, image_size, paths + meta_files, base)
    cache_path = cache_dir / _cache_name(source, root, split, image_size, key)

    payload = _read_cache(cache_path, key, image_size)
    from_cache = payload is not None
    if from_cache:
        log.info(f"loaded {len(payload['images']):,} images from cache {cache_path}")
    else:
        payload = _build(paths, base, labels, image_size, key, num_workers=num_workers)
        _write_cache_or_warn(cache_path, payload)
    _warn_files(
        f"skipped {len(payload['skipped'])} unreadable file(s) under {root}, using the other "
        f"{len(payload['images']):,}",
        [f"{name} ({reason})" for name, reason in payload["skipped"]],
    )
    _warn_files(
        f"{len(payload['upsampled'])} image(s) under {root} are smaller than {image_size} px "
        "on their short side and were upsampled",
        payload["upsampled"],
    )

    info = dict(
        source=source,
        root=str(root),
        split=split,
        image_size=image_size,
        n_images=len(payload["images"]),
        n_missing=n_missing,
        n_skipped=len(payload["skipped"]),
        n_upsampled=len(payload["upsampled"]),
        cache_path=str(cache_path),
        from_cache=from_cache,
    )
    return ImageDataset(
        payload["images"], payload["labels"], num_classes=num_classes, source_info=info, files=payload["files"]
    )


def _check_args(source: str, split: str, image_size: int) -> None:
    if source not in SOURCES:
        raise DataError(f"source={source!r} is not supported; use one of {SOURCES}")
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not a split; use one of {SPLITS}")
    if source == "folder" and split != "all":
        raise DataError(f"split={split!r}: a folder of images has no splits; use split='all'")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size={image_size!r} must be a positive int (32, 64 and 128 have model presets)")


# -----------------------------------------------------------------------------
# Finding the files


def _flowers_files(root: Path, split: str, *, download: bool) -> tuple[list[Path], np.ndarray, int, list[Path]]:
    """Image paths present on disk for `split`, their labels, how many are missing, and the metadata files."""
    base = ensure_flowers102(root, download=download)
    ids, labels = _flowers_metadata(base, split)
    jpg = base / "jpg"
    on_disk = {entry.name for entry in os.scandir(jpg) if entry.is_file()}
    present = np.array([f"image_{i:05d}.jpg" in on_disk for i in ids], dtype=bool)
    n_missing = int((~present).sum())
    where = "" if split == "all" else f" of split {split!r}"
    if present.sum() == 0:
        raise DataNotFoundError(_flowers_help(root, f"all {len(ids):,} images{where} are missing from {jpg}"))
    if n_missing:
        warnings.warn(
            f"flowers102: {n_missing:,} of {len(ids):,} images{where} missing under {jpg}; "
            f"using {int(present.sum()):,}",
            stacklevel=3,
        )
    paths = [jpg / f"image_{i:05d}.jpg" for i in ids[present]]
    return paths, labels[present], n_missing, [base / "imagelabels.mat", base / "setid.mat"]


def ensure_flowers102(root: str | Path, *, download: bool = True) -> Path:
    """root/flowers-102 once its metadata and jpg/ are there, downloading them first where missing (download=True).

    DataNotFoundError otherwise, with the one message that says what to fetch and where to put it
    (`make demo` checks this before starting any notebook).
    """
    root = Path(root).expanduser()
    base = root / "flowers-102"
    if not _flowers_present(base):
        if not download:
            raise DataNotFoundError(_flowers_help(root, "download=False, so nothing was downloaded"))
        _flowers_download(root)
    return base


def detect_source(root: str | Path) -> str | None:
    """What `root` holds: "flowers102" (a torchvision Flowers102 root: flowers-102/ with jpg/ or the .mat
    files), "folder" (image files, searched recursively), or None (an existing folder with neither, which
    only a Flowers102 download can fill). DataNotFoundError when `root` is not an existing folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(
            f"data folder {root} {what}; pass --data-root (data.root) the folder that holds "
            "your images, or the one that holds flowers-102/"
        )
    base = root / "flowers-102"
    if (base / "jpg").is_dir() or (base / "imagelabels.mat").is_file() or (base / "setid.mat").is_file():
        return "flowers102"
    images = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return "folder" if next(images, None) is not None else None  # stops at the first image: no full walk


def flowers102_class_names() -> list[str]:
    """The 102 class names, indexed by label ("pink primrose", ..., "blackberry lily"), from torchvision."""
    from torchvision.datasets import Flowers102

    return list(Flowers102.classes)


def _flowers_present(base: Path) -> bool:
    return (base / "imagelabels.mat").is_file() and (base / "setid.mat").is_file() and (base / "jpg").is_dir()


def _flowers_download(root: Path) -> None:
    """torchvision's downloader: fetches and unpacks the three files into root/flowers-102, checking md5s."""
    from torchvision.datasets import Flowers102

    try:
        Flowers102(root, split="train", download=True)
    except Exception as err:  # no network, a proxy page, a bad md5, a truncated archive: all end the same way
        raise DataNotFoundError(_flowers_help(root, f"the download failed ({type(err).__name__}: {err})")) from err
    if not _flowers_present(root / "flowers-102"):
        raise DataNotFoundError(_flowers_help(root, "the download finished but the files are not where expected"))


def _flowers_help(root: Path, reason: str) -> str:
    base = root / "flowers-102"
    urls = "\n".join(f"  {FLOWERS_URL}{name}" for name in FLOWERS_FILES)
    return (
        f"Oxford Flowers102 not found under {base}: {reason}.\n"
        f"Download these three files:\n{urls}\n"
        f"put them in {base}/ and unpack 102flowers.tgz there (tar -xzf 102flowers.tgz), so that you have\n"
        f"  {base}/imagelabels.mat\n  {base}/setid.mat\n  {base}/jpg/image_00001.jpg ... image_08189.jpg\n"
        f"then pass root={str(root)!r} (the folder that holds flowers-102/), or set the environment "
        f"variable DATA_ROOT to it."
    )


def _flowers_metadata(base: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 1-based image ids of `split` and their 0-based labels, read from setid.mat / imagelabels.mat.

    Read with scipy directly rather than through torchvision's Flowers102, which reaches the file list only
    through private attributes and refuses a copy whose .mat checksums differ; the layout is the same.
    """
    from scipy.io import loadmat

    try:
        labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"].astype(np.int64) - 1  # 1-based
        setid = loadmat(base / "setid.mat", squeeze_me=True)
        keys = FLOWERS_SPLIT_KEYS.values() if split == "all" else [FLOWERS_SPLIT_KEYS[split]]
        ids = np.sort(np.concatenate([np.atleast_1d(setid[k]) for k in keys]).astype(np.int64))
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"could not read the Flowers102 metadata in {base} ({type(err).__name__}: {err}); "
            f"download imagelabels.mat and setid.mat again from {FLOWERS_URL}"
        ) from err
    return ids, labels[ids - 1]


def _folder_files(root: Path) -> list[Path]:
    """Every image file under root, recursively, in a stable (sorted) order."""
    if not root.is_dir():
        raise DataNotFoundError(
            f"image folder {root} does not exist (or is not a folder); pass the folder that holds your images as root"
        )
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}, searched "
            "recursively; put images there or pass another root"
        )
    return paths


# -----------------------------------------------------------------------------
# Decoding and preprocessing


def _build(
    paths: list[Path],
    base: Path,
    labels: np.ndarray | None,
    image_size: int,
    key: str,
    *,
    num_workers: int | None = None,
) -> dict:
    """Decode every file in parallel into the cache payload; unreadable files are left out and listed."""
    names = [p.relative_to(base).as_posix() for p in paths]
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)

    def work(i: int) -> tuple[str | None, bool]:
        try:
            pixels, upsampled = decode_image(paths[i], image_size)
            out[i] = pixels.transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        except Exception as err:  # one bad file (of any kind of badness) must not end a build of thousands
            return f"{type(err).__name__}: {err}", False
        return None, upsampled

    # Pillow releases the GIL while decoding and resizing, so threads scale with cores and share `out`.
    workers = num_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(_progress(pool.map(work, range(len(paths))), len(paths)))
    ok = np.array([err is None for err, _ in results], dtype=bool)
    if not ok.any():
        why = "; ".join(f"{names[i]}: {err}" for i, (err, _) in enumerate(results[:MAX_NAMED]))
        raise DataError(
            f"none of the {len(paths):,} image files under {base} could be read ({why}); "
            "check the files or point root at another folder"
        )
    keep = np.flatnonzero(ok)
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "images": torch.from_numpy(out if ok.all() else out[keep]),
        "labels": torch.from_numpy(labels[keep]).long() if labels is not None else None,
        "files": [names[i] for i in keep],
        "skipped": [[names[i], err] for i, (err, _) in enumerate(results) if err is not None],
        "upsampled": [names[i] for i, (err, up) in enumerate(results) if err is None and up],
    }


def decode_image(path: str | Path, image_size: int) -> tuple[np.ndarray, bool]:
    """One file -> (uint8 (S, S, 3) RGB: centre square crop, antialiased bicubic resize; was it upsampled)."""
    with Image.open(path) as img:
        # JPEGs can decode at 1/2, 1/4 or 1/8 scale for free; stop at 2x the target (as Image.thumbnail
        # does) so the final antialiased resize still sets the quality. 2x faster even on the 160 px
        # mini copy at 32 px; more on full-size (500 px) photos.
        img.draft("RGB", (2 * image_size, 2 * image_size))
        img = _to_rgb(ImageOps.exif_transpose(img))  # phone photos store their rotation in EXIF
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.resize(
            (image_size, image_size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )  # crop and resize in one pass
        return np.asarray(img, dtype=np.uint8), side < image_size


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparent pixels are composited on white: dropping alpha would expose whatever
    colour the transparent pixels happen to hold (often black), and cut-outs are drawn on white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # how Pillow opens 16-bit grayscale: keep the top 8 bits
        img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ... (CMYK through Pillow's naive conversion)


def _progress(iterable, total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="decoding images", unit="img", leave=False, disable=None)


def _warn_files(message: str, names: list[str]) -> None:
    if names:
        listed = ", ".join(names[:MAX_NAMED]) + (
            f", and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
        )
        warnings.warn(f"{message}: {listed}", stacklevel=3)


# -----------------------------------------------------------------------------
# The cache: one torch.save file per (source, root, split, image_size, file list)


def cache_root() -> Path:
    """The folder every ddpm cache lives under (decoded images here, Inception statistics in ddpm.metrics).

    $DDPM_CACHE_DIR if set; else, when ddpm runs from a checkout of ddpm-flowers, its data/cache, so
    notebooks (run from notebooks/) and scripts (run from the root) share one copy whatever the current
    directory; else (an installed package, where the folder next to ddpm/ is site-packages) the user's
    cache folder, $XDG_CACHE_HOME/ddpm-flowers or ~/.cache/ddpm-flowers.
    """
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"]).expanduser()
    checkout = PACKAGE_DIR.parent
    if _is_checkout(checkout):
        return checkout / "data" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ddpm-flowers"


def _is_checkout(folder: Path) -> bool:
    """Whether `folder` is this project's source tree: a git checkout, or its pyproject.toml names ddpm-flowers."""
    if (folder / ".git").exists():
        return True
    try:
        text = (folder / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    # a regular expression, not tomllib: that is Python 3.11+, and the project supports 3.10
    return re.search(r'^\s*name\s*=\s*["\']ddpm-flowers["\']', text, flags=re.MULTILINE) is not None


def _cache_key(source: str, root: Path, split: str, image_size: int, files: list[Path], base: Path) -> str:
    """sha256 over everything the cached pixels depend on; any file added, removed or changed changes it."""
    records = []
    for p in files:
        st = p.stat()
        records.append([p.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns])
    spec = {
        "format": CACHE_FORMAT,
        "source": source,
        "root": str(root.resolve()),
        "split": split,
        "image_size": image_size,
        "files": records,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _cache_name(source: str, root: Path, split: str, image_size: int, key: str) -> str:
    label = f"flowers102-{split}" if source == "flowers102" else f"folder-{root.resolve().name or 'root'}"
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    return f"{label}-{image_size}px-{key[:16]}.pt"


def write_cache(path: str | Path, payload: dict) -> bool:
    """Save a cache `payload` atomically, with its tensors' byte count and its sha256 so that read_cache can
    tell a damaged file (truncated, a flipped bit: torch.load checks neither) from a good one. A write that fails
    (a read-only folder, a full disk) warns and returns False: a cache saves time, it is not needed to go on."""
    path = Path(path)
    try:
        save_checkpoint(path, {**payload, "checksum": _tensor_checksum(payload)})  # atomic: old file or none
    except OSError as err:
        warnings.warn(f"could not write the cache {path} ({err}); continuing without it", stacklevel=2)
        return False
    return True


def read_cache(path: str | Path, *, check=None) -> dict | None:
    """The payload write_cache saved at `path`, or None when there is none.

    A file that cannot be read, whose tensors' size or checksum differs from the recorded ones, or that
    `check(payload)` rejects (by raising ValueError, KeyError or TypeError) is not used: a warning names it and
    None is returned, so the caller rebuilds it (and write_cache replaces it).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not isinstance(payload.get("checksum"), dict):
            raise ValueError("it has no checksum (written by another version?)")
        recorded, actual = payload.pop("checksum"), _tensor_checksum(payload)
        if recorded.get("nbytes") != actual["nbytes"]:
            raise ValueError(f"it holds {actual['nbytes']:,} bytes of tensors, {recorded.get('nbytes')} were written")
        if recorded.get("sha256") != actual["sha256"]:
            raise ValueError("its checksum differs from the one written with it (damaged on disk)")
        if check is not None:
            check(payload)
    except Exception as err:  # noqa: BLE001 -- truncated, corrupt, another format: all are fixed by rebuilding
        warnings.warn(
            f"cache file {path} is unreadable or does not match ({type(err).__name__}: {err}); rebuilding it",
            stacklevel=2,
        )
        return None
    return payload


def _tensor_checksum(tree) -> dict:
    """sha256 of a whole payload (tensor bytes and plain values, in sorted-key order) and its tensors' size."""
    h, nbytes = hashlib.sha256(), 0

    def visit(obj, where: str) -> None:
        nonlocal nbytes
        if isinstance(obj, torch.Tensor):
            flat = obj.detach().cpu().reshape(-1).contiguous()
            h.update(f"{where}:{obj.dtype}:{tuple(obj.shape)};".encode())
            h.update(flat.view(torch.uint8).numpy())  # the buffer itself: no copy of a 100 MB cache
            nbytes += flat.numel() * flat.element_size()
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                if k != "checksum":
                    visit(obj[k], f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{where}[{i}]")
        else:  # file names, format numbers: damage there matters as much
            h.update(f"{where}={obj!r};".encode())

    visit(tree, "")
    return {"sha256": h.hexdigest(), "nbytes": nbytes}


def _write_cache_or_warn(path: Path, payload: dict) -> None:
    if write_cache(path, payload):
        log.info(f"decoded {len(payload['images']):,} images; cache written to {path}")


def _read_cache(path: Path, key: str, image_size: int) -> dict | None:
    """The cached payload, or None when there is none; an unreadable or mismatched one is rebuilt with a warning."""
    return read_cache(path, check=lambda payload: _check_payload(payload, key, image_size))


def _check_payload(payload: dict, key: str, image_size: int) -> None:
    if payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
        raise ValueError("format or key differs")
    images, labels = payload["images"], payload["labels"]
    n = len(payload["files"])
    if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, image_size, image_size):
        raise ValueError(f"images are {images.dtype} {tuple(images.shape)} for {n} files of {image_size} px")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels have shape {tuple(labels.shape)} for {n} files")


# -----------------------------------------------------------------------------
# The training loader


class BatchStream:
    """Endless (x, y) batches from an ImageDataset: x float32 (B, 3, S, S) in [-1, 1] on `device`, y int64 (B,)
    (-1 where the dataset has no labels).

    Every batch is a function of (seed, step) alone: epoch e visits torch.randperm(N) drawn from a
    generator seeded by (seed, e); rank r of world_size takes every world_size-th index of it (equal
    shards, as DistributedSampler; the last N % world_size of each permutation are left out of that
    epoch); flips come from a generator seeded by (seed, e, r). So `seek(step)` (or load_state_dict)
    resumes the exact sequence. Gathering indexes the in-memory uint8 tensor; only uint8 crosses to the
    device (pinned, non-blocking on CUDA: ddpm.device.to_device), and scaling and flipping run there.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = True,
        device: str | torch.device = "cpu",
        drop_last: bool = True,
    ):
        n = len(dataset.images)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        self.shard_size = n // world_size
        if batch_size > self.shard_size:
            raise DataError(
                f"batch_size={batch_size} is larger than rank {rank}'s shard of {self.shard_size} "
                f"images ({n} images over world_size={world_size}); use a smaller batch_size or more "
                "images"
            )
        self.images, self.labels = dataset.images, dataset.labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.flip, self.drop_last = flip, drop_last
        self.device = torch.device(device)
        self.batches_per_epoch = self.shard_size // batch_size if drop_last else math.ceil(self.shard_size / batch_size)
        self.step = 0
        self._plan_epoch, self._plan = None, None

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.step // self.batches_per_epoch

    def seek(self, step: int) -> None:
        """Make the next batch the one an uninterrupted stream would yield as its `step`-th (0-based)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        self.step = int(step)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "n_images": len(self.images),
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differ = {k: (state[k], mine[k]) for k in mine if k != "step" and k in state and state[k] != mine[k]}
        if differ:
            raise ValueError(
                f"cannot resume the same batch sequence: saved vs current {differ}; "
                "rebuild the BatchStream with the saved settings, or call .seek(step) to go on anyway"
            )
        self.seek(state["step"])

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = divmod(self.step, self.batches_per_epoch)
        order, flips = self._epoch_plan(epoch)
        rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
        self.step += 1
        return self._load(order[rows], flips[rows])

    def _epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's indices for `epoch`, in visiting order, and a flip decision for each."""
        if self._plan_epoch != epoch:
            perm = torch.randperm(len(self.images), generator=_generator(self.seed, epoch))
            order = perm[self.rank : self.shard_size * self.world_size : self.world_size]
            flips = torch.rand(self.shard_size, generator=_generator(self.seed, epoch, self.rank)) < 0.5
            self._plan_epoch, self._plan = epoch, (order, flips)
        return self._plan

    def _load(self, index: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images.index_select(0, index)
        y = self.labels.index_select(0, index) if self.labels is not None else torch.full((len(index),), -1)
        x = to_device(x, self.device)  # pinned and non-blocking on CUDA, blocking on MPS (see to_device)
        if self.flip:  # on uint8, before scaling: a quarter of the bytes to move
            x = torch.where(to_device(flips, self.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return to_unit_range(x), to_device(y, self.device)

    def __repr__(self) -> str:
        return (
            f"BatchStream(batch_size={self.batch_size}, seed={self.seed}, rank={self.rank}/{self.world_size}, "
            f"batches_per_epoch={self.batches_per_epoch}, step={self.step}, device={self.device})"
        )


def _generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints, hashed so (0, 1) and (1, 0) give unrelated streams."""
    digest = hashlib.sha256(repr(tuple(int(s) for s in seeds)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
