"""ddpm.checkpoint: atomic saves, weights_only loads, clear errors, rotation, RNG round trips, config checks."""

import json
import random
import socket

import numpy as np
import pytest
import torch

from ddpm import checkpoint as ckpt


def _state(value: float = 1.0) -> dict:
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return {
        "step": 7,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": {"model": {"a": (1, 2)}},
        "rng": ckpt.capture_rng_state(),
        "scaler": None,
        "version": ckpt.package_version(),
    }


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = ckpt.save_checkpoint(tmp_path / "a.pt", state)
    # load_checkpoint uses weights_only=True; so must plain torch.load: nothing in it needs unpickling code
    for loaded in (ckpt.load_checkpoint(path), torch.load(path, weights_only=True)):
        assert loaded["step"] == 7 and loaded["scaler"] is None
        assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
        assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert ckpt.package_version() == "0.1.0"


def test_unloadable_values_are_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"state\['config'\]\['when'\] is a numpy.ndarray"):
        ckpt.save_checkpoint(tmp_path / "a.pt", {"config": {"when": np.zeros(2)}})
    assert not list(tmp_path.iterdir())


def test_crash_during_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    ckpt.save_checkpoint(path, _state(1.0))
    before = path.read_bytes()
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file on disk, then the "crash"
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
    assert abs(float(ckpt.load_checkpoint(path)["model"]["weight"][0, 0]) - 1.0) < 0.01  # the old one, not 2.0


def test_missing_file_names_it_and_lists_the_folder(tmp_path):
    ckpt.save_run_checkpoint(tmp_path, _state(), step=100)
    with pytest.raises(FileNotFoundError) as err:
        ckpt.load_checkpoint(tmp_path / "step_0000200.pt")
    msg = str(err.value)
    assert "step_0000200.pt" in msg and "step_0000100.pt" in msg and "latest.pt" in msg


def test_truncated_file_names_it_and_suggests_an_earlier_one(tmp_path):
    ckpt.save_run_checkpoint(tmp_path, _state(), step=100)
    bad = ckpt.save_run_checkpoint(tmp_path, _state(), step=200)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(bad)
    msg = str(err.value)
    assert str(bad) in msg and "step_0000100.pt" in msg and "corrupt" in msg
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="garbage.pt"):
        ckpt.load_checkpoint(garbage)


def test_keep_last_rotation_and_latest(tmp_path):
    for step in (10, 20, 30, 40, 50):
        ckpt.save_run_checkpoint(tmp_path, {"step": step}, step=step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000040.pt", "step_0000050.pt"]
    assert ckpt.find_latest(tmp_path) == tmp_path / "latest.pt"
    assert ckpt.load_checkpoint(tmp_path)["step"] == 50  # a run folder loads its latest
    assert ckpt.load_checkpoint(tmp_path / "latest.pt")["step"] == 50
    (tmp_path / "latest.pt").unlink()
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_0000050.pt"
    assert ckpt.find_latest(tmp_path / "nowhere") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000040.pt", "step_0000050.pt"]  # no temp files


def test_latest_falls_back_to_a_copy_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError("hard links not supported here")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    ckpt.save_run_checkpoint(tmp_path, {"step": 1}, step=1)
    ckpt.save_run_checkpoint(tmp_path, {"step": 2}, step=2)
    assert ckpt.load_checkpoint(tmp_path / "latest.pt")["step"] == 2


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": ckpt.capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_config_mismatch_is_refused_naming_each_difference():
    saved = {"base_channels": 64, "channel_mults": [1, 2], "dropout": 0.1, "num_classes": None}
    current = {"base_channels": 128, "channel_mults": (1, 2), "dropout": 0.1, "num_classes": 102}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_compatible(saved, current, what="model config", source="run/latest.pt")
    msg = str(err.value)
    assert "checkpoint has base_channels=64, this run has 128" in msg
    assert "checkpoint has num_classes=None, this run has 102" in msg
    assert "channel_mults" not in msg and "dropout" not in msg  # tuple vs JSON list, and equal values: no complaint
    ckpt.check_compatible(saved, dict(saved))  # identical: fine


def test_find_latest_prefers_a_newer_step_file_than_latest(tmp_path):
    # a crash between writing step_N.pt and relinking latest.pt must not lose the newer checkpoint
    ckpt.save_run_checkpoint(tmp_path, {"step": 1}, step=1, keep_last=0)
    assert ckpt.find_latest(tmp_path) == tmp_path / "latest.pt"
    ckpt.save_checkpoint(tmp_path / "step_0000002.pt", {"step": 2})  # latest.pt still points at step 1
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_0000002.pt"


# ---------------------------------------------------------------------------------------------- errors users see


def test_missing_checkpoints_are_checkpoint_errors_and_file_not_found(tmp_path):
    for path in (tmp_path / "nope.pt", tmp_path):  # a file that is not there; a folder without checkpoints
        with pytest.raises(ckpt.CheckpointNotFoundError) as err:
            ckpt.load_checkpoint(path)
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ckpt.UsageError)
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        ckpt.find_model("nope", tmp_path)


def test_a_pickled_object_is_refused_and_said_so(tmp_path):
    import pathlib

    torch.save({"path": pathlib.PurePosixPath("/etc")}, tmp_path / "pickle.pt")
    with pytest.raises(ckpt.CheckpointError, match="pickle.pt holds pickled Python objects.*not a ddpm checkpoint"):
        ckpt.load_checkpoint(tmp_path / "pickle.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)  # unreadable, not pickled objects
    with pytest.raises(ckpt.CheckpointError, match="garbage.pt could not be read .truncated or corrupt"):
        ckpt.load_checkpoint(tmp_path / "garbage.pt")


def test_run_state_checks_name_what_is_missing():
    from ddpm.config import preset

    config = preset("quick", **{"image_size": 16, "model.channel_mults": (1, 2)}).to_dict()
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"x.pt is not a ddpm checkpoint: it has no 'config', 'model', "
        r"'ema' \(its keys: weight\)",
    ):
        ckpt.check_run_state({"weight": torch.zeros(1)}, "x.pt")
    export = {"weights": "ema", "config": config, "model": {}}
    assert ckpt.check_run_state(export, "e.pt").model.image_size == 16  # an export can be sampled from
    with pytest.raises(ckpt.CheckpointError, match="e.pt is an exported model .*not resumed"):
        ckpt.check_run_state(export, "e.pt", resumable=True)
    with pytest.raises(ckpt.CheckpointError, match="config stored in y.pt cannot be read"):
        ckpt.check_run_state({"config": {"model": {"nonsense": 1}}, "model": {}, "ema": {}}, "y.pt")


def test_read_run_config_refuses_weights_of_another_architecture(tmp_path):
    from ddpm.config import preset
    from ddpm.unet import UNet

    config = preset(
        "quick", **{"image_size": 16, "model.base_channels": 16, "model.channel_mults": (1, 2), "model.groups": 8}
    )
    weights = UNet(config.model).state_dict()
    state = {"step": 3, "config": config.to_dict(), "model": weights, "ema": {"shadow": weights}, "optimizer": {}}
    ckpt.save_run_checkpoint(tmp_path, state, step=3)
    assert ckpt.read_run_config(tmp_path) == config
    state["config"]["model"]["base_channels"] = 32
    ckpt.save_run_checkpoint(tmp_path, state, step=4)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"model weights in .*latest.pt do not fit the model its config "
        r"describes.*: \S+ is \(16.*\), the model has \(32.* "
        r"\(and \d+ more\)",
    ):
        ckpt.read_run_config(tmp_path)


def test_one_line_joins_a_message_where_it_broke():
    assert ckpt.one_line("a:\n  b\n  c\nd.\ne") == "a: b; c; d. e"
    assert ckpt.one_line(ValueError("")) == "ValueError"


@pytest.mark.parametrize("fail_at", ["step file", "latest.pt copy"])
def test_a_failed_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    import errno

    ckpt.save_run_checkpoint(tmp_path, {"step": 1}, step=1)
    real_save = torch.save

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "step file":
        monkeypatch.setattr(torch, "save", disk_full)
    else:  # no hard links here, and the copy runs out of space
        monkeypatch.setattr(ckpt.os, "link", disk_full)
        monkeypatch.setattr(ckpt.shutil, "copyfile", disk_full)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        ckpt.save_run_checkpoint(tmp_path, {"step": 2}, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "step_0000002.pt")
    message = str(err.value)
    target = tmp_path / "step_0000002.pt"
    assert message.startswith(f"could not write the checkpoint {target} (No space left on device)")
    newest = ckpt.find_latest(tmp_path)
    assert f"the newest complete checkpoint is {newest}" in message and "--resume" in message
    # nothing half-written anywhere; the newest complete checkpoint is whole (step 2's file, when only latest.pt failed)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ckpt.load_checkpoint(newest)["step"] == (1 if fail_at == "step file" else 2)


# ---------------------------------------------------------------------------------------------- the run lock


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_refuses_a_live_run_and_is_released(tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "a" / "run"
    lock = ckpt.RunLock(run).acquire()
    record = json.loads((run / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    # another process asking for it is refused, naming this one
    other = subprocess.run(
        [sys.executable, "-c", f"import sys; from ddpm.checkpoint import RunLock; RunLock({str(run)!r}).acquire()"],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0
    assert f"in use by another run (pid {os.getpid()} on {socket.gethostname()}" in other.stderr
    lock.release()
    lock.release()  # twice is fine
    assert not (tmp_path / "a").exists()  # the lock, and the folders acquire() made (still empty), are gone

    first = ckpt.RunLock(tmp_path).acquire()
    again = ckpt.RunLock(tmp_path).acquire()  # the same process again (a notebook training the folder twice)
    first.release()  # no longer its lock: the file stays
    assert (tmp_path / ".lock").exists()
    again.release()
    assert not (tmp_path / ".lock").exists()


def test_a_stale_lock_is_taken_over_and_leftover_temp_files_cleared(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "time": 0}))
    (tmp_path / ".step_0000004.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a killed writer's leftover
    (tmp_path / "keep.tmp").write_text("not ours: no leading dot")
    with ckpt.RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.record["token"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "keep.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp"]  # an existing folder is never removed


@pytest.mark.parametrize(
    "holder, stale",
    [
        ({"pid": "dead"}, True),
        ({"started": "another start time"}, True),  # the pid lives, but it is another process now (pid reuse)
        ({"boot": "another boot"}, True),  # the machine rebooted since
        ({"host": "elsewhere"}, False),  # cannot be judged from here: refused, with what to do
        ({}, False),  # this very process's pid on this host: alive
    ],
    ids=["dead pid", "pid reused", "rebooted", "another host", "alive"],
)
def test_which_locks_are_stale(tmp_path, holder, stale):
    import os

    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": ckpt._process_start(os.getpid()),
        "boot": ckpt._boot_id(),
        "time": 0,
        "token": "x",
    }
    record.update(holder)
    if record["pid"] == "dead":
        record["pid"] = _dead_pid()
    if "started" in holder and record["started"] and ckpt._process_start(os.getpid()) is None:
        pytest.skip("no /proc here: process start times cannot be read")
    if "boot" in holder and ckpt._boot_id() is None:
        pytest.skip("no boot id here")
    assert ckpt._is_stale(record, tmp_path / ".lock") is stale
    if not stale and "host" in holder:
        (tmp_path / ".lock").write_text(json.dumps(record))
        with pytest.raises(ckpt.RunFolderError, match=r"runs on another machine.*if it is not, delete .*\.lock"):
            ckpt.RunLock(tmp_path).acquire()


def test_an_empty_lock_is_stale_only_once_its_writer_had_time(tmp_path):
    import os

    lock = tmp_path / ".lock"
    lock.write_text("")  # created, not yet written: a run starting this very moment
    assert not ckpt._is_stale(None, lock)
    os.utime(lock, (0, 0))  # ...or one killed between the two, long ago
    assert ckpt._is_stale(None, lock)


def test_the_lock_appears_with_its_record_already_in_it(tmp_path, monkeypatch):
    """A run killed while taking the lock must not leave an empty one behind (the next run would be refused
    for ten seconds as 'being written'): the record is complete in a temporary file before the lock exists."""
    import os

    seen = []
    real_link = os.link

    def link(src, dst):
        assert not (tmp_path / ".lock").exists()
        seen.append(json.loads(open(src).read()))  # what becomes visible as the lock, at the moment it does
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    with ckpt.RunLock(tmp_path) as lock:
        assert seen == [lock.record]
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the temporary file is gone


def test_the_lock_is_taken_without_hard_links_and_retried_if_its_record_was_cleared(tmp_path, monkeypatch):
    import errno
    import os

    real_link = os.link
    calls = []

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)  # e.g. some network and FUSE file systems
    with ckpt.RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / ".lock").read_text()) == lock.record
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]

    def cleared_once(src, dst):  # the holder of a lock cleared our prepared record as a stale temp, then left
        calls.append(src)
        if len(calls) == 1:
            os.unlink(src)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", cleared_once)
    with ckpt.RunLock(tmp_path) as lock:
        assert len(calls) == 2 and json.loads((tmp_path / ".lock").read_text()) == lock.record


def test_an_unwritable_run_folder_is_refused_before_anything(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ckpt.RunFolderError, match="cannot write to the run folder .*afile/run"):
        ckpt.RunLock(tmp_path / "afile" / "run").acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
