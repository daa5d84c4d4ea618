"""The command lines on bad input: one `error: ...` line on stderr, exit status 2, no traceback, nothing written
or overwritten in the output folder, and a later good run unaffected.

Every case runs the CLI module as __main__ in a process of its own, with its own argv, cwd, stdout, stderr and
exit status. Importing torch costs seconds per process on a busy machine, so on Linux the processes are forked
from one runner that imported the heavy libraries once (the CLI modules themselves are not imported before the
fork: each child runs them fresh, as `python -m` does); elsewhere each case is a plain `python -m` subprocess.
test_entry_points_* run the literal `python -m ddpm.train` / `ddpm.sample` to prove that path too.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import tiny_cli_args

from ddpm import checkpoint as ckpt
from ddpm.device import mps_available

REPO = Path(__file__).resolve().parents[1]
# A 16 px, ~60k-parameter UNet (as tests/test_train.py's tiny()): a step takes milliseconds.
TINY = tiny_cli_args("--max-steps", "2", "--warmup_steps", "1")
UNAVAILABLE_DEVICE = "cuda" if not torch.cuda.is_available() else ("mps" if not mps_available() else None)

RUNNER = textwrap.dedent("""
    import atexit, json, os, runpy, sys, traceback
    import matplotlib
    matplotlib.use("Agg")
    import torch, torchvision  # noqa: F401 -- the slow imports, done once for every forked case
    import ddpm.checkpoint, ddpm.config, ddpm.data, ddpm.viz  # noqa: F401 -- not the CLI modules: they run fresh

    def child(case):
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(case["cwd"])
        os.environ.update(case["env"])
        if case["offline"]:  # the network boundary, as tests/test_data.py cuts it
            import urllib.error, urllib.request
            def offline(*args, **kwargs):
                raise urllib.error.URLError("no network in this test")
            urllib.request.urlopen = offline
        sys.argv = [case["module"], *case["argv"]]
        code = 1
        try:
            runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as err:  # what the interpreter does with sys.exit(...)
            code = err.code if isinstance(err.code, int) else 0 if err.code is None else 1
            if not isinstance(err.code, (int, type(None))):
                print(err.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            atexit._run_exitfuncs()  # what a normal exit runs: weakref finalizers, such as the run lock's release
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    for line in sys.stdin:
        case = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(case)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
""")


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "default",
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """cli(module, *argv, cwd=..., offline=False) -> Result: the CLI run as __main__ in a process of its own."""
    tmp = tmp_path_factory.mktemp("cli")
    runner = None
    if hasattr(os, "fork") and sys.platform.startswith("linux"):
        (tmp / "runner.py").write_text(RUNNER)
        runner = subprocess.Popen(
            [sys.executable, str(tmp / "runner.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
        )
    counter = iter(range(10**6))

    def run(module: str, *argv, cwd=REPO, offline: bool = False) -> Result:
        argv = [str(a) for a in argv]
        if runner is None:
            assert not offline, "offline cases need the forking runner"
            done = subprocess.run(
                [sys.executable, "-m", module, *argv], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300
            )
            return Result(done.returncode, done.stdout, done.stderr)
        n = next(counter)
        out, err = tmp / f"{n}.out", tmp / f"{n}.err"
        case = {
            "module": module,
            "argv": argv,
            "cwd": str(cwd),
            "env": {},
            "offline": offline,
            "stdout": str(out),
            "stderr": str(err),
        }
        runner.stdin.write(json.dumps(case) + "\n")
        runner.stdin.flush()
        reply = json.loads(runner.stdout.readline())
        return Result(reply["rc"], out.read_text(), err.read_text())

    yield run
    if runner is not None:
        runner.stdin.close()
        runner.wait(timeout=60)


def assert_user_error(result: Result, match: str) -> None:
    """One line on stderr, `error: ` first, the expected words in it, status 2, no traceback."""
    assert result.rc == 2, f"exit status {result.rc}; stderr:\n{result.err}"
    assert "Traceback" not in result.err, result.err
    assert len(result.lines()) == 1 and result.lines()[0].startswith("error: "), result.err
    assert match in result.lines()[0], f"{match!r} not in {result.lines()[0]!r}"


def snapshot(folder: Path) -> dict | None:
    """Every file under `folder` with its content hash (None: no folder): what "nothing changed" compares."""
    if not folder.exists():
        return None
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _photos(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / ("sub" if i % 3 == 0 else "") / f"photo{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def place(tmp_path_factory, cli):
    """The module's folders: clean photos, an empty folder, a file, and a good run trained 2 steps on the photos."""
    tmp = tmp_path_factory.mktemp("places")
    places = {
        "tmp": tmp,
        "photos": _photos(tmp / "photos"),
        "empty": tmp / "empty",
        "afile": tmp / "afile",
        "cache": tmp / "cache",
        "good": tmp / "good",
        "nodata": tmp / "nodata",
    }
    places["empty"].mkdir()
    places["nodata"].mkdir()  # a Flowers102 download is tried there (and fails offline); `empty` stays empty
    places["afile"].write_text("a file where a folder is expected")
    done = cli(
        "ddpm.train",
        *TINY,
        "--data.cache_dir",
        places["cache"],
        "--data-root",
        places["photos"],
        "--out",
        places["good"],
    )
    assert done.rc == 0, done.err
    places["good_snapshot"] = snapshot(places["good"])
    return places


def _fill(argv, place, **extra) -> list[str]:
    values = {k: v for k, v in place.items() if isinstance(v, Path)} | extra
    return [str(a).format(**values) for a in argv]


# ---------------------------------------------------------------------------------------------- train

NEW_RUN_CASES = [  # each with a fresh --out that must still not exist afterwards
    ("missing data folder", [*TINY, "--data-root", "{tmp}/no_such_folder"], "data folder"),
    (
        "empty data folder, folder source",
        [*TINY, "--data-root", "{empty}", "--data.source", "folder"],
        "no images (.jpg, .jpeg, .png, .webp) found under",
    ),
    (
        "empty data folder, folder preset",
        ["--preset", "folder32", "--data-root", "{empty}"],
        "and no flowers-102/ in it",
    ),
    ("data root is a file", [*TINY, "--data-root", "{afile}"], "is a file, not a folder"),
    ("unknown preset", ["--preset", "nope"], "invalid choice: 'nope'"),
    ("no preset", ["--data-root", "{photos}"], "--preset is required for a new run"),
    ("unknown override key", [*TINY, "--data-root", "{photos}", "--lrr", "1"], "unknown option --lrr"),
    (
        "override value of the wrong type",
        [*TINY, "--data-root", "{photos}", "--lr", "fast"],
        "--train.lr 'fast': expected float",
    ),
    ("override without a value", [*TINY, "--data-root", "{photos}", "--lr"], "--lr needs a value"),
    (
        "image size the UNet cannot take",
        ["--preset", "quick", "--image_size", "30", "--data-root", "{photos}"],
        "image_size=30 must be divisible",
    ),
    ("batch that does not split", [*TINY, "--data-root", "{photos}", "--grad_accum", "3"], "must divide evenly"),
    (
        "labels a folder does not have",
        [*TINY, "--data-root", "{photos}", "--train.conditional", "true"],
        "needs class labels",
    ),
    (
        "batch larger than the data",
        [*TINY, "--data-root", "{photos}", "--batch_size", "64"],
        "batch_size=64 is larger than rank 0's shard of 24 images",
    ),
    ("unwritable --out", [*TINY, "--data-root", "{photos}", "--out", "{afile}/run"], "cannot write to the run folder"),
    ("resume in a folder without checkpoints", ["--resume", "--out", "{empty}"], "holds no checkpoint"),
    ("flowers102 absent and no network", [*TINY, "--data-root", "{nodata}"], "download failed"),
]
if UNAVAILABLE_DEVICE:
    NEW_RUN_CASES.append(
        (
            "device not there",
            [*TINY, "--data-root", "{photos}", "--train.device", UNAVAILABLE_DEVICE],
            f"--train.device {UNAVAILABLE_DEVICE}:",
        )
    )


@pytest.mark.parametrize("argv, match", [c[1:] for c in NEW_RUN_CASES], ids=[c[0] for c in NEW_RUN_CASES])
def test_train_refuses_bad_input_in_one_line(cli, place, argv, match, request):
    out = place["tmp"] / "new" / request.node.callspec.id.replace(" ", "_")
    argv = _fill(argv, place)
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = {k: snapshot(place[k]) for k in ("empty", "photos")}
    result = cli("ddpm.train", *argv, "--data.cache_dir", place["cache"], offline="download" in match)
    assert_user_error(result, match)
    assert not out.exists(), f"{out} was created: {snapshot(out)}"
    assert {k: snapshot(place[k]) for k in ("empty", "photos")} == before
    assert place["afile"].read_text() == "a file where a folder is expected"


GOOD_RUN_CASES = [  # aimed at the good run's folder, which must not change at all
    (
        "a new run on an old run's folder",
        [*TINY, "--data-root", "{photos}"],
        "already holds checkpoints; pass --resume",
    ),
    (
        "resume with another architecture",
        ["--resume", "--model.base_channels", "32"],
        "different model config: checkpoint has base_channels=16, this run has 32",
    ),
    ("resume with a data folder that is not there", ["--resume", "--data-root", "{tmp}/moved"], "does not exist"),
]


@pytest.mark.parametrize("argv, match", [c[1:] for c in GOOD_RUN_CASES], ids=[c[0] for c in GOOD_RUN_CASES])
def test_train_refusals_leave_the_run_folder_untouched(cli, place, argv, match):
    result = cli("ddpm.train", *_fill(argv, place), "--out", place["good"])
    assert_user_error(result, match)
    assert snapshot(place["good"]) == place["good_snapshot"]


@pytest.fixture(scope="module")
def bad_checkpoints(place) -> dict[str, bytes]:
    """The good run's checkpoint as each way a checkpoint can be bad, as file contents."""
    good = place["good"]
    data = (good / "step_0000002.pt").read_bytes()
    tmp = place["tmp"] / "bad_checkpoints"
    tmp.mkdir()
    torch.save({"path": pathlib.PurePosixPath("/etc")}, tmp / "pickle.pt")  # a Python object: needs unpickling
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(3)}, tmp / "foreign.pt")  # a plain state_dict
    ckpt.export_weights(good, tmp / "export.pt")
    state = torch.load(good / "step_0000002.pt", weights_only=True)
    state["config"]["model"]["base_channels"] = 32  # weights of one architecture under another's config
    torch.save(state, tmp / "arch.pt")
    return {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00garbage" * 100,
        "pickle": (tmp / "pickle.pt").read_bytes(),
        "foreign": (tmp / "foreign.pt").read_bytes(),
        "export": (tmp / "export.pt").read_bytes(),
        "arch": (tmp / "arch.pt").read_bytes(),
    }


BAD_CHECKPOINT_MESSAGES = {
    "truncated": "could not be read (truncated or corrupt?",
    "garbage": "could not be read (truncated or corrupt?",
    "pickle": "holds pickled Python objects",
    "foreign": "is not a ddpm checkpoint: it has no 'config'",
    "export": "is an exported model (EMA weights only): it can be sampled from, not resumed",
    "arch": "do not fit the model its config describes",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINT_MESSAGES))
def test_resume_refuses_a_bad_newest_checkpoint(cli, place, bad_checkpoints, kind):
    run = place["tmp"] / f"bad_{kind}"
    run.mkdir()
    (run / "step_0000002.pt").write_bytes(bad_checkpoints[kind])
    before = snapshot(run)
    result = cli("ddpm.train", "--resume", "--out", run)
    assert_user_error(result, BAD_CHECKPOINT_MESSAGES[kind])
    assert str(run / "step_0000002.pt") in result.err
    assert snapshot(run) == before


def test_a_live_run_holds_its_folder(cli, place):
    lock = ckpt.RunLock(place["good"]).acquire()  # this test process is the live run
    try:
        result = cli("ddpm.train", "--resume", "--out", place["good"], "--max-steps", "4")
    finally:
        lock.release()
    assert_user_error(result, f"is in use by another run (pid {os.getpid()}")
    assert snapshot(place["good"]) == place["good_snapshot"]


# ---------------------------------------------------------------------------------------------- sample

SAMPLE_CASES = [
    ("missing checkpoint", ["--ckpt", "{tmp}/nope.pt"], "does not exist"),
    ("empty run folder", ["--ckpt", "{empty}"], "no checkpoint found in the folder"),
    *[
        (f"{kind} checkpoint", ["--ckpt", "{bad}"], BAD_CHECKPOINT_MESSAGES[kind])
        for kind in ("truncated", "garbage", "pickle", "foreign")
    ],
    ("another architecture's weights", ["--ckpt", "{bad}"], "does not fit the model its config describes"),
    ("--n 0", ["--ckpt", "{good}", "--n", "0"], "--n 0: must be at least 1"),
    ("--steps 0", ["--ckpt", "{good}", "--steps", "0"], "--steps 0: must be at least 1"),
    ("--steps beyond T", ["--ckpt", "{good}", "--steps", "5000"], "--steps 5000: this model was trained with 1000"),
    ("--n not a number", ["--ckpt", "{good}", "--n", "many"], "argument --n: invalid int value: 'many'"),
    ("--batch-size 0", ["--ckpt", "{good}", "--batch-size", "0"], "--batch-size 0"),
    ("--out not an image", ["--ckpt", "{good}", "--out", "{tmp}/grid.txt"], "name an image file"),
    ("--out under a file", ["--ckpt", "{good}", "--out", "{afile}/grid.png"], "cannot write there"),
    ("--class-label on an unconditional model", ["--ckpt", "{good}", "--class-label", "3"], "unconditional"),
    ("--eta without ddim", ["--ckpt", "{good}", "--eta", "0.5", "--method", "dpmpp_2m"], "ddim only"),
    ("--classes on an unconditional model", ["--ckpt", "{good}", "--classes", "1,2"], "--classes needs a class-cond"),
    ("--classes not numbers", ["--ckpt", "{good}", "--classes", "rose"], "not a comma-separated list of class"),
    ("--classes with --class-label", ["--ckpt", "{good}", "--classes", "1", "--class-label", "1"], "use one"),
    ("--per-class 0", ["--ckpt", "{good}", "--classes", "1", "--per-class", "0"], "--per-class 0: must be at least 1"),
]
if UNAVAILABLE_DEVICE:
    SAMPLE_CASES.append(
        ("device not there", ["--ckpt", "{good}", "--device", UNAVAILABLE_DEVICE], f"--device {UNAVAILABLE_DEVICE}:")
    )


@pytest.mark.parametrize("argv, match", [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses_bad_input_in_one_line(cli, place, bad_checkpoints, argv, match, request):
    case = request.node.callspec.id
    bad = place["tmp"] / f"sample_{case.split()[0]}.pt"
    if "{bad}" in argv:
        bad.write_bytes(bad_checkpoints["arch" if "architecture" in case else case.split()[0]])
    grid = place["tmp"] / "sample_out" / "grid.png"
    argv = _fill(argv, place, bad=bad)
    defaults = {"--n": "2", "--steps": "2", "--out": str(grid), "--device": "cpu"}
    argv += [x for k, v in defaults.items() if k not in argv for x in (k, v)]
    result = cli("ddpm.sample", *argv, "--no-progress")
    assert_user_error(result, match)
    assert not grid.parent.exists()
    assert snapshot(place["good"]) == place["good_snapshot"]


def test_sample_draws_one_labelled_row_per_class(cli, flowers_root, tmp_path):
    run = tmp_path / "cond"
    flowers = ["--data-root", flowers_root, "--data.source", "flowers102", "--train.conditional", "true"]
    done = cli("ddpm.train", *tiny_cli_args(*flowers, "--max-steps", "2", "--out", run))
    assert done.rc == 0, done.err
    out = tmp_path / "classes.png"
    draw = ["--ckpt", run, "--per-class", "3", "--steps", "2", "--device", "cpu", "--no-progress", "--out", out]
    done = cli("ddpm.sample", *draw, "--classes", "5,101", "--guidance-scale", "2")
    assert done.rc == 0, done.err
    with Image.open(out) as grid:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 3 per row, one row per class (16 px, padding 2)
    assert len(list((tmp_path / "classes").glob("*.png"))) == 6 and (tmp_path / "classes_labelled.png").is_file()
    assert "rows labelled by class" in done.out
    assert_user_error(cli("ddpm.sample", *draw, "--classes", "5,102"), "--classes 102: this model has classes 0 to 101")


# ---------------------------------------------------------------------------------------------- after all that


def test_the_good_run_goes_on_after_every_refusal(cli, place):
    # (runs after the refusals above: pytest keeps a module's order)
    assert snapshot(place["good"]) == place["good_snapshot"]
    resumed = cli("ddpm.train", "--resume", "--out", place["good"], "--max-steps", "4", "--no-progress")
    assert resumed.rc == 0, resumed.err
    assert ckpt.load_checkpoint(place["good"])["step"] == 4 and not (place["good"] / ".lock").exists()
    grid = place["tmp"] / "final" / "grid.png"
    sampled = cli(
        "ddpm.sample",
        "--ckpt",
        place["good"],
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        grid,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert sampled.rc == 0, sampled.err
    assert grid.is_file() and sorted(p.name for p in (grid.parent / "grid").iterdir()) == ["000.png", "001.png"]


# ---------------------------------------------------------------------------------------------- what the data is


def test_data_root_source_is_detected(cli, place, flowers_root):
    def printed(*argv):
        result = cli("ddpm.train", *argv, "--out", place["tmp"] / "never", "--print-config")
        assert result.rc == 0, result.err
        return json.loads(result.out)["data"]

    # a Flowers102 preset on a folder of photos trains on the photos (it used to stop: "not a Flowers102 layout")
    assert printed("--preset", "quick", "--data-root", place["photos"])["source"] == "folder"
    # and a folder preset on a Flowers102 root reads it as Flowers102 (labels and splits included)
    assert printed("--preset", "folder32", "--data-root", flowers_root)["source"] == "flowers102"
    # an explicit source wins
    assert (
        printed("--preset", "quick", "--data-root", place["photos"], "--data.source", "flowers102")["source"]
        == "flowers102"
    )
    assert (
        printed("--preset", "quick", "--data-root", place["photos"], "--source", "flowers102")["source"] == "flowers102"
    )


def test_skipped_files_are_named_with_the_count_used(cli, place):
    photos = _photos(place["tmp"] / "with_broken", n=10)
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    result = cli(
        "ddpm.train",
        *TINY,
        "--data-root",
        photos,
        "--data.cache_dir",
        place["cache"],
        "--out",
        place["tmp"] / "broken_run",
    )
    assert result.rc == 0, result.err
    assert "skipped 1 unreadable file(s) under" in result.err and "using the other 10: broken.png (" in result.err


# ---------------------------------------------------------------------------------------------- make demo


def _notebook_folder(folder: Path) -> Path:
    import nbformat

    folder.mkdir(parents=True)
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell('QUICK = False\nDATA_ROOT = "nowhere"', metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell('open("ran.txt", "w").write("ran")'),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_marker.ipynb")
    return folder


def test_demo_without_data_stops_once_before_any_notebook(cli, place):
    notebooks = _notebook_folder(place["tmp"] / "demo" / "notebooks")
    out, data = place["tmp"] / "demo" / "runs", place["tmp"] / "demo" / "data"
    data.mkdir()
    result = cli("ddpm.demo", "--dir", notebooks, "--out", out, "--data-root", data, offline=True)
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    assert result.err.startswith("error: Oxford Flowers102 not found under") and result.err.count("error:") == 1
    for name in ("102flowers.tgz", "imagelabels.mat", "setid.mat"):
        assert f"https://www.robots.ox.ac.uk/~vgg/data/flowers/102/{name}" in result.err
    assert str(data / "flowers-102") in result.err
    assert not out.exists() and not (notebooks / "ran.txt").exists() and "running" not in result.out


def test_demo_needs_a_notebooks_folder_where_it_runs(cli, place):
    result = cli("ddpm.demo", cwd=place["empty"])
    assert_user_error(result, "no notebooks folder")
    assert "--dir" in result.err and list(place["empty"].iterdir()) == []


# ---------------------------------------------------------------------------------------------- literal entry points


def test_entry_points_report_user_errors_without_traceback(place):
    for argv, match in (
        (["ddpm.train", "--preset", "nope", "--out", place["tmp"] / "x"], "invalid choice"),
        (["ddpm.sample", "--ckpt", place["tmp"] / "nope.pt"], "does not exist"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300
        )
        assert_user_error(Result(done.returncode, done.stdout, done.stderr), match)
