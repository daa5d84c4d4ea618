"""What several test modules share: the shared Flowers102 copy, as a fixture that skips without it.

The copy lives beside the checkout (../shared/data/flowers102-mini) or wherever $DDPM_SHARED_DATA says.
A test that needs real photos takes `flowers_root`; .ci/run refuses to start without the folder, so in CI
these tests run rather than skip.
"""

import os
from pathlib import Path

import pytest


def shared_flowers_root() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers102-mini"
    return Path(os.environ.get("DDPM_SHARED_DATA") or default)


@pytest.fixture(scope="session")
def flowers_root() -> Path:
    """The torchvision root holding flowers-102/ (jpg/, imagelabels.mat, setid.mat); skips when absent."""
    root = shared_flowers_root()
    base = root / "flowers-102"
    if not ((base / "jpg").is_dir() and (base / "imagelabels.mat").is_file() and (base / "setid.mat").is_file()):
        pytest.skip(
            f"shared Flowers102 copy not found at {root} (set DDPM_SHARED_DATA to a folder holding "
            "flowers-102/jpg, imagelabels.mat and setid.mat)"
        )
    return root
