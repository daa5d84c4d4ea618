"""What every benchmark script shares: the repo on sys.path and the default data root."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere, installed or not


def run(main) -> None:
    """Run a benchmark's main() as the ddpm command lines run theirs: a user error (missing data, a bad
    checkpoint or argument value, no Inception weights offline) is one `error: ...` line and exit status 2;
    anything else (a bug) keeps its traceback."""
    from ddpm.checkpoint import UsageError, exit_with_error

    try:
        main()
    except UsageError as err:
        exit_with_error(err)


def default_data_root() -> str:
    """$DATA_ROOT, else the shared Flowers102 mini copy beside the checkout (../shared/data/flowers102-mini)."""
    return os.environ.get("DATA_ROOT") or str(REPO.parent / "shared" / "data" / "flowers102-mini")
