"""ddpm.viz: every function on small tensors; figures are Figures, files are written and readable."""

import json

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from ddpm import viz
from ddpm.schedules import make_schedule

matplotlib.use("Agg")


def images(n=6, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_to_grid_maps_range_and_layout():
    x = torch.full((4, 3, 5, 5), -1.0)
    x[1] = 1.0
    grid = viz.to_grid(x, nrow=2, padding=1)
    # 2x2 tiles of 5 px with 1 px padding around each: 2 * (5 + 1) + 1 = 13
    assert grid.shape == (3, 13, 13)
    assert grid.min() == 0 and grid.max() == 1
    assert torch.all(grid[:, 1:6, 1:6] == 0)  # image 0: -1 -> 0
    assert torch.all(grid[:, 1:6, 7:12] == 1)  # image 1: +1 -> 1
    assert torch.equal(viz.to_grid(x[1]), torch.ones(3, 5, 5))  # one image: itself, no padding
    u8 = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert viz.to_unit(u8).max() == 1.0
    with pytest.raises(ValueError, match="shape"):
        viz.to_grid(torch.zeros(2, 2))


def test_grid_figures_and_png(tmp_path):
    x = images()
    assert isinstance(viz.grid_figure(x, title="x"), Figure)
    fig = viz.grids_figure({"ddpm": x, "ddim": x, "dpmpp_2m": x}, suptitle="samplers")
    assert len(fig.axes) == 3 and [a.get_title() for a in fig.axes] == ["ddpm", "ddim", "dpmpp_2m"]
    with pytest.raises(ValueError):
        viz.grids_figure({})
    path = viz.save_grid(x, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as img:
        assert img.size == (3 * 10 + 2, 2 * 10 + 2) and img.mode == "RGB"
        # the saved pixels are the grid's, quantised to uint8
        expected = (viz.to_grid(x, nrow=3).permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(np.asarray(img, dtype=np.float64) - expected).max() <= 0.5
    fig = viz.image_files_figure([path, path])
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "grid"
    fig.savefig(tmp_path / "files.png")


def test_figures_show_the_grid_pixels_unchanged():
    # A grid is already in [0, 1]: mapping it from [-1, 1] once more washed every notebook grid out to
    # [0.5, 1] (pale, low contrast). Black must stay black and white white in what imshow is given.
    x = torch.full((2, 3, 4, 4), -1.0)
    x[1] = 1.0
    expected = viz.to_grid(x, nrow=2).permute(1, 2, 0).numpy()
    for fig in (viz.grid_figure(x, nrow=2), viz.grids_figure({"a": x}, nrow=2)):
        shown = fig.axes[0].get_images()[0].get_array()
        shown = np.asarray(shown, dtype=np.float64) / (255 if shown.dtype == np.uint8 else 1)
        assert np.abs(shown - expected).max() <= 0.5 / 255
        assert shown.min() == 0.0 and shown.max() == 1.0


def test_image_row_mixes_tensors_and_arrays():
    photo = np.zeros((30, 50, 3), dtype=np.uint8)
    fig = viz.image_row([photo, images(1)[0]], titles=["original", "preprocessed"])
    assert [a.get_title() for a in fig.axes] == ["original (50x30)", "preprocessed (8x8)"]


def test_plots(tmp_path):
    fig = viz.bar_plot({"train": 10, "val": 10, "test": 60}, title="split")
    assert len(fig.axes[0].patches) == 3
    assert [p.get_height() for p in fig.axes[0].patches] == [10, 10, 60]
    fig = viz.bar_plot([0.5, 0.4, 0.3], labels=["R", "G", "B"], errors=[0.1, 0.1, 0.1])
    assert len(fig.axes[0].patches) == 3
    assert len(viz.bar_plot(list(range(102))).axes[0].patches) == 102
    fig = viz.line_plot({"ddim": ([5, 10, 20], [30, 20, 15]), "ddpm": ([5, 10], [50, 40])}, logx=True)
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].get_xscale() == "log"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["5", "10", "20"]
    fig = viz.size_plot([(500, 600), (700, 500), (640, 480)])
    assert len(fig.axes) == 2
    rows = [{"step": i, "loss": 1 / i} for i in range(1, 201)]
    # by default the average spans about 1/20 of the curve: weight 1 - 20 / 200 on 200 points, none on 19
    assert viz.loss_figure(rows).axes[0].lines[1].get_label() == "smoothed (0.9)"
    assert list(viz.loss_figure(rows[:19]).axes[0].lines[1].get_data()[1]) == [r["loss"] for r in rows[:19]]
    fig = viz.loss_figure(rows[:19], smooth=0.9)
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 2
    steps, smooth = fig.axes[0].lines[1].get_data()
    # debiased EMA: starts at the first value, then (0.9 * 0.1 * 1 + 0.1 * 0.5) / (1 - 0.9^2)
    assert list(steps) == list(range(1, 20)) and smooth[0] == pytest.approx(1.0)
    assert smooth[1] == pytest.approx((0.09 + 0.05) / 0.19)
    assert len(viz.loss_figure([(1, 0.5), (2, 0.4)]).axes[0].lines) == 2
    assert len(viz.loss_figure([]).axes[0].lines) == 0
    fig.savefig(tmp_path / "loss.png")


def test_schedule_and_embedding_figures(tmp_path):
    schedules = [make_schedule("linear", 100), make_schedule("cosine", 50), make_schedule("offset_cosine", 80)]
    fig = viz.schedule_figure(schedules)
    assert len(fig.axes) == 3
    abar_ax, rates_ax, snr_ax = fig.axes
    assert len(abar_ax.lines) == 3 and len(rates_ax.lines) == 6 and len(snr_ax.lines) == 3
    # plotted against t/T: every curve ends at 1 whatever its T; values are the schedule's own
    x, y = abar_ax.lines[1].get_data()
    assert x[-1] == 1.0 and len(x) == 50 and np.allclose(y, schedules[1].alphas_cumprod.numpy())
    x, y = snr_ax.lines[0].get_data()
    assert np.allclose(y, schedules[0].log_snr.numpy())
    fig.savefig(tmp_path / "schedules.png")
    emb = torch.cat(
        [
            torch.cos(torch.arange(10.0)[:, None] * torch.ones(4)),
            torch.sin(torch.arange(10.0)[:, None] * torch.ones(4)),
        ],
        1,
    )
    fig = viz.embedding_figure(emb, timesteps=torch.arange(10))
    assert fig.axes[0].images[0].get_array().shape == (10, 8)


def test_noising_strip_uses_the_forward_process():
    image = images(1, 8)[0]
    schedules = [make_schedule("linear", 100), make_schedule("cosine", 100)]
    fig = viz.noising_strip(image, schedules, [0, 50, 99], seed=3)
    assert len(fig.axes) == 6
    # the t=0 tile under the linear schedule is sqrt(abar_0) x + sqrt(1 - abar_0) eps, clamped, shown in [0, 1]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    a = schedules[0].alphas_cumprod[0].float()
    expected = ((a.sqrt() * image + (1 - a).sqrt() * noise).clamp(-1, 1) + 1) / 2
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(shown, expected.permute(1, 2, 0).numpy(), atol=1e-5)
    assert "t=99" in fig.axes[2].get_title()
    fig = viz.schedule_snapshot(schedules[1], image, 5000)  # t is clamped to T-1
    assert "t=99" in fig.axes[2].get_title()


def test_trajectory_recorder_keeps_every_kth_and_the_last():
    rec = viz.TrajectoryRecorder(every=3, keep=2)
    x = torch.zeros(4, 3, 2, 2)
    for i in range(8):
        rec(i, 100 - 10 * i, x + i, x - i)
    assert [r[0] for r in rec.records] == [0, 3, 6, 7]
    assert rec.timesteps == [100, 70, 40, 30]
    assert len(rec) == 4 and rec.x_t[-1].shape == (2, 3, 2, 2)
    assert float(rec.x_t[1][0, 0, 0, 0]) == 3 and float(rec.x0[1][0, 0, 0, 0]) == -3
    both = rec.frames()
    assert len(both) == 4 and both[1].shape == (4, 3, 2, 2)
    assert float(both[1][0, 0, 0, 0]) == 3 and float(both[1][2, 0, 0, 0]) == -3  # x_t first, then x_0
    assert rec.frames("x0")[1] is rec.x0[1]
    with pytest.raises(ValueError, match="which"):
        rec.frames("noise")
    rec2 = viz.TrajectoryRecorder(every=2)
    for i in range(5):  # the last step (4) is also a multiple: not duplicated
        rec2(i, i, x, x)
    assert [r[0] for r in rec2.records] == [0, 2, 4]
    with pytest.raises(ValueError):
        viz.TrajectoryRecorder(every=0)
    with pytest.raises(ValueError, match="empty"):
        viz.denoising_strip(viz.TrajectoryRecorder())


def test_recorder_with_a_sampler_strip_and_gif(tmp_path):
    from ddpm import GaussianDenoiser
    from ddpm.samplers import sample

    schedule = make_schedule("cosine", 100)
    model = GaussianDenoiser(schedule, torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5))
    rec = viz.TrajectoryRecorder(every=4, keep=2)
    out = sample(
        model,
        schedule,
        (3, 3, 8, 8),
        method="ddim",
        steps=10,
        callback=rec,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert rec.timesteps[0] == 99 and len(rec) == 4  # steps 0, 4, 8 and the last, 9
    assert torch.allclose(rec.x0[-1], out[:2])  # the last x_0 prediction is the sample
    fig = viz.denoising_strip(rec, max_columns=3)
    assert len(fig.axes) == 6
    gif = viz.save_gif(rec.x0, tmp_path / "a" / "denoise.gif", hold_last=5, min_width=64)
    assert gif.n_frames == 4 + 5
    with Image.open(gif.path) as img:
        assert img.format == "GIF" and img.n_frames >= 4  # Pillow may merge identical held frames
        assert img.width >= 64
    assert gif._repr_html_().startswith('<img src="data:image/gif;base64,')
    with pytest.raises(ValueError):
        viz.save_gif([], tmp_path / "empty.gif")


def test_training_monitor_collects_rows_without_a_notebook(tmp_path):
    monitor = viz.TrainingMonitor(show=False)
    for step in (10, 20):
        monitor(step, {"step": step, "loss": 1.0 / step, "run_dir": tmp_path})
    assert [r["step"] for r in monitor.rows] == [10, 20] and "run_dir" not in monitor.rows[0]
    assert "step 20" in monitor.figure().axes[0].get_title()


def test_generate_panel_figure_calls_load_once(tmp_path):
    loads = []

    class Cfg:
        class model:
            num_classes = None

        class diffusion:
            prediction_type = "v_prediction"
            schedule = "linear"

    def load(path):
        loads.append(path)
        return "model", make_schedule("linear", 10), Cfg

    def generate(model, schedule, config, *, n, method, steps, seed, progress):
        assert steps == 10  # clamped to the schedule's T
        return torch.zeros(n, 3, 4, 4)

    panel = viz.GeneratePanel({"run": tmp_path / "run"}, load=load, generate=generate, n=4, steps=50)
    fig = panel.figure(method="dpmpp_2m")
    assert "dpmpp_2m, 10 steps" in fig.axes[0].get_title()
    # no method named: the model's own default sampler (DDIM for a v-prediction model)
    assert "run: ddim, 10 steps" in panel.figure().axes[0].get_title()
    assert loads == [tmp_path / "run"]
    with pytest.raises(ValueError, match="checkpoint"):
        viz.GeneratePanel({}, load=load, generate=generate)


def test_generate_panel_starts_each_checkpoint_on_its_default_sampler():
    def config(prediction_type, schedule):
        class Cfg:
            class model:
                num_classes = None

            class diffusion:
                pass

        Cfg.diffusion.prediction_type, Cfg.diffusion.schedule = prediction_type, schedule
        return Cfg

    configs = {
        "v": config("v_prediction", "cosine"),
        "eps": config("epsilon", "cosine"),
        "v-offset": config("v_prediction", "offset_cosine"),
    }
    panel = viz.GeneratePanel(
        {name: name for name in configs}, load=lambda p: ("model", None, configs[p]), generate=None
    )
    assert panel.default_sampler("v") == ("ddim", 20) and panel.default_sampler("eps") == ("dpmpp_2m_sde", 20)
    assert panel.default_sampler("v-offset") == ("dpmpp_2m_sde", 20)
    pytest.importorskip("ipywidgets")
    box = panel.widget
    pick, method = box.children[0].children
    steps = box.children[1].children[0]
    assert pick.value == "v" and method.value == "ddim" and steps.value == 20
    pick.value = "eps"
    assert method.value == "dpmpp_2m_sde"


def test_training_progress_cuts_the_sample_grids_back_into_images(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"image_size": 8}}))
    torch.manual_seed(0)
    grids = {step: torch.rand(9, 3, 8, 8) * 2 - 1 for step in (0, 250, 500)}
    for step, images in grids.items():
        viz.save_grid(images, run / "samples" / f"step_{step:07d}.png")
    steps, frames = viz.training_frames(run, images=5)
    assert steps == [0, 250, 500] and frames.shape == (3, 5, 3, 8, 8) and frames.dtype == torch.uint8
    expected = (viz.to_unit(grids[250][:5]) * 255).round().to(torch.uint8)
    assert torch.equal(frames[1], expected)  # exactly the images that went into the grid
    assert viz.training_frames(run, images=2, max_frames=2)[0] == [0, 500]  # evenly spaced, ends kept
    viz.main([str(run), "--gif", str(tmp_path / "p.gif"), "--images", "4"])
    assert (run / "progress.png").is_file() and (tmp_path / "p.gif").is_file()
    with pytest.raises(SystemExit, match="holds no step_"):
        viz.main([str(tmp_path)])


def test_generate_panel_driven_through_its_widgets_saves_grid_images_and_zip(tmp_path):
    import zipfile

    class Cfg:
        class model:
            num_classes = 102

        class diffusion:
            prediction_type = "v_prediction"
            schedule = "offset_cosine"

        class train:
            sample_guidance_scale = 2.0  # the weight this model samples with unless told

    calls = []

    def generate(
        model,
        schedule,
        config,
        *,
        n,
        method,
        steps,
        seed,
        progress,
        class_label=None,
        guidance_scale=1.0,
        callback=None,
    ):
        calls.append(
            {
                "n": n,
                "method": method,
                "steps": steps,
                "seed": seed,
                "class_label": class_label,
                "guidance_scale": guidance_scale,
            }
        )
        for i in range(steps):
            callback(i, None, None, None)
        return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    panel = viz.GeneratePanel(
        {"flowers": tmp_path / "m.pt"},
        load=lambda p: ("m", make_schedule("linear", 50), Cfg),
        generate=generate,
        save_dir=tmp_path / "out",
    )
    c = panel.widget.controls
    assert c["method"].value == "dpmpp_2m_sde" and c["save"].disabled  # the model's own sampler; nothing to save
    assert c["label"].options[0] == ("0: pink primrose", 0)  # a class picker by flower name
    assert c["guidance"].value == 2.0 and not c["guidance"].disabled  # starts at the model's own weight
    c["n"].value, c["steps"].value, c["seed"].value, c["label"].value, c["guidance"].value = 5, 7, 3, 2, 2.5
    c["button"].click()
    assert calls == [{"n": 5, "method": "dpmpp_2m_sde", "steps": 7, "seed": 3, "class_label": 2, "guidance_scale": 2.5}]
    assert c["bar"].value == 7 and not c["save"].disabled
    c["save"].click()
    folder = tmp_path / "out" / "flowers_dpmpp_2m_sde_7steps_seed3_n5_class2_guidance2.5"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["000.png", "001.png", "002.png", "003.png", "004.png", "grid.png"]
    assert Image.open(folder / "000.png").size == (8, 8)
    with zipfile.ZipFile(f"{folder}.zip") as z:
        assert sorted(z.namelist()) == names
    panel.images(n=1, steps=1, class_label=0, progress=lambda *a: None)  # from code, no weight: the model's own
    assert calls[-1]["guidance_scale"] == 2.0
    with pytest.raises(RuntimeError, match="nothing generated"):
        viz.GeneratePanel({"a": 1}, load=None, generate=None).save()


def test_class_grid_figure_names_each_row_at_its_centre():
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    fig = viz.class_grid_figure(images, ["rose", "lily"], title="w = 2")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rose", "lily"]
    # make_grid: 2 px padding, then (8 px image + 2 px) per row: the rows' centres are at 6 and 16
    assert list(ax.get_yticks()) == pytest.approx([6, 16]) and ax.get_images()[0].get_array().shape[:2] == (22, 32)
    with pytest.raises(ValueError, match="6 images do not make 4 equal rows"):
        viz.class_grid_figure(images, list("abcd"))


def test_guidance_figure_draws_fid_and_kid_against_the_weight():
    rows = [
        {"guidance_scale": 3.0, "fid": 40.0, "kid_mean": 0.02, "kid_std": 0.002},
        {"guidance_scale": 1.0, "fid": 55.0, "kid_mean": 0.04, "kid_std": 0.003},
    ]
    fid_ax, kid_ax = viz.guidance_figure(rows, title="sweep").axes
    assert list(fid_ax.lines[0].get_xdata()) == [1.0, 3.0] and list(fid_ax.lines[0].get_ydata()) == [55.0, 40.0]
    assert list(kid_ax.lines[0].get_ydata()) == [0.04, 0.02] and "KID" in kid_ax.get_ylabel()


def test_classes_are_named_by_flower_for_flowers102_and_numbered_otherwise():
    assert viz.class_names(102)[:2] == ["pink primrose", "hard-leaved pocket orchid"]
    assert viz.class_names(3) == ["0", "1", "2"]
    assert viz.class_options(102)[53] == ("53: sunflower", 53) and viz.class_options(2) == [("0", 0), ("1", 1)]
