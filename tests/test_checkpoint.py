"""ddpm.checkpoint: atomic saves, weights_only loads, clear errors, rotation, RNG round trips, config checks."""

import random

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
    return {"step": 7, "model": model.state_dict(), "optimizer": opt.state_dict(), "config": {"model": {"a": (1, 2)}},
            "rng": ckpt.capture_rng_state(), "scaler": None, "version": ckpt.package_version()}


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
