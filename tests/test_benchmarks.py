"""The benchmark scripts run, and print what their tables and JSON lines promise (--quick: seconds each).

They are not timed here (timings belong to the scripts themselves, run alone); what is checked is that each
runs to the end on the CPU and that its figures are the ones docs/performance.md and docs/quality.md quote.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_cli_args

from ddpm.unet import UNet, unet_preset

REPO = Path(__file__).resolve().parents[1]


def start_benchmark(script: str, *args: str, env: dict | None = None, timeout: int = 300):
    """The finished process of benchmarks/<script> with these arguments, whatever its exit status."""
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_benchmark(script: str, *args: str, env: dict | None = None, timeout: int = 300):
    """(the finished process, its last line as JSON): every benchmark ends with one JSON line."""
    proc = start_benchmark(script, *args, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_throughput_quick(monkeypatch):
    proc, result = run_benchmark(
        "train_throughput.py", "--quick", "--threads", "1", "--precision", "bf16", "--profile", "--conv-shapes"
    )
    assert result["benchmark"] == "train_throughput" and result["quick"]
    (r,) = result["results"]
    assert r["image_size"] == 32 and r["precision"] == "bf16"
    assert r["images_per_s"] > 0 and r["fwd_gflops_per_image"] > 0 and r["peak_rss_mb"] > 0
    assert result["peaks_gflops"]["conv_bf16"] > 0 and r["utilisation"] > 0
    # the profiled step: shares of its op time that add up, with the convolutions among them
    assert abs(sum(r["time_shares"].values()) - 1) < 1e-6 and r["time_shares"]["convolution"] > 0
    assert r["utilisation_if_only_conv_matmul"] >= r["utilisation"]
    assert "time by op kind" in proc.stdout
    assert "Python + autograd engine" in r["time_shares"]  # the CPU path: ops timed where they dispatch
    # every conv of the model's forward, each run once, found inside the fused norm-conv nodes too
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_throughput import QUICK_OVERRIDES

    quick = UNet(unet_preset(32, **QUICK_OVERRIDES))
    shapes = r["conv_shapes"]
    assert sum(x["count"] for x in shapes) == sum(isinstance(m, torch.nn.Conv2d) for m in quick.modules())
    assert abs(sum(x["time_share"] for x in shapes) - 1) < 1e-6 and all(x["gflops"] > 0 for x in shapes)
    assert {(x["kernel"], x["stride"]) for x in shapes} == {(3, 1), (3, 2), (1, 1)}
    assert "each distinct conv alone" in proc.stdout
    # and each conv's three passes timed one at a time, the same FLOPs each
    assert all(
        set(x["pass_ms"]) == {"forward", "backward_data", "backward_weight"}
        and all(ms > 0 for ms in x["pass_ms"].values())
        for x in shapes
    )
    assert all(abs(x["pass_gflop"] * 3 - x["total_gflop"] / x["count"]) < 1e-9 for x in shapes)
    assert "by pass, all convs: forward" in proc.stdout


def test_profile_step_times_ops_and_the_python_between_them(monkeypatch):
    """On a CPU, time spent outside ATen ops (here a sleep) is its own kind, not spread over the ops."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_throughput import profile_step

    conv, x = torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(4, 8, 32, 32)

    def step():
        conv(x).square().mean().backward()
        time.sleep(0.2)

    shares = profile_step(step, torch.device("cpu"))
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert shares["Python + autograd engine"] > 0.5 and 0 < shares["convolution"] < 0.5
    assert shares["elementwise + other"] > 0  # square, mean and their backward


def test_samplers_quick():
    proc, result = run_benchmark("samplers.py", "--quick")
    assert result["benchmark"] == "samplers"
    w2 = {(r["method"], r["nfe"]): r["w2"] for r in result["oracle"]}
    assert set(w2) == {(m, n) for m in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde") for n in (10, 20)}
    # docs/quality.md's claim, on the exact Gaussian denoiser: DPM-Solver++ at 10 NFE beats DDIM at 20
    assert w2[("dpmpp_2m", 10)] < w2[("ddim", 20)] and w2[("dpmpp_2m_sde", 10)] < w2[("ddim", 20)]
    lat = {r["method"]: r for r in result["latency"]}
    assert lat["ddpm"]["steps"] == 1000 and all(r["seconds_per_image"] > 0 for r in lat.values())


def test_data_loader_quick(flowers_root):
    proc, result = run_benchmark(
        "data_loader.py", "--quick", "--image-size", "32", "--batch-size", "16", env={"DATA_ROOT": str(flowers_root)}
    )
    assert result["benchmark"] == "data_loader" and result["source"] == "flowers102"
    assert result["n_images"] == len(list((flowers_root / "flowers-102" / "jpg").glob("*.jpg")))
    assert result["decode_images_per_s"] > 0 and result["stream_images_per_s"] > 0
    assert 0 < result["loader_share"] < 1 and "loader share of step" in proc.stdout


def test_fid_quick(flowers_root):
    proc, result = run_benchmark("fid.py", "--quick", "--image-size", "32", "--data-root", str(flowers_root))
    assert result["benchmark"] == "fid" and result["num_images"] == 25
    assert result["inception_images_per_s"] > 0 and result["eval_cached_s"] > 0 and result["eval_uncached_s"] > 0
    # two disjoint draws of real flowers: a finite, positive FID (25 images each, so far from 0)
    assert 0 < result["fid_real_vs_real"] < 1000


def test_quality_budget_quick_then_rescore(flowers_root, tmp_path):
    out = tmp_path / "run"
    proc, result = run_benchmark(
        "quality_budget.py",
        "--quick",
        "--data-root",
        str(flowers_root),
        "--out",
        str(out),
        "--samplers",
        "ddim:20,dpmpp_2m_sde:10",
    )
    assert result["benchmark"] == "quality_budget" and result["checkpoint"] is None
    assert result["steps"] > 0 and result["steps"] % 10 == 0 and result["cpu_minutes"] >= 0.2
    assert result["num_real"] == 64 and result["num_generated"] == 32
    assert [(r["method"], r["nfe"], r["weights"]) for r in result["results"]] == [
        ("ddim", 20, "ema"),
        ("dpmpp_2m_sde", 10, "ema"),
    ]
    assert all(r["fid"] > 0 for r in result["results"])
    assert (out / "samples_ddim_20_trailing_seed0.png").is_file() and (out / "latest.pt").is_file()
    # the same folder again would overwrite a run: refused, with a pointer to --checkpoint
    again = start_benchmark(
        "quality_budget.py", "--quick", "--data-root", str(flowers_root), "--out", str(out), timeout=120
    )
    assert again.returncode != 0 and "--checkpoint" in again.stderr
    # scored again from the checkpoint, with the live weights: no training, its own grid
    proc, rescored = run_benchmark(
        "quality_budget.py",
        "--quick",
        "--data-root",
        str(flowers_root),
        "--checkpoint",
        str(out),
        "--out",
        str(tmp_path / "live"),
        "--weights",
        "live",
        "--samplers",
        "ddim:20",
    )
    assert rescored["checkpoint"] == str(out) and rescored["steps"] == result["steps"]
    assert rescored["results"][0]["weights"] == "live" and "live weights" in proc.stdout
    assert (tmp_path / "live" / "samples_ddim_20_trailing_seed0_live.png").is_file()
    # the EMA and the live weights differ after training, so do their samples' scores
    assert rescored["results"][0]["fid"] != result["results"][0]["fid"]


def test_quality_budget_trains_the_preset_it_is_given(flowers_root, tmp_path):
    proc, result = run_benchmark(
        "quality_budget.py",
        "--quick",
        "--preset",
        "flowers64",
        "train.seed=3",
        "--data-root",
        str(flowers_root),
        "--out",
        str(tmp_path / "f64"),
        "--samplers",
        "ddim:5",
        "diffusion.prediction_type=v_prediction",
    )  # overrides before and after
    assert result["preset"] == "flowers64" and "training flowers64" in proc.stdout
    cfg = result["config"]
    assert cfg["model"]["image_size"] == cfg["data"]["image_size"] == 64 and cfg["data"]["source"] == "flowers102"
    assert cfg["model"]["channel_mults"] == [1, 2, 2, 4] and cfg["diffusion"]["prediction_type"] == "v_prediction"
    assert cfg["train"]["seed"] == 3
    assert result["results"][0]["fid"] > 0
    bad = start_benchmark("quality_budget.py", "--preset", "flowers32")
    assert bad.returncode == 2 and "flowers64" in bad.stderr and "folder32" in bad.stderr


def test_guidance_sweep_scores_each_scale_and_plots_them(flowers_root, tmp_path):
    def tiny_run(out, *extra):
        args = tiny_cli_args("--data-root", str(flowers_root), "--data.source", "flowers102", "--max-steps", "2")
        subprocess.run([sys.executable, "-m", "ddpm.train", *args, *extra, "--out", str(out)], check=True, cwd=REPO)

    tiny_run(tmp_path / "cond", "--train.conditional", "true", "--max-steps", "6", "--train.ema_decay", "0")
    out = tmp_path / "sweep"
    sweep = ["--num-images", "8", "--num-real", "16", "--sampler", "ddim:4", "--data-root", str(flowers_root)]
    proc, result = run_benchmark("guidance.py", "--checkpoint", str(tmp_path / "cond"), "--scales", "1,3",
                                 *sweep, "--out", str(out))  # fmt: skip
    assert result["benchmark"] == "guidance" and result["num_generated"] == 8 and result["num_real"] == 16
    assert result["sampler"] == {"method": "ddim", "steps": 4, "spacing": "trailing"}
    rows = result["results"]
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0] and all(r["fid"] > 0 for r in rows)
    assert json.loads((out / "guidance.json").read_text()) == result
    grids = [out / "samples_w1_seed0.png", out / "samples_w3_seed0.png"]
    assert (out / "guidance.png").is_file() and grids[0].read_bytes() != grids[1].read_bytes()  # w was applied
    # an unconditional model has nothing to guide: one error line before any sampling
    tiny_run(tmp_path / "uncond")
    bad = start_benchmark("guidance.py", "--checkpoint", str(tmp_path / "uncond"), *sweep, "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("needs a class-conditional one")
    bad = start_benchmark("guidance.py", "--checkpoint", str(tmp_path / "cond"), "--scales", "1,x")
    assert bad.returncode == 2 and "--scales" in bad.stderr


def test_alternatives_quick():
    """Every rejected alternative computes what the model's way does (else its timing means nothing)."""
    proc, result = run_benchmark("alternatives.py", "--quick")
    assert result["benchmark"] == "alternatives" and result["quick"]
    rows = result["results"]
    models = [r for r in rows if r["variant"].endswith("(the model)")]
    others = [r for r in rows if not r["variant"].endswith("(the model)")]
    # one model row per shape (two skip convs, three norm widths each), then at least one alternative
    count = {name: sum(r["comparison"] == name for r in models) for name in {r["comparison"] for r in rows}}
    assert count == {
        "weight_grad": 1,
        "skip_linear": 2,
        "norm_affine": 1,
        "norm_chunks": 3,
        "compiled_norm": 3,
        "save_silu": 1,
    }
    assert all(r["saved_mb"] > 0 for r in rows if r["comparison"] == "save_silu")
    assert all(rows[i + 1] in others for i, r in enumerate(rows) if r in models)
    assert all(r["rel_error"] is None and r["speed_vs_model"] is None for r in models)
    assert all(0 <= r["rel_error"] < 0.03 and r["speed_vs_model"] > 0 and r["ms"] > 0 for r in others)
    assert all(r["gflops"] > 0 for r in rows if r["comparison"] in ("weight_grad", "skip_linear"))
    assert all(r["compile_s"] > 0 for r in others if r["comparison"] == "compiled_norm")
    assert "nine shifted matmuls" in proc.stdout and "vs model" in proc.stdout


def test_alternatives_rejects_an_unknown_comparison():
    proc = start_benchmark("alternatives.py", "--only", "weight_grad,fused_everything")
    assert proc.returncode == 2 and "fused_everything" in proc.stderr and "weight_grad" in proc.stderr


def test_alternatives_refuse_to_time_a_variant_that_computes_something_else(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from alternatives import compare

    x = torch.randn(64)
    timing = {"steps": 1, "warmup": 0}
    rows = compare("demo", x.shape, {"x * 2": lambda: x * 2, "x + x": lambda: x + x}, torch.device("cpu"), timing)
    assert rows[0]["variant"] == "x * 2 (the model)" and rows[1]["rel_error"] == 0
    with pytest.raises(AssertionError, match="'x \\* 2.1' differs from the model's result"):
        compare("demo", x.shape, {"x * 2": lambda: x * 2, "x * 2.1": lambda: x * 2.1}, torch.device("cpu"), timing)


def test_peers_time_any_network_with_the_step_ours_is_timed_with(monkeypatch):
    """peers.py's worker: a network that imports is timed by train_throughput's own step and measurement (so only
    the network differs between the rows); one that does not import comes back as missing, not as a failure."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import peers
    import train_throughput
    from train_throughput import QUICK_OVERRIDES

    stepped = []
    real_training_step = train_throughput.training_step

    def counting_step(*args, **kwargs):
        step = real_training_step(*args, **kwargs)

        def counted():
            stepped.append(1)
            step()

        return counted

    monkeypatch.setattr(peers, "training_step", counting_step)
    monkeypatch.setattr(peers, "build", lambda peer, size: UNet(unet_preset(size, **QUICK_OVERRIDES)))
    monkeypatch.setattr(peers, "version", lambda package: "0.test")
    args = argparse.Namespace(
        peer="diffusers",
        size=32,
        device="cpu",
        malloc="system",
        precision="bf16",
        channels_last="on",
        batch_size=2,
        steps=2,
        warmup=1,
    )
    r = peers.run_config(args)
    assert len(stepped) == 1 + 2  # the first step, reported apart, then the timed ones (warmup 1 is that first)
    assert r["peer"] == "diffusers" and r["version"] == "0.test" and r["channels_last"] and r["batch_size"] == 2
    assert r["images_per_s"] > 0 and r["first_step_s"] > 0 and r["conv_peak_gflops"] > 0
    assert r["utilisation"] == pytest.approx(r["achieved_gflops"] / r["conv_peak_gflops"])
    assert r["achieved_gflops"] == pytest.approx(3 * r["fwd_gflops_per_image"] * r["images_per_s"])

    def missing(peer, size):
        raise ImportError("No module named 'diffusers'")

    monkeypatch.setattr(peers, "build", missing)
    assert peers.run_config(args) == {"peer": "diffusers", "missing": "No module named 'diffusers'"}


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("quality_budget.py", ["--quick", "--samplers", "ddim:many"], "--samplers: bad entry 'ddim:many'"),
        (
            "fid.py",
            ["--quick", "--data-root", "{flowers}", "--weights", "/nonexistent/inception.pt"],
            "/nonexistent/inception.pt",
        ),
        ("samplers.py", ["--size", "thirty"], "--size"),
    ],
    ids=["bad-sampler", "no-inception-weights", "bad-argument"],
)
def test_benchmark_user_errors_are_one_line_with_status_2(script, args, message, tmp_path, flowers_root):
    out = ["--out", str(tmp_path / "out")] if script == "quality_budget.py" else []
    # the data root explicitly: make test exports DATA_ROOT=data, which holds no Flowers102 in CI
    args = [a.replace("{flowers}", str(flowers_root)) for a in args]
    proc = start_benchmark(script, *args, *out)
    # data warnings (the shared copy is partial) may come first; the error is the one last line
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert message in errors[0] and proc.stderr.strip().endswith(errors[0]) and "Traceback" not in proc.stderr
