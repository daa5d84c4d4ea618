"""What every benchmark script shares: the repo on sys.path and the default data root."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere, installed or not


def default_data_root() -> str:
    """$DATA_ROOT, else the shared Flowers102 mini copy beside the checkout (../shared/data/flowers102-mini)."""
    return os.environ.get("DATA_ROOT") or str(REPO.parent / "shared" / "data" / "flowers102-mini")
