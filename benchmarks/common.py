"""What every benchmark script shares: the repo on sys.path, the default data root, error handling and the
--samplers syntax."""

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


def parse_sampler(spec: str, option: str = "--samplers") -> tuple[str, int, str | None]:
    """ "dpmpp_2m:20" or "dpmpp_2m:20:trailing" -> (method, steps, spacing or None for the method's own)."""
    from ddpm.checkpoint import UsageError
    from ddpm.samplers import METHODS, SPACINGS

    parts = spec.strip().split(":")
    if (
        len(parts) not in (2, 3)
        or parts[0] not in METHODS
        or not parts[1].isdigit()
        or (len(parts) == 3 and parts[2] not in SPACINGS)
    ):
        raise UsageError(
            f"{option}: bad entry {spec!r}; want method:steps[:spacing] with method in "
            f"{', '.join(METHODS)} and spacing in {', '.join(SPACINGS)}"
        )
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None
