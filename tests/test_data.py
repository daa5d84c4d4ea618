"""ddpm.data: Flowers102 (partial copy), image folders, bad files, the uint8 cache, BatchStream."""

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.data as data
from ddpm.data import BatchStream, ImageDataset, load_dataset, to_unit_range


def flowers_truth(root, split="all"):
    """Independent reading of the metadata: {image id: label} for the split's images present on disk."""
    from scipy.io import loadmat

    base = root / "flowers-102"
    labels = loadmat(base / "imagelabels.mat")["labels"].ravel() - 1
    setid = loadmat(base / "setid.mat")
    keys = {"train": ["trnid"], "val": ["valid"], "test": ["tstid"], "all": ["trnid", "valid", "tstid"]}[split]
    ids = {int(i) for k in keys for i in setid[k].ravel()}
    present = {int(name[6:11]) for name in os.listdir(base / "jpg")}
    return {i: int(labels[i - 1]) for i in ids & present}, len(ids)


def file_id(name):
    return int(Path(name).stem[6:11])  # "jpg/image_00042.jpg" -> 42


@pytest.fixture(scope="module")
def flowers_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def flowers_all(flowers_root, flowers_cache):
    with pytest.warns(UserWarning, match=r"flowers102: 6,149 of 8,189 images missing under .*jpg; using 2,040"):
        return load_dataset("flowers102", flowers_root, image_size=32, cache_dir=flowers_cache)


# -----------------------------------------------------------------------------
# Flowers102


def test_flowers_partial_copy_uses_present_images_with_their_labels(flowers_root, flowers_all):
    truth, n_listed = flowers_truth(flowers_root, "all")
    ds = flowers_all
    assert n_listed == 8189 and len(ds) == len(truth) == 2040
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (2040, 3, 32, 32)
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 102
    assert 0 <= ds.labels.min() and ds.labels.max() < 102
    assert {file_id(f): int(y) for f, y in zip(ds.files, ds.labels)} == truth
    info = ds.source_info
    assert (info["n_images"], info["n_missing"], info["n_skipped"], info["split"]) == (2040, 6149, 0, "all")
    assert Path(info["cache_path"]).is_file() and info["image_size"] == 32
    names = data.flowers102_class_names()
    assert len(names) == 102 and names[0] == "pink primrose" and names[101] == "blackberry lily"


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_flowers_single_split(split, flowers_root, flowers_cache, flowers_all):
    truth, n_listed = flowers_truth(flowers_root, split)
    with pytest.warns(UserWarning, match=f"{n_listed - len(truth):,} of {n_listed:,} images of split '{split}'"):
        ds = load_dataset("flowers102", flowers_root, image_size=32, split=split, cache_dir=flowers_cache)
    assert {file_id(f): int(y) for f, y in zip(ds.files, ds.labels)} == truth
    # the same pixels as in the combined dataset: preprocessing does not depend on the split
    row = {f: i for i, f in enumerate(flowers_all.files)}
    assert torch.equal(ds.images, flowers_all.images[[row[f] for f in ds.files]])


def test_flowers_cache_is_reused_without_decoding(flowers_root, flowers_all, flowers_cache, monkeypatch, caplog):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache exists")

    monkeypatch.setattr(data, "decode_image", no_decoding)
    with caplog.at_level(logging.INFO, logger="ddpm.data"), pytest.warns(UserWarning, match="missing"):
        again = load_dataset("flowers102", flowers_root, image_size=32, cache_dir=flowers_cache)
    assert again.source_info["from_cache"] and not flowers_all.source_info["from_cache"]
    assert torch.equal(again.images, flowers_all.images) and torch.equal(again.labels, flowers_all.labels)
    assert f"loaded 2,040 images from cache {again.source_info['cache_path']}" in caplog.text


def test_no_data_and_failed_download_gives_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):  # the network boundary; everything above it is torchvision's real download code
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("flowers102", tmp_path, image_size=32, cache_dir=tmp_path / "cache", download=True)
    message = str(err.value)
    for name in ("102flowers.tgz", "imagelabels.mat", "setid.mat"):
        assert f"https://www.robots.ox.ac.uk/~vgg/data/flowers/102/{name}" in message
    assert str(tmp_path / "flowers-102") in message and "DATA_ROOT" in message and "download failed" in message
    assert isinstance(err.value.__cause__, urllib.error.URLError)  # kept as the cause, not raised raw

    with pytest.raises(FileNotFoundError, match="download=False"):
        load_dataset("flowers102", tmp_path / "elsewhere", image_size=32, download=False)


# -----------------------------------------------------------------------------
# Image folders and bad input


def save(path, img, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def three_bands(w=96, h=32):
    """Red | green | blue vertical bands: the centre square crop keeps only green."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = a[:, w // 3 : 2 * w // 3, 1] = a[:, 2 * w // 3 :, 2] = 255
    return Image.fromarray(a)


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "images"
    save(root / "bands.jpg", three_bands(), quality=95)
    save(root / "a" / "b" / "nested.png", Image.new("RGB", (40, 40), (10, 20, 30)))
    save(root / "gray.png", Image.new("L", (32, 32), 128))
    save(root / "gray16.png", Image.new("I;16", (32, 32), 128 * 256))  # 16-bit: scaled down, not clipped
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: must become white
    save(root / "rgba.png", rgba)
    save(root / "palette.png", Image.new("RGB", (32, 32), (0, 0, 255)).convert("P"))
    save(root / "cmyk.jpg", Image.new("CMYK", (32, 32), (0, 255, 255, 0)), quality=95)  # red in CMYK
    save(root / "tiny.png", Image.new("RGB", (8, 8), (200, 100, 0)))
    save(root / "UPPER.JPG", Image.new("RGB", (32, 32), (50, 50, 50)))
    save(root / "photo.webp", Image.new("RGB", (32, 32), (0, 200, 0)))
    good_jpg = (root / "UPPER.JPG").read_bytes()
    (root / "corrupt.jpg").write_bytes(good_jpg[:20] + b"\x00garbage" * 50)
    save(tmp_path / "whole.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    (root / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:400])
    save(tmp_path / "whole.jpg", Image.open(tmp_path / "whole.png"))
    (root / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:1500])  # header fine, scan cut
    (root / "not_an_image.jpg").write_text("just text with an image extension")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def pixel(ds, name):
    return ds.images[ds.files.index(name)].float().mean(dim=(1, 2))  # mean RGB of one image


def test_folder_with_every_kind_of_bad_input(messy_folder, tmp_path):
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset("folder", messy_folder, image_size=16, cache_dir=tmp_path / "cache")
    text = "\n".join(str(w.message) for w in caught)
    skipped = next(str(w.message) for w in caught if "unreadable" in str(w.message))
    for bad in ("corrupt.jpg", "truncated.jpg", "truncated.png", "not_an_image.jpg"):
        assert bad in skipped
    assert "skipped 4 unreadable" in skipped and "using the other 10:" in skipped  # named, and the count used
    assert "upsampled: tiny.png" in text and "bands.jpg" not in text

    good = [
        "UPPER.JPG",
        "a/b/nested.png",
        "bands.jpg",
        "cmyk.jpg",
        "gray.png",
        "gray16.png",
        "palette.png",
        "photo.webp",
        "rgba.png",
        "tiny.png",
    ]
    assert ds.files == good and ds.images.shape == (10, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.labels is None and ds.num_classes is None and ds[0][1] == -1
    assert (ds.source_info["n_skipped"], ds.source_info["n_upsampled"]) == (4, 1)

    close = lambda name, rgb, tol: torch.allclose(pixel(ds, name), torch.tensor(rgb, dtype=torch.float), atol=tol)
    assert close("bands.jpg", [0, 255, 0], 6)  # centre crop removed the red and blue bands
    assert close("rgba.png", [255, 255, 255], 0)  # transparent pixels composited on white
    assert close("gray.png", [128, 128, 128], 0) and close("gray16.png", [128, 128, 128], 0)
    assert close("palette.png", [0, 0, 255], 0)
    assert close("cmyk.jpg", [255, 0, 0], 6)
    assert close("tiny.png", [200, 100, 0], 0)
    assert close("a/b/nested.png", [10, 20, 30], 0)
    assert close("photo.webp", [0, 200, 0], 6)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", tmp_path / "nope", image_size=16, cache_dir=tmp_path / "cache")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"no images .* found under {tmp_path / 'empty'}"):
        load_dataset("folder", tmp_path / "empty", image_size=16, cache_dir=tmp_path / "cache")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "fake.png").write_text("not a png")
    with pytest.raises(ValueError, match=f"none of the 1 image files under {tmp_path / 'junk'}.*fake.png"):
        load_dataset("folder", tmp_path / "junk", image_size=16, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing cached for a failed build


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="mnist"), "source='mnist'"),
        (dict(split="training"), "split='training'"),
        (dict(source="folder", split="train"), "no splits"),
        (dict(image_size=0), "image_size=0"),
        (dict(image_size=32.0), "image_size=32.0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    kwargs = {"source": "flowers102", "image_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_dataset(kwargs.pop("source"), tmp_path, cache_dir=tmp_path, **kwargs)


# -----------------------------------------------------------------------------
# The cache


def small_folder(root, n=3):
    for i in range(n):
        save(root / f"img{i}.png", Image.new("RGB", (24, 20), (i * 40, 0, 0)))
    return root


def test_cache_key_follows_the_files(tmp_path):
    root, cache = small_folder(tmp_path / "imgs"), tmp_path / "cache"
    first = load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert load_dataset("folder", root, image_size=8, cache_dir=cache).source_info["from_cache"]

    other_size = load_dataset("folder", root, image_size=12, cache_dir=cache)
    assert other_size.source_info["cache_path"] != first.source_info["cache_path"]

    save(root / "new.png", Image.new("RGB", (24, 20), (0, 0, 255)))
    added = load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert not added.source_info["from_cache"] and len(added) == 4
    assert added.source_info["cache_path"] != first.source_info["cache_path"]

    save(root / "img0.png", Image.new("RGB", (48, 40), (0, 255, 0)))  # same name, new size and content
    changed = load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert (
        not changed.source_info["from_cache"] and changed.source_info["cache_path"] != added.source_info["cache_path"]
    )
    assert pixel(changed, "img0.png").tolist() == [0, 255, 0]


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    root, cache = small_folder(tmp_path / "imgs"), tmp_path / "cache"

    class Crash(Exception):
        pass

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise Crash("killed while writing")

    monkeypatch.setattr(data.torch, "save", crash_mid_write)
    with pytest.raises(Crash):
        load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a half-written cache nor a leftover temporary file
    monkeypatch.undo()
    ds = load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert not ds.source_info["from_cache"] and [p.name for p in cache.iterdir()] == [
        Path(ds.source_info["cache_path"]).name
    ]


def test_unwritable_cache_warns_and_goes_on(tmp_path, monkeypatch):
    def read_only(path, payload):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "save_checkpoint", read_only)
    with pytest.warns(UserWarning, match="could not write the cache .*Permission denied.*continuing without it"):
        ds = load_dataset("folder", small_folder(tmp_path / "imgs"), image_size=8, cache_dir=tmp_path / "cache")
    assert len(ds) == 3


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    root, cache = small_folder(tmp_path / "imgs"), tmp_path / "cache"
    first = load_dataset("folder", root, image_size=8, cache_dir=cache)
    path = Path(first.source_info["cache_path"])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"cache file {path} is unreadable.*rebuilding"):
        rebuilt = load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert not rebuilt.source_info["from_cache"] and torch.equal(rebuilt.images, first.images)
    assert load_dataset("folder", root, image_size=8, cache_dir=cache).source_info["from_cache"]


def test_damaged_cache_is_found_by_its_checksum_and_rebuilt(tmp_path):
    # torch.load reads a flipped bit in a tensor without complaint: only the checksum written with the cache sees it
    root, cache = small_folder(tmp_path / "imgs"), tmp_path / "cache"
    first = load_dataset("folder", root, image_size=8, cache_dir=cache)
    path = Path(first.source_info["cache_path"])
    raw = bytearray(path.read_bytes())
    pixels = first.images.numpy().tobytes()
    at = bytes(raw).find(pixels)  # the stored pixels: flip one bit in them
    assert at > 0
    raw[at + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(path, weights_only=True)["images"], first.images)  # loads, wrong pixels
    with pytest.warns(UserWarning, match=f"cache file {path} is unreadable .*checksum differs.*rebuilding"):
        rebuilt = load_dataset("folder", root, image_size=8, cache_dir=cache)
    assert not rebuilt.source_info["from_cache"] and torch.equal(rebuilt.images, first.images)
    assert load_dataset("folder", root, image_size=8, cache_dir=cache).source_info["from_cache"]


def test_read_cache_checks_size_checksum_and_the_callers_own_test(tmp_path):
    payload = {"features": torch.arange(12.0).reshape(3, 4), "version": 1, "names": ["a", "b"]}
    assert data.write_cache(tmp_path / "c.pt", payload)
    back = data.read_cache(tmp_path / "c.pt")
    assert back.keys() == payload.keys() and torch.equal(back["features"], payload["features"])
    assert data.read_cache(tmp_path / "absent.pt") is None  # no file: no warning, just nothing cached

    def wrong_version(p):
        if p["version"] != 2:
            raise ValueError(f"version {p['version']}, expected 2")

    with pytest.warns(UserWarning, match="c.pt is unreadable or does not match .ValueError: version 1, expected 2"):
        assert data.read_cache(tmp_path / "c.pt", check=wrong_version) is None
    torch.save(payload, tmp_path / "old.pt")  # written without a checksum (an older version)
    with pytest.warns(UserWarning, match="old.pt .*no checksum"):
        assert data.read_cache(tmp_path / "old.pt") is None
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["names"] = ["a", "x"]  # damage outside the tensors counts too
    torch.save(state, tmp_path / "c.pt")
    with pytest.warns(UserWarning, match="checksum differs"):
        assert data.read_cache(tmp_path / "c.pt") is None


def test_detect_source(tmp_path, flowers_root):
    assert data.detect_source(flowers_root) == "flowers102"
    small_folder(tmp_path / "imgs" / "deep")
    assert data.detect_source(tmp_path / "imgs") == "folder"  # images in a subfolder count
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    assert data.detect_source(tmp_path / "empty") is None  # only a Flowers102 download could fill it
    (tmp_path / "partial" / "flowers-102").mkdir(parents=True)
    (tmp_path / "partial" / "flowers-102" / "setid.mat").write_bytes(b"")
    assert data.detect_source(tmp_path / "partial") == "flowers102"  # an incomplete copy is still that layout
    with pytest.raises(data.DataNotFoundError, match="data folder .*nope does not exist"):
        data.detect_source(tmp_path / "nope")
    with pytest.raises(data.DataNotFoundError, match="notes.txt is a file, not a folder"):
        data.detect_source(tmp_path / "empty" / "notes.txt")


def test_data_problems_are_usage_errors_of_the_old_types(tmp_path):
    from ddpm.checkpoint import UsageError

    with pytest.raises(FileNotFoundError) as missing:
        load_dataset("folder", tmp_path / "nope", image_size=8, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError) as bad_size:
        load_dataset("folder", tmp_path, image_size=0, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="batch_size=8 is larger than rank 0's shard of 4 images") as too_few:
        BatchStream(numbered(4), batch_size=8)
    with pytest.raises(FileNotFoundError, match="download=False") as no_flowers:
        data.ensure_flowers102(tmp_path, download=False)
    for err in (missing, bad_size, too_few, no_flowers):
        assert isinstance(err.value, UsageError)  # the command lines print these as one line, status 2


# -----------------------------------------------------------------------------
# ImageDataset and BatchStream


def numbered(n, size=4, labels=True):
    """n random images whose label is their index, so a batch's y names the rows it holds."""
    images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) if labels else None, num_classes=n if labels else None)


def test_dataset_item_range_dtype_and_flip():
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    images[0, :, :, 1] = 255  # left column black, right column white
    ds = ImageDataset(images, torch.tensor([7]), num_classes=10)
    seen = set()
    for _ in range(64):
        x, y = ds[0]
        assert x.dtype == torch.float32 and y == 7 and set(x.unique().tolist()) == {-1.0, 1.0}
        seen.add(x[0, 0, 0].item())  # -1 unflipped, +1 flipped
    assert seen == {-1.0, 1.0}
    assert torch.equal(to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))


def collect(stream, n):
    return [next(stream) for _ in range(n)]


def test_batchstream_values_cover_each_epoch_and_are_deterministic():
    ds = numbered(24)
    stream = BatchStream(ds, 8, seed=3)
    assert stream.batches_per_epoch == 3 and stream.epoch == 0
    batches = collect(stream, 6)
    assert stream.step == 6 and stream.epoch == 2
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (8, 3, 4, 4)
        plain, flipped = to_unit_range(ds.images[y]), to_unit_range(ds.images[y]).flip(-1)
        assert all(torch.equal(a, p) or torch.equal(a, f) for a, p, f in zip(x, plain, flipped))
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat([y for _, y in epoch]).tolist()) == list(range(24))  # each image once
    assert not torch.equal(batches[0][1], batches[3][1])  # a new order each epoch

    same = collect(BatchStream(ds, 8, seed=3), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, same))
    other = collect(BatchStream(ds, 8, seed=4), 1)
    assert not torch.equal(other[0][1], batches[0][1])


def test_batchstream_seek_and_state_dict_resume_the_sequence():
    ds = numbered(20)
    full = collect(BatchStream(ds, 6, seed=1), 10)  # 3 batches per epoch: crosses epoch boundaries
    for k in (0, 2, 3, 7):
        resumed = BatchStream(ds, 6, seed=1)
        resumed.seek(k)
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[k:], collect(resumed, 10 - k))
        )
    stream = BatchStream(ds, 6, seed=1)
    collect(stream, 4)
    state = stream.state_dict()
    fresh = BatchStream(ds, 6, seed=1)
    fresh.load_state_dict(state)
    assert fresh.step == 4 and torch.equal(next(fresh)[0], full[4][0])
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(ds, 5, seed=1).load_state_dict(state)


def test_batchstream_ranks_take_disjoint_equal_shards():
    ds = numbered(21)  # 21 over 2 ranks: shards of 10, one image sits out each epoch
    ranks = [BatchStream(ds, 5, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [s.shard_size for s in ranks] == [10, 10] and ranks[0].batches_per_epoch == 2
    for epoch in range(2):
        seen = [torch.cat([next(s)[1] for _ in range(2)]).tolist() for s in ranks]
        assert len(set(seen[0])) == len(set(seen[1])) == 10 and not set(seen[0]) & set(seen[1])
        perm = torch.randperm(21, generator=data._generator(0, epoch))
        assert set(seen[0]) | set(seen[1]) == set(perm[:20].tolist())


def test_batchstream_flip_off_unlabelled_drop_last_and_errors():
    ds = numbered(10, labels=False)
    x, y = next(BatchStream(ds, 4, flip=False, seed=5))
    order = BatchStream(ds, 4, seed=5)._epoch_plan(0)[0][:4]
    assert torch.equal(x, to_unit_range(ds.images[order])) and y.tolist() == [-1] * 4
    flips = torch.cat([BatchStream(numbered(200), 200, seed=s)._epoch_plan(0)[1] for s in range(5)]).float()
    assert 0.45 < flips.mean() < 0.55

    keep_last = BatchStream(ds, 4, drop_last=False)
    assert keep_last.batches_per_epoch == 3 and [len(next(keep_last)[1]) for _ in range(4)] == [4, 4, 2, 4]
    with pytest.raises(ValueError, match="batch_size=6 is larger than rank 1's shard of 5"):
        BatchStream(ds, 6, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        BatchStream(ds, 2, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batchstream_on_cuda_matches_cpu():
    ds = numbered(16)
    a, b = next(BatchStream(ds, 8, device="cuda")), next(BatchStream(ds, 8))
    assert a[0].is_cuda and torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


@pytest.mark.parametrize("device", ["cuda", "mps", "cpu"])
def test_batchstream_copies_every_tensor_through_to_device(monkeypatch, device):
    # to_device picks the copy (pinned non-blocking on CUDA, blocking on MPS: tests/test_device.py); here,
    # that the stream sends x, its flips and y through it, to the stream's device, as uint8 / bool / int64
    copies = []
    monkeypatch.setattr(data, "to_device", lambda t, dev: copies.append((t.dtype, dev)) or t.clone())
    x, y = next(BatchStream(numbered(8), 4, device=device))
    want = torch.device(device)
    assert copies == [(torch.uint8, want), (torch.bool, want), (torch.int64, want)]
    assert x.dtype == torch.float32 and y.dtype == torch.int64


def fake_package(folder, *, pyproject=None, git=False):
    """folder/ddpm as the package's own folder, beside a pyproject.toml and/or a .git."""
    (folder / "ddpm").mkdir(parents=True)
    if pyproject is not None:
        (folder / "pyproject.toml").write_text(pyproject)
    if git:
        (folder / ".git").mkdir()
    return folder / "ddpm"


def test_cache_root_env_checkout_or_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(data, "PACKAGE_DIR", fake_package(checkout, pyproject='[project]\nname = "ddpm-flowers"\n'))
    assert data.cache_root() == checkout / "data" / "cache"  # a checkout: its data/cache, whatever the cwd

    site = tmp_path / "venv" / "lib" / "site-packages"  # installed without -e: never write there
    monkeypatch.setattr(data, "PACKAGE_DIR", fake_package(site))
    assert data.cache_root() == tmp_path / "home" / ".cache" / "ddpm-flowers"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_root() == tmp_path / "xdg" / "ddpm-flowers"

    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "mine"))  # the variable wins over both
    assert data.cache_root() == tmp_path / "mine"
    monkeypatch.setattr(data, "PACKAGE_DIR", checkout / "ddpm")
    assert data.cache_root() == tmp_path / "mine"


def test_what_counts_as_a_checkout(tmp_path):
    assert data._is_checkout(fake_package(tmp_path / "a", pyproject='[project]\nname = "ddpm-flowers"\n').parent)
    assert data._is_checkout(fake_package(tmp_path / "b", git=True).parent)
    assert not data._is_checkout(fake_package(tmp_path / "c", pyproject='[project]\nname = "other"\n').parent)
    assert not data._is_checkout(fake_package(tmp_path / "d").parent)
    assert data._is_checkout(Path(data.__file__).resolve().parents[1])  # this very checkout


def test_load_dataset_caches_under_cache_root_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    ds = load_dataset("folder", small_folder(tmp_path / "imgs"), image_size=8)
    assert Path(ds.source_info["cache_path"]).parent == tmp_path / "cache"
    assert Path(ds.source_info["cache_path"]).is_file()
