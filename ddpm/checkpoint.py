"""Checkpoints: atomic save, weights_only load, a run folder of step_XXXXXXX.pt files, resume checks.

A checkpoint is a plain dict that `torch.load(..., weights_only=True)` can read back: tensors, dicts,
lists, str, int, float, bool and None only. Configs are stored as plain dicts, RNG states as tensors and
lists. That keeps loading safe (no arbitrary pickles) and lets any later version of the code read it.

Run folder layout:
    run_dir/config.json          the resolved RunConfig
    run_dir/step_0001000.pt      the last `keep_last` checkpoints
    run_dir/latest.pt            the newest checkpoint (a hard link where the filesystem has them, else a copy)
    run_dir/.lock                while a run trains there: its pid and host (RunLock)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from .device import mps_available

STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
LATEST = "latest.pt"


class UsageError(Exception):
    """Something asked for that cannot be done as asked: a path, a file or a value the user gave, never a bug.

    The command lines print it as one `error: ...` line and exit with status 2, so only raise it (or a
    subclass) where the message says what was wrong and what to do.
    """


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, not a ddpm checkpoint) or does not fit this run."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for (still a FileNotFoundError, for callers that catch that)."""


class RunFolderError(UsageError, RuntimeError):
    """A run folder that cannot be used: not writable, or locked by a run that is still going."""


class CheckpointWriteError(OSError):
    """A save that failed part-way (disk full, quota, I/O error). The previous checkpoints are intact; the
    message names the file, the cause and the newest complete checkpoint. Not a UsageError: it happens mid-run.
    errno and filename are the failed write's."""

    def __str__(self) -> str:
        return str(self.strerror)  # the whole message, without OSError's "[Errno N]" prefix


def package_version() -> str:
    """ddpm.__version__ when the package defines it, else the installed distribution's, else "unknown"."""
    try:
        import ddpm

        version = getattr(ddpm, "__version__", None)
        if version:
            return str(version)
    except ImportError:
        pass
    from importlib import metadata

    for dist in ("ddpm-flowers", "ddpm_flowers", "ddpm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


# ---------------------------------------------------------------------------------------------- save / load

_SAFE_SCALARS = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_loadable(obj, where: str = "state") -> None:
    """Raise TypeError naming the first value that weights_only loading would refuse.

    Checked at save time so a bad value is found when it is written, not months later at resume.
    """
    if isinstance(obj, _SAFE_SCALARS):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
        "cannot read back; store tensors, dicts, lists, str, int, float, bool or None"
    )


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows), so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replaced_atomically(path: Path):
    """Yield a temporary file name beside `path`; when the block succeeds, rename it onto `path` (atomic on
    POSIX and Windows), else delete it. Either way no half-written file is ever visible at `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (config.json, log.jsonl) so a kill mid-write leaves the old one, never half."""
    path = Path(path)
    with _replaced_atomically(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace.

    A crash (or an exception) during the write leaves the previous file at `path` untouched and no temp file.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint expects a dict, got {type(state).__name__}")
    _check_loadable(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The step_XXXXXXX.pt files in `run_dir`, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def _describe_folder(folder: Path) -> str:
    names = [p.name for p in list_checkpoints(folder)]
    if (folder / LATEST).exists():
        names.append(LATEST)
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    return f"checkpoints in {folder}: {', '.join(names)}" if names else f"{folder} holds no checkpoints"


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by save_checkpoint with torch.load(weights_only=True).

    `path` may also be a run folder: its newest checkpoint is read (see find_latest). mmap=True maps the
    tensors instead of reading them: a cheap look at the structure and config of a large checkpoint.
    Raises CheckpointNotFoundError (a FileNotFoundError) or CheckpointError, each naming the file.
    """
    path = Path(path)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointNotFoundError(
                f"no checkpoint found in the folder {path} (expected {LATEST} or step_XXXXXXX.pt)"
            )
        path = latest
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist; {_describe_folder(path.parent)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, EOFError, OSError... depending on where it broke
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            # weights_only refused to import a Python class or function: never unpickle such a file here
            raise CheckpointError(
                f"{path} holds pickled Python objects, which are not loaded because loading them "
                "could run arbitrary code; it is not a ddpm checkpoint (those hold only tensors "
                "and plain values)"
            ) from err
        others = [p.name for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
        hint = (
            f"try an earlier one from the same folder ({', '.join(others)})"
            if others
            else "no other checkpoint is in that folder"
        )
        raise CheckpointError(
            f"checkpoint {path} could not be read (truncated or corrupt? {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {hint}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; "
            "was it written by ddpm.checkpoint.save_checkpoint?"
        )
    return state


# ---------------------------------------------------------------------------------------------- run folder


def step_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"step_{step:07d}.pt"


def _update_latest(run_dir: Path, source: Path) -> None:
    """Point latest.pt at `source` atomically: a hard link (no extra disk) or, where links fail, a copy."""
    with _replaced_atomically(run_dir / LATEST) as tmp:
        os.unlink(tmp)  # os.link wants a free name
        try:
            os.link(source, tmp)
        except OSError:  # FAT, some network mounts: no hard links
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def save_run_checkpoint(run_dir: str | os.PathLike, state: dict, *, step: int, keep_last: int = 3) -> Path:
    """Save `state` as run_dir/step_XXXXXXX.pt, make it latest.pt, then drop all but the newest `keep_last`.

    keep_last <= 0 keeps every checkpoint. latest.pt is updated only after the step file is complete,
    so it always names a whole checkpoint.
    """
    run_dir = Path(run_dir)
    path = step_path(run_dir, step)
    try:
        save_checkpoint(path, state)
        _update_latest(run_dir, path)
    except OSError as err:  # disk full, quota, I/O: the atomic writes left every earlier file as it was
        newest = find_latest(run_dir)
        kept = f"the newest complete checkpoint is {newest}" if newest else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            err.errno,
            f"could not write the checkpoint {path} ({err.strerror or err}); "
            f"{kept}. Free some space (or fix the folder), then continue with --resume",
            str(path),
        ) from err
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in run_dir: latest.pt where it is the highest step_XXXXXXX.pt (or there are
    none), else that step file (a crash between writing it and relinking latest.pt), else None."""
    run_dir = Path(run_dir)
    latest, steps = run_dir / LATEST, list_checkpoints(run_dir)
    if latest.is_file() and (not steps or os.path.samefile(latest, steps[-1])):
        return latest
    return steps[-1] if steps else None


def check_run_state(state: dict, source: str | os.PathLike = "the checkpoint", *, resumable: bool = False):
    """The RunConfig stored in a checkpoint read by load_checkpoint; CheckpointError, naming `source`, when it
    is not a ddpm checkpoint (no config or weights), its config is not one this version can read, or, with
    resumable=True, it lacks what resuming needs (an exported model holds only the EMA weights)."""
    from .config import RunConfig

    weights = ("model",) if state.get("weights") == "ema" else ("model", "ema")
    needed = ("config", *weights, *(("optimizer", "step") if resumable else ()))
    missing = [k for k in needed if k not in state]
    if missing:
        what = (
            f"{source} is an exported model (EMA weights only): it can be sampled from, not resumed"
            if state.get("weights") == "ema" and resumable
            else f"{source} is not a ddpm checkpoint: it has no {', '.join(map(repr, missing))} "
            f"(its keys: {', '.join(map(str, list(state)[:8])) or 'none'})"
        )
        raise CheckpointError(f"{what}; pass a file written by ddpm.train (a run folder or its step_XXXXXXX.pt)")
    try:
        return RunConfig.from_dict(state["config"])
    except (TypeError, ValueError, AttributeError) as err:  # the config section is data from a file here
        raise CheckpointError(
            f"the config stored in {source} cannot be read by this version of ddpm "
            f"({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


def read_run_config(run_dir: str | os.PathLike, *, resumable: bool = True):
    """The RunConfig of the newest checkpoint in `run_dir` (or of that file), checked as check_run_state does;
    the tensors are only mapped, not read, so this is cheap even for a large checkpoint."""
    path = Path(run_dir)
    if path.is_dir() and find_latest(path) is not None:
        path = find_latest(path)  # named in the messages: the file, not the folder
    state = load_checkpoint(path, mmap=True)
    config = check_run_state(state, path, resumable=resumable)
    _check_weights_fit(state, config, path)
    return config


def _check_weights_fit(state: dict, config, source) -> None:
    """CheckpointError unless every weight tensor has the name and shape the config's UNet gives it
    (built on the meta device: no memory, no time, whatever the model's size)."""
    from .unet import UNet

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config.model).state_dict().items()}
    tables = [("model", state["model"])]
    if isinstance(state.get("ema"), dict) and isinstance(state["ema"].get("shadow"), dict):
        tables.append(("EMA", state["ema"]["shadow"]))
    for what, weights in tables:
        found = (
            {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
            if isinstance(weights, dict)
            else {}
        )
        wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        if wrong:
            k = wrong[0]
            raise CheckpointError(
                f"the {what} weights in {source} do not fit the model its config describes, so they "
                f"come from another architecture or the file was altered: {k} is "
                f"{found.get(k, 'missing')}, the model has {expected.get(k, 'no such weight')}"
                f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}"
            )


# ---------------------------------------------------------------------------------------------- run lock

LOCK = ".lock"
_TEMP_PATTERN = re.compile(r"^\..+\.tmp$")  # what _replaced_atomically's mkstemp names look like
_EMPTY_LOCK_GRACE_S = 10.0  # an empty lock (only without hard links) is being written; after this, its writer died


class RunLock:
    """One live run per folder: run_dir/.lock, created atomically with its record in it (the owner's pid,
    host and process start time). A second run is refused while the owner lives; a lock whose process is gone
    (killed, crashed, the machine rebooted) is stale and taken over. Re-entrant within one process, so a notebook can
    train the same folder again. Where the owner ran on another host the lock cannot be judged: it is refused,
    and the message says how to remove it.

        lock = RunLock(run_dir).acquire()    # RunFolderError when locked or not writable
        ...
        lock.release()                      # also: `with RunLock(run_dir):`

    Taking the lock also proves the folder writable, before any data is loaded, and clears the temporary
    files a killed writer left (no other writer can be running). release() removes the lock file, and the
    folders acquire() created if they are still empty, so a run refused at start leaves nothing behind.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.record = None
        self._created: list[Path] = []

    def acquire(self) -> RunLock:
        self._created = _make_dirs(self.run_dir)
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise
        _remove_stale_temps(self.run_dir)
        return self

    def release(self) -> None:
        """Remove the lock if it is still this object's; safe to call twice."""
        holder = _read_lock(self.path)
        if self.record is not None and holder is not None and holder.get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.record = None
        self._remove_created()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _take(self) -> None:
        record = _lock_record()
        for _ in range(3):  # a stale lock is broken, then the create is tried again
            try:
                _create_with(self.path, record)
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder is not None and _same_process(holder):  # this process again (a notebook re-running)
                    _write_replacing(self.path, record)
                    self.record = record
                    return
                if not _is_stale(holder, self.path):
                    raise RunFolderError(_locked_message(self.run_dir, holder)) from None
                _break_stale(self.path, holder)
                continue
            except FileNotFoundError as err:  # the lock holder cleared our prepared record as a stale temp: retry
                if not self.run_dir.is_dir():  # or the folder itself went away
                    raise RunFolderError(_unwritable_message(self.run_dir, err)) from err
                continue
            except OSError as err:
                raise RunFolderError(_unwritable_message(self.run_dir, err)) from err
            self.record = record
            return
        raise RunFolderError(f"could not take the lock {self.path}: other runs keep starting on {self.run_dir}")

    def _remove_created(self) -> None:
        for folder in reversed(self._created):  # deepest first; rmdir refuses a folder that holds anything
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _create_with(path: Path, record: dict) -> None:
    """Create `path` holding `record`, or raise FileExistsError. The record is written to a temporary file first
    and hard-linked into place (link never overwrites), so the lock is never seen empty, even if the writer is
    killed in between; where the file system has no hard links, O_EXCL and then the write."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _write_synced(fd, record)  # a full disk fails here, on the first block
        try:
            os.link(tmp, path)
            return
        except (FileExistsError, FileNotFoundError):
            raise
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
        _create_excl(path, record)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _create_excl(path: Path, record: dict) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        _write_synced(fd, record)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _write_synced(fd: int, record: dict) -> None:
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it created, outermost first."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, a read-only mount, no permission
        raise RunFolderError(_unwritable_message(folder, err)) from err
    return list(reversed(missing))


def _unwritable_message(run_dir: Path, err: OSError) -> str:
    return (
        f"cannot write to the run folder {run_dir} ({err.strerror or err}); choose another --out "
        "(out_dir), or free space / fix the permissions there"
    )


def _locked_message(run_dir: Path, holder: dict | None) -> str:
    if holder is None:
        return f"{run_dir} is locked ({run_dir / LOCK} is being written by a run starting there); try again"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    here = holder.get("host") == socket.gethostname()
    hint = (
        "stop that run first, or use another --out"
        if here
        else f"it runs on another machine, so whether it is still going cannot be checked from here; if it is not, "
        f"delete {run_dir / LOCK}"
    )
    who = f"pid {holder.get('pid')} on {holder.get('host')}, since {since}"
    return f"{run_dir} is in use by another run ({who}); {hint}"


def _lock_record() -> dict:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": _process_start(pid),
        "boot": _boot_id(),
        "time": time.time(),
        "token": uuid.uuid4().hex,
    }


def _read_lock(path: Path) -> dict | None:
    """The lock's record; None when the file is empty or unreadable (a writer between create and write)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_replacing(path: Path, record: dict) -> None:
    with _replaced_atomically(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(record))


def _same_process(holder: dict) -> bool:
    return (
        holder.get("pid") == os.getpid()
        and holder.get("host") == socket.gethostname()
        and holder.get("started") == _process_start(os.getpid())
    )


def _is_stale(holder: dict | None, path: Path) -> bool:
    """Whether the run that wrote the lock is certainly gone. Unknown (another host) counts as alive."""
    if holder is None:  # created but never written: stale once its writer has had ample time
        try:
            return time.time() - path.stat().st_mtime > _EMPTY_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return True  # the machine rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return True
    started = holder.get("started")
    return started is not None and _process_start(pid) not in (None, started)  # the pid was reused


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; no cheap check, so assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc); with the pid it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name before ")" may hold spaces


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _break_stale(path: Path, holder: dict | None) -> None:
    """Move the stale lock aside, and put it back if what moved was not it: another process may have broken
    the same stale lock and taken a fresh one in between (rename is atomic; unlink-then-create would race)."""
    aside = path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read_lock(aside)
    if moved != holder and moved is not None:
        with contextlib.suppress(OSError):
            os.link(aside, path)  # fails if yet another lock appeared: that one stands
    aside.unlink(missing_ok=True)


def _remove_stale_temps(run_dir: Path) -> None:
    """Delete the half-written temporary files of a writer that was killed (only called under the lock)."""
    for p in run_dir.iterdir():
        if _TEMP_PATTERN.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU, CUDA and MPS RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        # training on MPS draws its noise and timesteps from the MPS generator
        "mps": torch.mps.get_rng_state() if mps_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only where the same number of GPUs is visible."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    mps = state.get("mps")
    if mps is not None and mps_available():
        torch.mps.set_rng_state(mps.cpu())


# ---------------------------------------------------------------------------------------------- compatibility


def config_differences(saved: dict, current: dict, *, prefix: str = "") -> list[str]:
    """Key-by-key differences between two (nested) config dicts, as readable lines.

    Lists and tuples compare equal when their items do (JSON turns tuples into lists).
    """
    lines = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}{key}"
        if key not in current:
            lines.append(f"checkpoint has {name}={saved[key]!r}, this run has no {name}")
        elif key not in saved:
            lines.append(f"checkpoint has no {name}, this run has {name}={current[key]!r}")
        elif isinstance(saved[key], dict) and isinstance(current[key], dict):
            lines.extend(config_differences(saved[key], current[key], prefix=f"{name}."))
        elif _plain(saved[key]) != _plain(current[key]):
            lines.append(f"checkpoint has {name}={saved[key]!r}, this run has {current[key]!r}")
    return lines


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_compatible(saved: dict, current: dict, *, what: str = "config", source: str | os.PathLike = "") -> None:
    """Raise CheckpointError listing every difference between `saved` and `current` (config dicts)."""
    diffs = config_differences(saved, current)
    if diffs:
        where = f" {source}" if source else ""
        raise CheckpointError(
            f"the checkpoint{where} was made with a different {what}:\n  "
            + "\n  ".join(diffs)
            + "\nuse the same settings to resume, or start a new run folder"
        )


# ---------------------------------------------------------------------------------------------- models


def load_model(path, *, use_ema: bool = True, device=None):
    """(model in eval mode, NoiseSchedule, RunConfig) from a checkpoint file, a run folder (its latest) or
    an exported weights file (export_weights: the shipped models under checkpoints/)."""
    return model_from_state(load_checkpoint(path), use_ema=use_ema, device=device, source=path)


def model_from_state(state: dict, *, use_ema: bool = True, device=None, source="the checkpoint"):
    """load_model's work on a checkpoint already read by load_checkpoint (for its step, say)."""
    from .device import get_device
    from .unet import UNet, set_norm_path

    config = check_run_state(state, source)
    model = UNet(config.model)
    if state.get("weights") == "ema":  # an export holds only the averaged weights
        weights = state["model"]
    elif use_ema:
        weights = state["ema"].get("shadow") if isinstance(state["ema"], dict) else None
    else:
        weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(
            f"{source} holds no {'EMA' if use_ema else 'model'} weights (a dict of tensors) "
            "where a ddpm checkpoint has them"
        )
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    except RuntimeError as err:  # missing, unexpected or differently shaped weights
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        problems = lines[1:] or lines[:1]  # torch's first line is only "Error(s) in loading state_dict for UNet:"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{source} does not fit the model its config describes, so its weights come from "
            f"another architecture or the file was altered: {problems[0]}{more}"
        ) from err
    device = get_device(device)
    set_norm_path(model, device)
    return model.to(device).eval(), config.diffusion.make_schedule(), config


def available_models(root: str | os.PathLike) -> dict[str, Path]:
    """{name: path} of every model under `root`: the exported ones (NAME.pt, such as the models this repository
    ships in checkpoints/) and every run folder with a checkpoint (NAME/, its latest); exports first."""
    root = Path(root)
    exported = {p.stem: p for p in sorted(root.glob("*.pt"))}
    runs = (
        {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and find_latest(p) is not None}
        if root.is_dir()
        else {}
    )
    return {**exported, **{name if name not in exported else f"{name}/": path for name, path in runs.items()}}


def find_model(name_or_path, root: str | os.PathLike = "checkpoints") -> Path:
    """A model file or run folder: `name_or_path` itself where it exists, else that name under `root`
    (available_models); a CheckpointNotFoundError (a FileNotFoundError) listing what is there otherwise."""
    path = Path(name_or_path)
    if path.exists():
        return path
    models = available_models(root)
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    listing = ", ".join(models) or "none"
    raise CheckpointNotFoundError(
        f"no model {name_or_path!r}: not a path, and not a name under {root} (there: "
        f"{listing}); train one (python -m ddpm.train) or use a shipped one such as "
        "checkpoints/cpu64.pt"
    )


def export_weights(src, dst, *, dtype: torch.dtype = torch.float16, note: str = "") -> Path:
    """Write the EMA weights of checkpoint `src` in `dtype` with its config and step: no optimizer, RNG or data
    state, so a trained model ships in a few MB and loads with load_model like any checkpoint."""
    state = load_checkpoint(src)
    check_run_state(state, src)
    if state.get("weights") == "ema":
        raise CheckpointError(f"{src} is already an exported model; export from a run folder or its checkpoints")
    return save_checkpoint(dst, exported(state["ema"]["shadow"], state["config"], int(state["step"]), dtype, note))


def exported(weights: dict, config: dict, step: int, dtype: torch.dtype = torch.float16, note: str = "") -> dict:
    """The export format: averaged weights in `dtype` with the config and step, nothing else (load_model reads it)."""
    return {
        "format": 1,
        "version": package_version(),
        "weights": "ema",
        "dtype": str(dtype).replace("torch.", ""),
        "step": step,
        "config": config,
        "model": {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()},
        "note": note,
    }


# ---------------------------------------------------------------------------------------------- command lines


def one_line(err: BaseException | str) -> str:
    """A message on one line, for `error: ...` on a terminal or in a log: its lines joined where they broke."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    out = lines[0] if lines else type(err).__name__
    for line in lines[1:]:
        out += (" " if out.endswith((":", ".", ",", ";")) else "; ") + line
    return out


def exit_with_error(err: BaseException | str, code: int = 2):
    """`error: <message>` on stderr, one line, no traceback, then exit: status 2 for a UsageError (what the
    command lines do with one), 1 for a failure part-way through (a full disk, a lost DDP peer)."""
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(code)


class UsageParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error: ...` line (and a pointer to --help), exit status 2."""

    def error(self, message: str):
        exit_with_error(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> None:
    p = UsageParser(
        prog="python -m ddpm.checkpoint",
        description="Export a run's EMA weights (fp16, with its config) as one small file.",
    )
    p.add_argument("src", help="a checkpoint file or a run folder (its latest)")
    p.add_argument("dst", help="the file to write, e.g. checkpoints/cpu64.pt")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--note", default="", help="stored in the file, e.g. the command that trained it")
    args = p.parse_args(argv)
    try:
        out = export_weights(args.src, args.dst, dtype=getattr(torch, args.dtype), note=args.note)
    except UsageError as err:
        exit_with_error(err)
    except OSError as err:  # writing dst: reading src reports through CheckpointError
        exit_with_error(f"could not write {args.dst} ({err})", code=1)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
