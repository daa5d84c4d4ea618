"""Faults, through real processes: a run SIGKILLed at any moment (mid-save included) resumes to the weights of a
run never interrupted, bit for bit; a save that fails keeps the previous checkpoint and says what failed; a second
run on a live run's folder is refused; a DDP process that dies stops the others with a clear error, soon.

The faults are planted by a small wrapper script (written to tmp_path) that patches torch.save, the latest.pt
update or the training loss in its own process, then calls ddpm.train.main: nothing in the library knows about it.
"""

import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from PIL import Image
from run_helpers import assert_identical, tiny_cli_args

from ddpm import checkpoint as ckpt

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the fault wrapper need POSIX")

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
TINY = tiny_cli_args(
    "--warmup_steps", "2", "--keep_last", "0", "--max-steps", str(STEPS),
    # dropout draws random numbers: the resumed RNG state must be the right one
    "--model.dropout", "0.1",
)  # fmt: skip

WRAPPER = textwrap.dedent('''
    """python wrapper.py MODE N MARKER -- ARGS: ddpm.train.main(ARGS) with one fault planted at the Nth event.

    stall-save:   the Nth torch.save into the run folder writes half its bytes, then waits to be killed
    stall-latest: the Nth latest.pt update waits to be killed (its step_XXXXXXX.pt is complete)
    enospc:       the Nth torch.save into the run folder fails: no space left on device
    die:          the process SIGKILLs itself at its Nth training-loss call
    Waiting writes this process's pid to MARKER first, so the test knows the moment has come.
    """
    import errno, io, os, signal, sys, time
    from pathlib import Path
    import torch
    import ddpm.checkpoint as ckpt
    from ddpm import diffusion, train

    mode, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    out = Path(args[args.index("--out") + 1]).resolve()
    count = [0]

    def reached():
        count[0] += 1
        return count[0] == n

    def wait_to_be_killed():
        marker.write_text(str(os.getpid()))
        time.sleep(600)

    real_save, real_update, real_loss = torch.save, ckpt._update_latest, diffusion.training_loss

    def save(obj, f, *a, **k):
        if Path(getattr(f, "name", "")).resolve().parent == out and reached():
            if mode == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            buffer = io.BytesIO()
            real_save(obj, buffer, *a, **k)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            wait_to_be_killed()
        return real_save(obj, f, *a, **k)

    def update_latest(run_dir, source):
        if reached():
            wait_to_be_killed()
        return real_update(run_dir, source)

    def loss(*a, **k):
        if reached():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(*a, **k)

    if mode in ("stall-save", "enospc"):
        torch.save = save
    elif mode == "stall-latest":
        ckpt._update_latest = update_latest
    elif mode == "die":
        diffusion.training_loss = loss
    train.main(args)
''')


def _env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Photos, a shared data cache, the wrapper script, and a reference run that was never interrupted."""
    tmp = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(1)
    for i in range(32):
        (tmp / "photos").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp / "photos" / f"{i:02d}.png")
    (tmp / "wrapper.py").write_text(WRAPPER)
    args = [*TINY, "--data-root", str(tmp / "photos"), "--data.cache_dir", str(tmp / "cache")]
    done = subprocess.run(
        [sys.executable, "-m", "ddpm.train", *args, "--out", str(tmp / "reference")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return tmp, args


def _start(setup, out: Path, *extra, mode: str = "none", n: int = 0, env=None) -> tuple[subprocess.Popen, Path]:
    tmp, args = setup
    marker = tmp / f"marker-{time.monotonic_ns()}"
    command = [
        sys.executable,
        str(tmp / "wrapper.py"),
        mode,
        str(n),
        str(marker),
        "--",
        *args,
        *extra,
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**(env or {})), cwd=REPO
    )
    return proc, marker


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll (quickly: a moment can be short) until `condition()`; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _step(path: Path) -> int:
    return int(ckpt.load_checkpoint(path)["step"])


def _logged_steps(run: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _assert_same_training_state(a: Path, b: Path) -> None:
    sa, sb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    for key in ("step", "model", "ema", "optimizer", "scaler", "rng", "data"):
        assert_identical(sa[key], sb[key], key)


def test_killed_at_any_moment_the_run_resumes_to_the_same_weights(setup):
    tmp, _ = setup
    run = tmp / "killed"

    # 1. killed while starting, before any checkpoint: a fresh start is what is left to do
    proc, _ = _start(setup, run)
    _wait_for(lambda: (run / ckpt.LOCK).exists(), proc, "the run took its lock")
    _kill(proc)
    assert ckpt.find_latest(run) is None

    # 2. killed half way through writing step_0000004.pt (its second save)
    proc, marker = _start(setup, run, mode="stall-save", n=2)
    _wait_for(marker.exists, proc, "the second checkpoint was half written")
    _kill(proc)
    half = list(run.glob(".step_0000004.pt.*.tmp"))
    assert len(half) == 1 and half[0].stat().st_size > 0  # the torn write is there, under a temporary name
    assert not (run / "step_0000004.pt").exists()
    assert ckpt.find_latest(run) == run / "latest.pt" and _step(run / "latest.pt") == 2

    # 3. resumed, then killed between writing step_0000006.pt and pointing latest.pt at it; meanwhile a second
    #    run on the same folder is refused, because this one is alive
    proc, marker = _start(setup, run, "--resume", mode="stall-latest", n=2)
    _wait_for(marker.exists, proc, "step 6 was written and latest.pt not yet updated")
    assert not list(run.glob(".*.tmp")), "the killed writer's temporary file should be gone once the lock was taken"
    second = subprocess.run(
        [sys.executable, "-m", "ddpm.train", "--resume", "--out", str(run)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert second.returncode == 2 and second.stderr.startswith("error: ") and len(second.stderr.splitlines()) == 1
    assert f"is in use by another run (pid {proc.pid} on {socket.gethostname()}" in second.stderr
    _kill(proc)
    assert _step(run / "latest.pt") == 4 and _step(run / "step_0000006.pt") == 6
    assert ckpt.find_latest(run) == run / "step_0000006.pt"  # the newest complete one, though latest.pt lags

    # 4. resumed, then killed wherever it happens to be once step 7 is logged
    proc, _ = _start(setup, run, "--resume")
    _wait_for(lambda: 7 in _logged_steps(run), proc, "step 7 was logged")
    _kill(proc)
    assert _step(ckpt.find_latest(run)) >= 6

    # 5. resumed to the end: the same weights, optimizer, EMA, RNG and data position as the uninterrupted run
    done = _finish(_start(setup, run, "--resume")[0])
    assert done.returncode == 0, done.stderr
    _assert_same_training_state(run / "latest.pt", tmp / "reference" / "latest.pt")
    reference_log = (tmp / "reference" / "log.jsonl").read_text().splitlines()
    log = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in log] == [json.loads(r)["loss"] for r in reference_log]
    assert not (run / ckpt.LOCK).exists() and not list(run.glob(".*.tmp"))


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_what_failed(setup):
    tmp, _ = setup
    run = tmp / "disk_full"
    done = _finish(_start(setup, run, mode="enospc", n=2)[0])  # the disk fills up at step 4's save
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        f"error: could not write the checkpoint {run / 'step_0000004.pt'} "
        f"({os.strerror(errno.ENOSPC)}); the newest complete checkpoint is {run / 'latest.pt'}"
    )
    assert "--resume" in last
    assert _step(ckpt.find_latest(run)) == 2 and not list(run.glob(".*.tmp")) and not (run / ckpt.LOCK).exists()
    resumed = _finish(_start(setup, run, "--resume")[0])  # space freed: the run goes on as if nothing happened
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_training_state(run / "latest.pt", tmp / "reference" / "latest.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with Gloo")
def test_when_a_ddp_process_dies_the_others_stop_soon_with_a_clear_error(setup):
    tmp, _ = setup
    run = tmp / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank, mode in ((0, "none"), (1, "die")):  # rank 1 is SIGKILLed at its 5th step, after step 4's checkpoint
        env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        procs.append(_start(setup, run, mode=mode, n=5, env=env)[0])
    procs[1].wait(timeout=300)
    died = time.monotonic()
    assert procs[1].returncode == -signal.SIGKILL, procs[1].stderr.read()
    survivor = _finish(procs[0])
    assert time.monotonic() - died < 60, "the surviving process took too long to notice"
    assert survivor.returncode == 1, survivor.stderr
    last = survivor.stderr.splitlines()[-1]
    assert last.startswith("error: process 0 of 2 of this DDP run stopped") and "--resume" in last, last
    latest = ckpt.find_latest(run)
    assert str(latest) in last and _step(latest) == 4
    model, _, _ = ckpt.load_model(latest, device="cpu")  # the checkpoint written before stays loadable
    assert not model.training and not (run / ckpt.LOCK).exists()


def test_the_lock_lives_as_long_as_the_training_call(setup, tmp_path):
    from ddpm import config as C
    from ddpm import train as T

    photos = setup[0] / "photos"
    cfg = C.preset(
        "quick",
        **{
            "image_size": 16,
            "model.base_channels": 16,
            "model.channel_mults": (1, 2),
            "model.groups": 8,
            "data.source": "folder",
            "data.root": str(photos),
            "data.cache_dir": str(setup[0] / "cache"),
            "batch_size": 8,
            "max_steps": 2,
            "warmup_steps": 1,
            "sample_every": 0,
            "checkpoint_every": 2,
        },
    )
    seen = []
    T.train(
        cfg,
        out_dir=tmp_path / "run",
        progress=False,
        callback=lambda step, info: seen.append((tmp_path / "run" / ckpt.LOCK).exists()),
    )
    assert seen and all(seen)  # held while training...
    # ...and released with the TrainLoop. matplotlib's savefig leaves a reference cycle (pyparsing tracebacks) that
    # holds the loop's frames until the cyclic collector runs, so collect here; train() releasing the lock in its
    # `finally` would make this immediate (ddpm/train.py's train() is not this change's to edit).
    gc.collect()
    assert not (tmp_path / "run" / ckpt.LOCK).exists()
    # a start refused for its data leaves no folder behind (the lock made it, and removes it)
    bad = C.apply_overrides(cfg, {"data.root": str(tmp_path / "no_images"), "batch_size": 4})
    (tmp_path / "no_images").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        T.train(bad, out_dir=tmp_path / "refused" / "run", progress=False)
    gc.collect()
    assert not (tmp_path / "refused").exists()
