"""Run every notebook top to bottom (what `make demo` does), QUICK by default.

    python -m ddpm.demo                      # notebooks/*.ipynb in QUICK mode -> notebooks/runs/
    python -m ddpm.demo 02 04                # only the notebooks whose names start with 02 or 04
    python -m ddpm.demo --full               # the real settings (CUDA or MPS; hours, not minutes)

Run it from the repository root (`make demo` does): the notebooks are read from ./notebooks and the data is
./data unless --dir, --data-root or $DATA_ROOT say otherwise. Before any notebook starts, Flowers102 is made
sure of (downloaded into the data folder if missing, as the notebooks would); without it the demo stops
at once with the one message that says what to download and where to put it (exit status 2).

Each notebook runs with papermill in its own folder (notebooks/, so its relative paths mean what they
mean in Jupyter), with the parameters QUICK and DATA_ROOT injected after its `parameters` cell. The
executed copies, outputs included, go to the output folder; the notebooks themselves are never modified.
Exit status 1 names the notebooks that failed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import UsageError
from .data import ensure_flowers102

# Relative to the current directory, which `make demo` sets to the repository root: no guess from where the
# package happens to be installed.
NOTEBOOK_DIR = Path("notebooks")
DEFAULT_OUT = NOTEBOOK_DIR / "runs"
DEFAULT_DATA_ROOT = Path("data")
# The folder `import ddpm` resolves from: the kernels get it on PYTHONPATH, so a checkout that was never
# pip-installed still imports (the package's own location, not a guess about the repository).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


@dataclass
class NotebookRun:
    name: str
    output: Path
    seconds: float
    error: str | None = None  # the failing cell's exception, one line; None when it ran through
    cpu_seconds: float | None = None  # CPU time of the kernel (user + system), where the OS reports it

    @property
    def ok(self) -> bool:
        return self.error is None


def notebook_paths(folder: str | os.PathLike = NOTEBOOK_DIR, *, select: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in `folder`, in order; `select` keeps those whose names start with one of them."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"no notebooks folder {Path(folder).resolve()}: run from the repository root "
            "(as `make demo` does), or pass --dir FOLDER"
        )
    paths = sorted(p for p in Path(folder).glob("[0-9]*.ipynb"))
    if select:
        paths = [p for p in paths if any(p.name.startswith(s) for s in select)]
        if not paths:
            raise FileNotFoundError(f"no notebook in {folder} starts with any of {select}")
    return paths


def parameter_names(path: str | os.PathLike) -> set[str]:
    """Names assigned in the notebook's cell tagged `parameters` (papermill's own inspector skips
    assignments that are not plain literals, such as QUICK = os.environ.get(...) == "1")."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return set()
    tree = ast.parse("\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    targets = [
        t
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
    ]
    names = set()
    for target in targets:
        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


class _QuietPapermill(logging.Filter):
    """Drop papermill's warnings about parameters it cannot parse (QUICK = os.environ.get(...) == "1"):
    parameter_names() already checked them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Unable to parse line", "Passed unknown parameter"))


@contextlib.contextmanager
def _quiet_papermill():
    loggers, quiet = [logging.getLogger("papermill"), logging.getLogger("papermill.translators")], _QuietPapermill()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@contextlib.contextmanager
def _kernel_env(extra: dict[str, str]):
    """Environment for the kernels papermill starts: this ddpm on PYTHONPATH (so `import ddpm` works
    even where the package is not pip-installed) plus `extra`; restored afterwards."""
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_notebook(
    path: str | os.PathLike, out_dir: str | os.PathLike, *, parameters: dict | None = None, timeout: float | None = None
) -> NotebookRun:
    """Execute one notebook with papermill (cwd = its folder) into out_dir/<same name>.

    Only the parameters the notebook's `parameters` cell defines are injected (papermill warns about
    others). Never raises for a failing cell: the error is returned in NotebookRun.error.
    """
    import papermill as pm

    path, out_dir = Path(path).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    declared = parameter_names(path)
    params = {k: v for k, v in (parameters or {}).items() if k in declared}
    quick = {"QUICK": "1"} if params.get("QUICK") else {}
    start, cpu_start = time.perf_counter(), _children_cpu()
    error = None
    with _kernel_env(quick), _quiet_papermill():
        try:
            pm.execute_notebook(
                str(path),
                str(output),
                parameters=params,
                cwd=str(path.parent),
                kernel_name="python3",
                language="python",
                progress_bar=False,
                execution_timeout=timeout,
            )
        except Exception as err:  # noqa: BLE001 -- a failing cell, a dead kernel: reported, and the next notebook runs
            name = getattr(err, "ename", type(err).__name__)
            value = getattr(err, "evalue", str(err))
            error = f"{name}: {value}".splitlines()[0]
    cpu = _children_cpu()
    return NotebookRun(
        path.name,
        output,
        time.perf_counter() - start,
        error,
        cpu - cpu_start if cpu is not None and cpu_start is not None else None,
    )


def _children_cpu() -> float | None:
    """CPU seconds of this process's finished children (the kernels), or None where unavailable (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_notebooks(
    paths=None,
    *,
    out_dir: str | os.PathLike = DEFAULT_OUT,
    quick: bool = True,
    data_root: str | os.PathLike | None = None,
    parameters: dict | None = None,
    timeout: float | None = None,
    verbose: bool = True,
) -> list[NotebookRun]:
    """Execute notebooks in order (default: all of notebooks/) with QUICK and DATA_ROOT set.

    data_root: default $DATA_ROOT, else ./data; made absolute (the notebooks run in notebooks/).
    parameters: more papermill parameters, e.g. {"CHECKPOINT_ROOT": "/tmp/ckpt"} (absolute paths).
    Later notebooks reuse what earlier ones wrote (04 samples the checkpoint 03 trained).
    """
    paths = notebook_paths() if paths is None else [Path(p) for p in paths]
    root = data_root_of(data_root)
    params = {"QUICK": quick, "DATA_ROOT": str(root), **(parameters or {})}
    runs = []
    for path in paths:
        if verbose:
            print(f"{path.name} ...", flush=True)
        run = run_notebook(path, out_dir, parameters=params, timeout=timeout)
        runs.append(run)
        if verbose:
            status = "ok" if run.ok else f"FAILED ({run.error})"
            cpu = f" ({run.cpu_seconds:.0f} s CPU)" if run.cpu_seconds is not None else ""
            print(f"  {status} in {run.seconds:.0f} s{cpu} -> {run.output}", flush=True)
    return runs


def data_root_of(data_root: str | os.PathLike | None = None) -> Path:
    """The data folder the notebooks get: `data_root`, else $DATA_ROOT, else ./data; absolute."""
    return Path(data_root or os.environ.get("DATA_ROOT") or DEFAULT_DATA_ROOT).expanduser().resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("select", nargs="*", help="run only notebooks whose names start with these (e.g. 02 04)")
    p.add_argument("--full", action="store_true", help="the real settings instead of QUICK (needs a GPU)")
    p.add_argument("--dir", default=str(NOTEBOOK_DIR), help=f"folder of numbered notebooks (default {NOTEBOOK_DIR})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder for executed copies (default {DEFAULT_OUT})")
    p.add_argument(
        "--data-root",
        default=None,
        help=f"overrides $DATA_ROOT (the folder holding flowers-102/); default {DEFAULT_DATA_ROOT}/",
    )
    p.add_argument(
        "--no-data-check",
        action="store_true",
        help="start the notebooks without first making sure Flowers102 is there (notebooks that bring their own data)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per cell (default: no limit)")
    args = p.parse_args(argv)
    try:
        paths = notebook_paths(args.dir, select=args.select)
        if not args.no_data_check:
            # every notebook reads Flowers102: fail once here, not five times with the same error
            ensure_flowers102(data_root_of(args.data_root))
    except (FileNotFoundError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)  # the download instructions keep their lines
        return 2
    mode = "full" if args.full else "QUICK"
    print(f"running {len(paths)} notebook(s) in {mode} mode -> {args.out}")
    runs = run_notebooks(paths, out_dir=args.out, quick=not args.full, data_root=args.data_root, timeout=args.timeout)
    failed = [r for r in runs if not r.ok]
    total = sum(r.seconds for r in runs)
    print(f"{len(runs) - len(failed)} of {len(runs)} notebooks ran through in {total:.0f} s")
    if failed:
        print("failed: " + ", ".join(f"{r.name} ({r.error}; see {r.output})" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
