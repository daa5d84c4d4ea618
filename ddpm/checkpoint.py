"""Checkpoints: atomic save, weights_only load, a run folder of step_XXXXXXX.pt files, resume checks.

A checkpoint is a plain dict that `torch.load(..., weights_only=True)` can read back: tensors, dicts,
lists, str, int, float, bool and None only. Configs are stored as plain dicts, RNG states as tensors and
lists. That keeps loading safe (no arbitrary pickles) and lets any later version of the code read it.

Run folder layout:
    run_dir/config.json          the resolved RunConfig
    run_dir/step_0001000.pt      the last `keep_last` checkpoints
    run_dir/latest.pt            the newest checkpoint (a hard link where the filesystem has them, else a copy)
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .device import mps_available

STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
LATEST = "latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt) or does not fit this run."""


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
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
                    "cannot read back; store tensors, dicts, lists, str, int, float, bool or None")


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


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint with torch.load(weights_only=True).

    `path` may also be a run folder: its newest checkpoint is read (see find_latest).
    """
    path = Path(path)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint found in the folder {path} (expected {LATEST} or step_XXXXXXX.pt)")
        path = latest
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {_describe_folder(path.parent)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... depending on where it broke
        others = [p.name for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
        hint = (f"try an earlier one from the same folder ({', '.join(others)})" if others
                else "no other checkpoint is in that folder")
        raise CheckpointError(f"checkpoint {path} could not be read (truncated or corrupt? {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); {hint}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict; "
                              "was it written by ddpm.checkpoint.save_checkpoint?")
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
    path = save_checkpoint(step_path(run_dir, step), state)
    _update_latest(run_dir, path)
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


# ---------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU, CUDA and MPS RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {"bit_generator": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
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
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
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
        raise CheckpointError(f"the checkpoint{where} was made with a different {what}:\n  " + "\n  ".join(diffs)
                              + "\nuse the same settings to resume, or start a new run folder")


# ---------------------------------------------------------------------------------------------- models

def load_model(path, *, use_ema: bool = True, device=None):
    """(model in eval mode, NoiseSchedule, RunConfig) from a checkpoint file, a run folder (its latest) or
    an exported weights file (export_weights: the shipped models under checkpoints/)."""
    return model_from_state(load_checkpoint(path), use_ema=use_ema, device=device, source=path)


def model_from_state(state: dict, *, use_ema: bool = True, device=None, source="the checkpoint"):
    """load_model's work on a checkpoint already read by load_checkpoint (for its step, say)."""
    from .config import RunConfig
    from .device import get_device
    from .unet import UNet, set_norm_path

    config = RunConfig.from_dict(state["config"])
    model = UNet(config.model)
    if state.get("weights") == "ema":  # an export holds only the averaged weights
        weights = state["model"]
    elif use_ema:
        weights = state["ema"]["shadow"]
    else:
        weights = state["model"]
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit the model its config describes: "
                              f"{str(err).splitlines()[0]}") from err
    device = get_device(device)
    set_norm_path(model, device)
    return model.to(device).eval(), config.diffusion.make_schedule(), config


def available_models(root: str | os.PathLike) -> dict[str, Path]:
    """{name: path} of every model under `root`: the exported ones (NAME.pt, such as the models this repository
    ships in checkpoints/) and every run folder with a checkpoint (NAME/, its latest); exports first."""
    root = Path(root)
    exported = {p.stem: p for p in sorted(root.glob("*.pt"))}
    runs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and find_latest(p) is not None} \
        if root.is_dir() else {}
    return {**exported, **{name if name not in exported else f"{name}/": path for name, path in runs.items()}}


def find_model(name_or_path, root: str | os.PathLike = "checkpoints") -> Path:
    """A model file or run folder: `name_or_path` itself where it exists, else that name under `root`
    (available_models); a clear error listing what is there otherwise."""
    path = Path(name_or_path)
    if path.exists():
        return path
    models = available_models(root)
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    listing = ", ".join(models) or "none"
    raise FileNotFoundError(f"no model {name_or_path!r}: not a path, and not a name under {root} (there: {listing}); "
                            "train one (python -m ddpm.train) or use a shipped one such as checkpoints/cpu64.pt")


def export_weights(src, dst, *, dtype: torch.dtype = torch.float16, note: str = "") -> Path:
    """Write the EMA weights of checkpoint `src` in `dtype` with its config and step: no optimizer, RNG or data
    state, so a trained model ships in a few MB and loads with load_model like any checkpoint."""
    state = load_checkpoint(src)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state["ema"]["shadow"].items()}
    export = {"format": 1, "version": package_version(), "weights": "ema", "dtype": str(dtype).replace("torch.", ""),
              "step": int(state["step"]), "config": state["config"], "model": weights, "note": note}
    return save_checkpoint(dst, export)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ddpm.checkpoint",
                                description="Export a run's EMA weights (fp16, with its config) as one small file.")
    p.add_argument("src", help="a checkpoint file or a run folder (its latest)")
    p.add_argument("dst", help="the file to write, e.g. checkpoints/cpu64.pt")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--note", default="", help="stored in the file, e.g. the command that trained it")
    args = p.parse_args(argv)
    try:
        out = export_weights(args.src, args.dst, dtype=getattr(torch, args.dtype), note=args.note)
    except (CheckpointError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
