"""ddpm.train and ddpm.sample: configs and overrides, exact resume, non-finite stops, the quick preset, CLIs."""

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from run_helpers import assert_identical

from ddpm import checkpoint as ckpt
from ddpm import config as C
from ddpm import diffusion
from ddpm import train as T

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:flowers102.*missing:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: a second thread buys nothing and, on a busy 2-core machine, costs ~10x in
    # spin-waiting. Restored afterwards so other test modules see the usual setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(flowers_root, tmp_path_factory):
    """The shared flowers with one decoded cache that every run in this module reuses."""
    return {"data.root": str(flowers_root), "data.cache_dir": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture
def sample_cli():
    return importlib.import_module("ddpm.sample")


def tiny(data, **overrides) -> C.RunConfig:
    """A 16 px, ~60k-parameter UNet on the 287 shared train-split flowers: a step takes milliseconds."""
    base = {
        "image_size": 16,
        "model.base_channels": 16,
        "model.channel_mults": (1, 2),
        "model.groups": 8,
        **data,
        "data.split": "train",
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 2,
        "log_every": 2,
        "sample_every": 0,
        "checkpoint_every": 100,
    }
    return C.preset("quick", **{**base, **overrides})


# ---------------------------------------------------------------------------------------------- configs


def test_config_json_round_trip_for_every_preset(tmp_path):
    for name in C.PRESETS:
        cfg = C.preset(name)
        back = C.RunConfig.from_json(cfg.to_json())
        assert back == cfg and isinstance(back.model.channel_mults, tuple)
        cfg.save(tmp_path / f"{name}.json")
        assert C.RunConfig.load(tmp_path / f"{name}.json") == cfg
    with pytest.raises(ValueError, match="unknown key.*'lrr'.*valid"):
        C.RunConfig.from_dict({**C.preset("quick").to_dict(), "train": {"lrr": 1}})


def test_overrides_parse_by_field_type():
    cfg = C.apply_overrides(
        C.preset("quick"),
        C.parse_override_args(
            [
                "--train.lr",
                "2e-4",
                "--seed=7",
                "--compile",
                "false",
                "--conditional",
                "true",
                "--min-snr-gamma",
                "5",
                "--image_size",
                "64",
                "--model.channel_mults",
                "1,2,2,4",
                "--schedule_params",
                '{"s": 0.01}',
                "--model.num_classes",
                "none",
                "--data.root",
                "/data/x",
            ]
        ),
    )
    assert cfg.train.lr == 2e-4 and cfg.train.seed == 7 and cfg.train.compile is False and cfg.train.conditional
    assert cfg.diffusion.min_snr_gamma == 5.0 and cfg.diffusion.schedule_params == {"s": 0.01}
    assert cfg.model.image_size == cfg.data.image_size == 64  # the plain key sets both sections
    assert cfg.model.channel_mults == (1, 2, 2, 4) and cfg.model.num_classes is None and cfg.data.root == "/data/x"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.lrr", "1"], r"(?s)unknown option --train.lrr \(did you mean --train.lr, .*train: batch_size, lr,"),
        (["--nonsense", "1"], "(?s)unknown option --nonsense; valid options.*data: source, root"),
        (["--compile", "yes"], "--train.compile 'yes': expected true or false"),
        (["--lr", "fast"], "--train.lr 'fast': expected float"),
        (["--lr"], "--lr needs a value"),
        (["--precision", "fp8"], "precision='fp8'"),
        (["--ema_warmup", "1"], r"ema_warmup=1.0 \(expected 0 \(none\) or > 1\)"),
        (["--model.image_size", "16"], "model.image_size=16 but data.image_size=32"),
        (["--timesteps", "10", "--sample_steps", "20"], "sample_steps=20 exceeds diffusion.timesteps=10"),
        (["--min_snr_gamma", "5", "--loss_type", "huber"], "defined for loss_type='mse' only"),
    ],
)
def test_bad_overrides_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        C.apply_overrides(C.preset("quick"), C.parse_override_args(args))


def test_cli_reports_unknown_keys(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--preset", "quick", "--out", str(tmp_path / "run"), "--train.lrr", "1"])
    assert "unknown option --train.lrr" in capsys.readouterr().err
    T.main(["--preset", "quick", "--out", str(tmp_path / "run"), "--lr", "3e-4", "--max-steps", "9", "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["lr"] == 3e-4 and printed["train"]["max_steps"] == 9


def test_lr_schedule_closed_form():
    tc = C.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_decay="cosine", min_lr_ratio=0.1)
    assert T.lr_at(0, tc) == pytest.approx(0.1) and T.lr_at(9, tc) == pytest.approx(1.0)
    assert T.lr_at(10, tc) == pytest.approx(1.0)
    assert T.lr_at(60, tc) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay: the midpoint
    assert T.lr_at(110, tc) == pytest.approx(0.1) and T.lr_at(500, tc) == pytest.approx(0.1)
    assert T.lr_at(50, C.TrainConfig(lr=1.0, warmup_steps=10)) == 1.0
    # linear decay to zero by the end of the planned run: the budget-friendly schedule
    lin = C.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_decay="linear", min_lr_ratio=0.0)
    assert T.lr_at(10, lin) == 1.0 and T.lr_at(60, lin) == pytest.approx(0.5) and T.lr_at(110, lin) == 0.0
    # warmup-stable-decay: constant until the last 40 steps, then linear to zero
    wsd = C.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_decay="linear", min_lr_ratio=0.0, decay_steps=40)
    assert T.lr_at(50, wsd) == 1.0 and T.lr_at(70, wsd) == 1.0 and T.lr_at(90, wsd) == pytest.approx(0.5)
    assert T.lr_at(110, wsd) == 0.0
    long = C.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_decay="linear", min_lr_ratio=0.0, decay_steps=500)
    assert T.lr_at(60, long) == T.lr_at(60, lin)  # longer than the run: the decay starts after warm-up
    with pytest.raises(ValueError, match="decay_steps"):
        C.TrainConfig(decay_steps=0)
    with pytest.raises(ValueError, match="lr_decay='step'.*one of"):
        C.TrainConfig(lr_decay="step")


def test_epochs_decide_the_steps_and_the_intervals():
    tc = C.TrainConfig(epochs=2.5, sample_every_epochs=0.5, checkpoint_every_epochs=1, max_steps=7)
    steps = tc.in_steps(40)
    assert (steps.max_steps, steps.sample_every, steps.checkpoint_every) == (100, 20, 40)
    assert C.TrainConfig(max_steps=7).in_steps(40).max_steps == 7  # no epochs: steps as given
    with pytest.raises(ValueError, match="epochs=0"):
        C.TrainConfig(epochs=0)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data):
    # Everything that draws random numbers or carries state: dropout, class dropout, grad accumulation,
    # warm-up + cosine decay, clipping, weight decay, EMA with a delayed start.
    cfg = tiny(
        data,
        **{
            "model.dropout": 0.1,
            "conditional": True,
            "class_dropout": 0.5,
            "grad_accum": 2,
            "lr_decay": "cosine",
            "grad_clip": 0.5,
            "weight_decay": 0.01,
            "ema_update_after_step": 2,
            "ema_decay": 0.9,
        },
    )
    straight = T.train(cfg, out_dir=tmp_path / "straight", progress=False)
    first = T.train(cfg, out_dir=tmp_path / "split", progress=False, max_steps=3)
    assert first.step == 3 and ckpt.load_checkpoint(first.checkpoint)["step"] == 3
    resumed = T.train(cfg, out_dir=tmp_path / "split", resume=True, progress=False)
    assert straight.step == resumed.step == 6
    a, b = ckpt.load_checkpoint(straight.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    for key in ("model", "ema", "optimizer", "rng", "data", "step"):
        assert_identical(a[key], b[key], key)
    assert a["config"]["model"]["num_classes"] == 102  # conditional: the class count came from the data
    # the loss log of the resumed run continues the first one, row for row
    assert [r["step"] for r in resumed.history] == [2, 3, 4, 6]
    assert [r["loss"] for r in resumed.history[-1:]] == [r["loss"] for r in straight.history[-1:]]


def test_a_run_in_epochs_logs_both_counts(tmp_path, data):
    # 287 train-split images in batches of 8: 35 steps an epoch (the last partial batch is dropped)
    cfg = tiny(data, epochs=2, checkpoint_every_epochs=1, log_every=35)
    result = T.train(cfg, out_dir=tmp_path, progress=False)
    assert result.step == result.config.train.max_steps == 70
    assert [(r["step"], r["epoch"]) for r in result.history] == [(35, 1.0), (70, 2.0)]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000035.pt", "step_0000070.pt"]
    assert all(r["cpu_s"] > 0 for r in result.history)


# ---------------------------------------------------------------------------------------------- fp16


def test_fp16_with_the_grad_scaler_lowers_the_loss(tmp_path, data):
    cfg = tiny(data, precision="fp16", max_steps=40, warmup_steps=5, log_every=10, lr=3e-3)
    result = T.train(cfg, out_dir=tmp_path, progress=False)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(r["skipped_steps"] == 0 and r["loss_scale"] > 0 for r in result.history)
    scaler = ckpt.load_checkpoint(result.checkpoint)["scaler"]
    assert scaler["scale"] == result.history[-1]["loss_scale"]  # the scaler's state is in the checkpoint


def test_fp16_resume_is_bit_identical_scaler_included(tmp_path, data):
    cfg = tiny(data, precision="fp16", max_steps=6)
    straight = T.train(cfg, out_dir=tmp_path / "straight", progress=False)
    T.train(cfg, out_dir=tmp_path / "split", progress=False, max_steps=3)
    resumed = T.train(cfg, out_dir=tmp_path / "split", resume=True, progress=False)
    a, b = ckpt.load_checkpoint(straight.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    for key in ("model", "ema", "optimizer", "scaler", "rng", "data", "step"):
        assert_identical(a[key], b[key], key)
    assert a["scaler"]  # a real scaler state, not an empty one


def test_an_overflow_makes_the_scaler_skip_the_step_and_back_off(tmp_path, data):
    cfg = tiny(data, precision="fp16", max_steps=3, log_every=1)
    loop = T.TrainLoop(cfg, tmp_path, d=T.DistInfo(), device=torch.device("cpu"), progress=False)
    loop.start(resume=False)
    before = {k: v.clone() for k, v in loop.raw_model.state_dict().items()}
    scale = loop.scaler.get_scale()
    overflow = [True]

    def inf_once(grad):  # the first backward overflows, as a too-large loss scale makes fp16 do
        if overflow and overflow.pop():
            return grad * float("inf")
        return grad

    next(loop.raw_model.parameters()).register_hook(inf_once)
    loop.run(stop=1)
    first = loop.history[0]
    assert first["skipped_steps"] == 1 and first["loss_scale"] == scale * 0.5  # skipped, and backed off
    assert math.isfinite(first["loss"])  # not the non-finite-loss stop: that one is for real divergence
    assert all(torch.equal(before[k], v) for k, v in loop.raw_model.state_dict().items())  # no update
    result = loop.run(stop=3)
    assert [r["skipped_steps"] for r in result.history] == [1, 0, 0] and result.step == 3
    assert not torch.equal(before["out_conv.weight"], result.model.state_dict()["out_conv.weight"])


def test_resume_refuses_another_architecture_and_new_runs_refuse_old_folders(tmp_path, data, capsys):
    T.train(tiny(data, max_steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint has base_channels=16, this run has 32"):
        T.train(tiny(data, **{"model.base_channels": 32}), out_dir=tmp_path, resume=True, progress=False)
    # changed training settings are allowed, and said; a changed batch shape resumes approximately
    T.train(tiny(data, max_steps=2, batch_size=4), out_dir=tmp_path, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint has train.batch_size=8, this run has 4" in err and "resuming approximately" in err
    assert ckpt.load_checkpoint(tmp_path)["step"] == 2
    with pytest.raises(FileExistsError, match="already holds checkpoints.*--resume"):
        T.train(tiny(data), out_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        T.train(tiny(data), out_dir=tmp_path / "empty", resume=True, progress=False)


def test_resume_of_an_older_checkpoint_warns_only_of_settings_that_changed(tmp_path, data, capsys):
    T.train(tiny(data, max_steps=1), out_dir=tmp_path, progress=False)
    path = ckpt.find_latest(tmp_path)
    state = ckpt.load_checkpoint(path)
    for section, key in (("train", "ema_warmup"), ("train", "class_dropout"), ("model", "num_classes")):
        del state["config"][section][key]  # as written before these settings existed, at today's defaults
    ckpt.save_checkpoint(path, state)
    capsys.readouterr()
    T.train(tiny(data, max_steps=2), out_dir=tmp_path, resume=True, progress=False)
    assert "changed training settings" not in capsys.readouterr().err  # a longer run at a constant rate: exact
    T.train(tiny(data, max_steps=3, ema_warmup=4.0), out_dir=tmp_path, resume=True, progress=False)
    err = capsys.readouterr().err  # the step-2 checkpoint has every key; a real change is still said
    assert "checkpoint has train.ema_warmup=10.0, this run has 4.0" in err and "class_dropout" not in err
    T.train(tiny(data, max_steps=4, ema_warmup=4.0, lr_decay="linear"), out_dir=tmp_path, resume=True, progress=False)
    err = capsys.readouterr().err  # a decaying rate depends on the run's length
    assert "checkpoint has train.max_steps=3, this run has 4" in err and "train.lr_decay='none'" in err


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real_loss, calls = diffusion.training_loss, []

    def loss_that_breaks(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 5 else loss  # step 5 onwards

    monkeypatch.setattr(diffusion, "training_loss", loss_that_breaks)
    cfg = tiny(data, checkpoint_every=4, log_every=3, max_steps=8)
    with pytest.raises(FloatingPointError, match="non-finite at step 5") as err:
        T.train(cfg, out_dir=tmp_path, progress=False)
    assert "step_0000004.pt" in str(err.value) or "latest.pt" in str(err.value)
    state = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 4 and [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000004.pt"]
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_exploding_weights_are_never_checkpointed(tmp_path, data):
    # An absurd learning rate without clipping: the weights overflow; whatever is caught first, no
    # checkpoint with non-finite weights may appear.
    cfg = tiny(data, lr=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_every=1, log_every=1, max_steps=4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        T.train(cfg, out_dir=tmp_path, progress=False)
    for path in ckpt.list_checkpoints(tmp_path):
        assert all(torch.isfinite(v).all() for v in ckpt.load_checkpoint(path)["model"].values())


# ---------------------------------------------------------------------------------------------- quick preset, samples


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("quick")
    # the quick preset's model and settings, shortened: 30 steps of 8 images (the preset: 200 of 16)
    cfg = C.preset(
        "quick",
        **{
            **data,
            "max_steps": 30,
            "batch_size": 8,
            "warmup_steps": 10,
            "log_every": 3,
            "sample_every": 15,
            "checkpoint_every": 15,
            "sample_n": 4,
            "sample_steps": 4,
        },
    )
    seen = []
    result = T.train(cfg, out_dir=out / "run", progress=False, callback=lambda step, info: seen.append(step))
    return result, seen


def test_quick_preset_lowers_the_loss(quick_run):
    result, seen = quick_run
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 10 and seen == [r["step"] for r in result.history]
    k = len(losses) // 5
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    assert all(math.isfinite(v) for v in losses)


def test_run_folder_holds_config_logs_plot_and_sample_grids(quick_run):
    result, _ = quick_run
    run = result.run_dir
    assert C.RunConfig.load(run / "config.json") == result.config
    assert ckpt.load_checkpoint(run)["config"] == result.config.to_dict()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(3, 31, 3)) and rows == result.history
    assert (run / "loss.png").stat().st_size > 1000
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step_0000015.png", "step_0000030.png"] == [p.name for p in result.samples]
    with Image.open(run / "samples" / "step_0000030.png") as im:
        assert im.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 4 images of 32 px, 2 per row, 2 px padding
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000015.pt", "step_0000030.pt"]


def test_load_model_returns_ema_or_live_weights(quick_run):
    result, _ = quick_run
    model, schedule, config = ckpt.load_model(result.run_dir)
    live, _, _ = ckpt.load_model(result.checkpoint, use_ema=False)
    assert not model.training and config == result.config and schedule.timesteps == config.diffusion.timesteps
    state = ckpt.load_checkpoint(result.checkpoint)
    assert_identical(dict(model.state_dict()), dict(state["ema"]["shadow"]))
    assert_identical(dict(live.state_dict()), dict(state["model"]))


def test_sample_cli_writes_a_grid_and_single_images(quick_run, tmp_path, sample_cli):
    result, _ = quick_run
    args = [
        "--ckpt",
        str(result.run_dir),
        "--n",
        "5",
        "--method",
        "ddim",
        "--steps",
        "3",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    grid, paths = sample_cli.main(args + ["--out", str(tmp_path / "grid.png")])
    assert grid.is_file() and [p.name for p in paths] == [f"{i:03d}.png" for i in range(5)]
    assert all(p.parent == tmp_path / "grid" for p in paths)
    with Image.open(paths[0]) as im:
        assert im.size == (32, 32)
    again, _ = sample_cli.main(args + ["--out", str(tmp_path / "again.png")])
    assert again.read_bytes() == grid.read_bytes()  # a seed repeats
    raw, _ = sample_cli.main(args + ["--out", str(tmp_path / "raw.png"), "--no-ema"])
    assert raw.read_bytes() != grid.read_bytes()
    with pytest.raises(SystemExit):
        sample_cli.main(args + ["--out", str(tmp_path / "c.png"), "--class-label", "3"])  # unconditional model


def test_generate_without_a_method_uses_the_models_default_sampler(quick_run):
    from ddpm.sample import generate

    model, schedule, config = ckpt.load_model(quick_run[0].run_dir)
    # the config's schedule name picks the sampler, not the schedule passed in (the checkpoint's own)
    for prediction_type, schedule_name, explicit in (
        ("epsilon", "cosine", "dpmpp_2m_sde"),
        ("v_prediction", "cosine", "ddim"),
        ("v_prediction", "offset_cosine", "dpmpp_2m_sde"),
    ):
        cfg = dataclasses.replace(
            config,
            diffusion=dataclasses.replace(config.diffusion, schedule=schedule_name, prediction_type=prediction_type),
        )
        default = generate(model, schedule, cfg, n=2, seed=3, progress=False)
        assert torch.equal(
            default, generate(model, schedule, cfg, n=2, method=explicit, steps=20, seed=3, progress=False)
        ), (prediction_type, schedule_name)
    cfg = dataclasses.replace(
        config, diffusion=dataclasses.replace(config.diffusion, schedule="cosine", prediction_type="v_prediction")
    )
    # steps without a method keep the model's method; a named method keeps its own default steps
    assert torch.equal(
        generate(model, schedule, cfg, n=2, steps=4, seed=3, progress=False),
        generate(model, schedule, cfg, n=2, method="ddim", steps=4, seed=3, progress=False),
    )
    assert torch.equal(
        generate(model, schedule, cfg, n=1, method="ddim", seed=3, progress=False),
        generate(model, schedule, cfg, n=1, method="ddim", steps=50, seed=3, progress=False),
    )
    assert C.preset("quick", **{"train.sample_method": "none"}).train.sample_method is None
    with pytest.raises(ValueError, match="sample_method"):
        C.preset("quick", **{"train.sample_method": "euler"})


def test_module_entry_points_run(quick_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm.train",
            "--preset",
            "flowers64",
            "--out",
            str(tmp_path),
            "--print-config",
            "--lr",
            "1e-4",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["train"]["lr"] == 1e-4
    grid = tmp_path / "s.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm.sample",
            "--ckpt",
            str(quick_run[0].checkpoint),
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            str(grid),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert grid.is_file() and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["000.png", "001.png"]


def test_describe_device_says_what_each_device_gets(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    tc = C.preset("cpu64").train
    t4 = T.describe_device(torch.device("cuda"), tc)
    assert "fp16 autocast + GradScaler" in t4 and "channels_last, F.group_norm" in t4 and "compile on" in t4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "bf16" in T.describe_device(torch.device("cuda"), tc)
    assert "compile off" in T.describe_device(
        torch.device("cuda"), C.preset("cpu64", **{"train.compile": "false"}).train
    )
    mps = T.describe_device(torch.device("mps"), tc)
    assert "fp32" in mps and "NCHW" in mps and "compile off" in mps
    assert "fused GroupNorm" in T.describe_device(torch.device("cpu"), tc)


def test_a_run_without_inception_weights_trains_on_without_fid(tmp_path, data, monkeypatch, capsys):
    import ddpm.metrics as M

    asked = []

    def missing(*args, **kwargs):
        asked.append(kwargs)
        raise M.InceptionWeightsNotFound("no Inception weights: put pt_inception-2015-12-05.pth in ~/.cache")

    monkeypatch.setattr(M, "load_inception", missing)
    result = T.train(tiny(data, max_steps=4, eval_every=2, log_every=2), out_dir=tmp_path, progress=False)
    assert result.step == 4 and [r["step"] for r in result.history] == [2, 4]
    assert not any("fid" in r for r in result.history) and not (tmp_path / "best.pt").exists()
    err = capsys.readouterr().err
    assert err.count("no FID/KID during this run (train.eval_every=2; 0 turns it off)") == 1 and "~/.cache" in err
    assert asked == [{"device": torch.device("cpu"), "download": True}]  # once, and allowed to download


def test_cudnn_benchmark_is_on_for_cuda_training_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    T.configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    T.configure_backends(torch.device("cuda"))  # sets the flag only: no GPU needed
    assert torch.backends.cudnn.benchmark is True


def test_fid_during_training_is_logged_and_the_best_model_kept(tmp_path, data):
    from test_metrics import TinyExtractor

    from ddpm.metrics import FIDEvaluator

    real = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    evaluator = FIDEvaluator(real, extractor=TinyExtractor(), cache_dir=None, kid_subsets=5)
    cfg = tiny(data, max_steps=6, eval_every=3, eval_n=8, sample_steps=4, log_every=2)
    result = T.train(cfg, out_dir=tmp_path, progress=False, evaluator=evaluator)
    scored = [r for r in result.history if "fid" in r]
    assert [r["step"] for r in scored] == [3, 6] and all(r["eval_s"] > 0 and r["kid"] == r["kid"] for r in scored)
    best = min(scored, key=lambda r: r["fid"])
    state = ckpt.load_checkpoint(tmp_path / "best.pt")
    assert state["weights"] == "ema" and state["step"] == best["step"] and f"{best['fid']:.2f}" in state["note"]
    model, _, _ = ckpt.load_model(tmp_path / "best.pt")  # loads like any model
    assert ckpt.find_latest(tmp_path).name != "best.pt"  # never taken for the run's newest checkpoint
    # an evaluation changes nothing the training draws: the same run without it ends on the same weights
    plain = T.train(tiny(data, max_steps=6, log_every=2), out_dir=tmp_path / "plain", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), plain.model.state_dict().values()))
