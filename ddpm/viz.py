"""Pictures for the notebooks: grids, schedule plots, noising/denoising strips, GIFs, widgets.

Everything here takes tensors (images in [-1, 1], (B, 3, H, W) or (3, H, W)) and returns a
matplotlib Figure built with `matplotlib.figure.Figure`, not pyplot: the figure is shown once, when a
notebook cell returns it (or display()s it), and is never registered with pyplot, so nothing is
shown twice or kept alive after the cell. Tests can inspect or savefig it.

This module imports only torch, torchvision, numpy, matplotlib and PIL; the widget helpers import
IPython/ipywidgets when called, and take the ddpm functions they drive as arguments, so `viz` stays
free of data and model logic.
"""

from __future__ import annotations

import base64
import inspect
import math
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from ddpm.samplers import default_guidance, default_sampler

# ---------------------------------------------------------------------------------------------- images


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (or uint8 [0, 255]) -> float32 [0, 1] on the CPU."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) images in [-1, 1] -> one (3, H', W') float grid in [0, 1]."""
    images = to_unit(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    return make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)


def _grid_uint8(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """The grid of `images` ([-1, 1]) as an HWC uint8 array: what PNGs, GIFs and imshow take without rescaling."""
    return (to_grid(images, nrow=nrow, padding=padding).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CHW tensor ([-1, 1] float or uint8) or an HWC uint8 array (PIL) -> HWC float array in [0, 1]."""
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.astype(np.float32)
        return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    return to_unit(image).permute(1, 2, 0).numpy()


def _imshow(ax, image, title: str | None = None) -> None:
    ax.imshow(_hwc(image), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def grid_figure(
    images: torch.Tensor, *, nrow: int | None = None, title: str | None = None, size: float = 5.0
) -> Figure:
    """A grid of images ([-1, 1]) as one figure `size` inches wide."""
    grid = _grid_uint8(images, nrow=nrow)  # already in [0, 255]: _imshow must not map [-1, 1] again
    h, w = grid.shape[:2]
    fig = Figure(figsize=(size, size * h / w + (0.35 if title else 0)), layout="constrained")
    _imshow(fig.subplots(), grid, title)
    return fig


def grids_figure(
    panels: dict[str, torch.Tensor], *, nrow: int | None = None, size: float = 3.5, suptitle: str | None = None
) -> Figure:
    """Several grids side by side, titled by their keys (e.g. one per sampler)."""
    if not panels:
        raise ValueError("grids_figure needs at least one {title: images} panel")
    fig = Figure(figsize=(size * len(panels), size + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, images) in zip(axes, panels.items()):
        _imshow(ax, _grid_uint8(images, nrow=nrow), name)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def class_grid_figure(
    images: torch.Tensor, labels: list[str], *, size: float = 0.9, title: str | None = None
) -> Figure:
    """One row of images ([-1, 1] or uint8) per label, the label written left of its row: what sample.class_rows
    draws, labelled with viz.class_names, or a run's progress (progress_figure). `size`: inches per image.
    Save it with save_figure: long labels need the tight bounding box."""
    rows, padding = len(labels), 2
    if rows == 0 or len(images) % rows:
        raise ValueError(f"{len(images)} images do not make {rows} equal rows (one per label)")
    per_row = len(images) // rows
    grid = _grid_uint8(images, nrow=per_row, padding=padding)
    pitch = (grid.shape[0] - padding) / rows  # make_grid: padding, then (image + padding) per row
    fig = Figure(figsize=(size * per_row + 2.0, size * rows + (0.35 if title else 0.1)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(_hwc(grid), interpolation="nearest")
    ax.set_yticks([padding + (i + 0.5) * pitch - padding / 2 for i in range(rows)], labels, fontsize=9)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path, *, dpi: int = 100) -> Path:
    """A figure as a PNG, cropped to what it draws: constrained layout with an aspect-locked image can push long
    row labels past the left edge, and the tight bounding box keeps them (as Jupyter's inline display does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def save_grid(images: torch.Tensor, path, *, nrow: int | None = None, padding: int = 2) -> Path:
    """Images in [-1, 1] as one PNG grid (one image with padding=0); returns the path. The one grid writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil().fromarray(_grid_uint8(images, nrow=nrow, padding=padding)).save(path)
    return path


def image_row(images, *, titles: list[str] | None = None, size: float = 3.0) -> Figure:
    """Images of any sizes in one row (CHW tensors or HWC uint8 arrays), each titled with its size:
    e.g. a photo before and after preprocessing."""
    images = list(images)
    titles = titles or [""] * len(images)
    fig = Figure(figsize=(size * len(images), size + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(images)))
    for ax, image, title in zip(axes, images, titles):
        h, w = _hwc(image).shape[:2]
        _imshow(ax, image, f"{title} ({w}x{h})".strip())
    return fig


def image_files_figure(paths, *, titles: list[str] | None = None, size: float = 4.0) -> Figure:
    """PNG/JPEG files (e.g. the sample grids training writes) side by side, titled by file name."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("image_files_figure needs at least one file")
    titles = titles or [p.stem for p in paths]
    fig = Figure(figsize=(size * len(paths), size + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(paths)))
    for ax, path, title in zip(axes, paths, titles):
        with _pil().open(path) as img:
            _imshow(ax, np.asarray(img.convert("RGB")), title)
    return fig


def _pil():
    from PIL import Image  # torchvision depends on Pillow

    return Image


# ---------------------------------------------------------------------------------------------- plots


def bar_plot(
    values,
    *,
    labels=None,
    errors=None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    colors=None,
    size: tuple[float, float] = (7, 3.5),
    annotate: bool | None = None,
) -> Figure:
    """Bars for a {label: value} dict or a sequence (with `labels`); `errors` draws error bars.
    Values are written on the bars when there are few of them (annotate=None: up to 12)."""
    if isinstance(values, dict):
        labels, values = list(values), list(values.values())
    values = [float(v) for v in values]
    labels = [str(x) for x in (labels if labels is not None else range(len(values)))]
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(values)), values, yerr=errors, color=colors, capsize=3 if errors is not None else 0)
    ax.set_xticks(
        range(len(values)), labels, rotation=0 if len(values) <= 12 else 90, fontsize=None if len(values) <= 40 else 5
    )
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if annotate or (annotate is None and len(values) <= 12):
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def line_plot(
    series: dict,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    size: tuple[float, float] = (6, 4),
) -> Figure:
    """{label: (xs, ys)} as lines with markers, e.g. FID against sampling steps per sampler."""
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=str(label))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
        ticks = sorted({float(x) for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the measured x values, not powers of ten
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    return fig


def guidance_figure(rows: list[dict], *, title: str = "") -> Figure:
    """FID and KID (with its spread) against the classifier-free guidance scale: the rows that
    benchmarks/guidance.py writes ({"guidance_scale", "fid", "kid_mean", "kid_std"})."""
    rows = sorted(rows, key=lambda r: r["guidance_scale"])
    w = [r["guidance_scale"] for r in rows]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_fid, ax_kid = fig.subplots(1, 2)
    ax_fid.plot(w, [r["fid"] for r in rows], marker="o")
    ax_kid.errorbar(w, [r["kid_mean"] for r in rows], yerr=[r["kid_std"] for r in rows], marker="o", capsize=3)
    for ax, name in ((ax_fid, "FID"), (ax_kid, "KID")):
        ax.set(xlabel="guidance scale w (1 = none)", ylabel=f"{name} (lower is better)", xticks=w)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def size_plot(sizes, *, title: str = "original image sizes") -> Figure:
    """(width, height) pairs: a scatter of width against height, and a histogram of the short side."""
    wh = np.asarray(list(sizes), dtype=np.float64).reshape(-1, 2)
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(wh[:, 0], wh[:, 1], s=6, alpha=0.3)
    ax1.set(xlabel="width (px)", ylabel="height (px)", title=f"{title} ({len(wh)} images)")
    ax2.hist(wh.min(axis=1), bins=30)
    ax2.set(xlabel="short side (px)", ylabel="images", title="short side: what the centre crop keeps")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return fig


def _smooth(values, weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard does (divided by 1 - weight^n), so a short
    curve is not dragged toward its first value."""
    out, s = [], 0.0
    for n, v in enumerate(values, start=1):
        s = weight * s + (1 - weight) * v
        out.append(s / (1 - weight**n))
    return out


def loss_figure(history, *, smooth: float | None = None, log: bool = True, title: str = "training loss") -> Figure:
    """Loss against step: `history` holds dicts with "step" and "loss" (train's log rows) or (step, loss) pairs.

    smooth: the moving average's weight; None averages over about 1/20 of the curve (1 - 20 / points), so
    the smoothed line lags a short run's fast initial drop by a few points, not by a fifth of the run.
    """
    rows = [(r["step"], r["loss"]) if isinstance(r, dict) else tuple(r) for r in history]
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    if rows:
        steps, losses = zip(*rows)
        if smooth is None:
            smooth = round(max(0.0, 1 - 20 / len(rows)), 3)
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
        ax.plot(steps, _smooth(losses, smooth), lw=1.5, label=f"smoothed ({smooth:g})")
        if log and min(losses) > 0:
            ax.set_yscale("log")
        ax.legend(loc="upper left")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(True, alpha=0.3)
    scored = [(r["step"], r["fid"]) for r in history if isinstance(r, dict) and "fid" in r]
    if scored:  # FID during training (train.eval_every), on its own axis
        fid_ax = ax.twinx()
        fid_ax.plot(*zip(*scored), "o-", color="C3", lw=1.5, label="FID (EMA samples)")
        fid_ax.set_ylabel("FID")
        fid_ax.legend(loc="upper right")
    return fig


# ---------------------------------------------------------------------------------------------- diffusion


def _label(schedule) -> str:
    params = ", ".join(f"{k}={v:g}" for k, v in schedule.params.items() if isinstance(v, (int, float)))
    return f"{schedule.name} ({params})" if params else schedule.name


def schedule_figure(schedules, *, labels: list[str] | None = None) -> Figure:
    """Several NoiseSchedules in one figure, against t/T (so different T compare): abar_t, the signal
    rate sqrt(abar_t) (solid) and noise rate sqrt(1 - abar_t) (dashed), and log-SNR = log(abar / (1 - abar))."""
    schedules = list(schedules)
    labels = labels or [_label(s) for s in schedules]
    fig = Figure(figsize=(14, 3.8), layout="constrained")
    ax_abar, ax_rates, ax_snr = fig.subplots(1, 3)
    for i, (s, label) in enumerate(zip(schedules, labels)):
        x = (np.arange(s.timesteps) + 1) / s.timesteps
        color = f"C{i}"
        ax_abar.plot(x, s.alphas_cumprod.numpy(), color=color, label=label)
        ax_rates.plot(x, s.signal_rates.numpy(), color=color, label=f"{s.name} signal")
        ax_rates.plot(x, s.noise_rates.numpy(), color=color, ls="--", label=f"{s.name} noise")
        ax_snr.plot(x, s.log_snr.numpy(), color=color, label=label)
    ax_abar.set(title=r"$\bar\alpha_t$ (share of signal variance)", xlabel="t / T")
    ax_rates.set(title=r"signal rate $\sqrt{\bar\alpha_t}$, noise rate $\sqrt{1-\bar\alpha_t}$", xlabel="t / T")
    ax_snr.set(title=r"log-SNR $\log(\bar\alpha_t / (1-\bar\alpha_t))$", xlabel="t / T")
    for ax in (ax_abar, ax_rates, ax_snr):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def embedding_figure(
    embedding: torch.Tensor,
    *,
    timesteps=None,
    title: str = "sinusoidal timestep embedding",
    xlabel: str = "embedding dimension (cos half | sin half)",
    columns=None,
) -> Figure:
    """A (num_timesteps, dim) embedding as a heatmap in [-1, 1]: one row per timestep, one column per
    dimension. `timesteps` labels the rows, `columns` the columns (e.g. timesteps for a similarity matrix)."""
    emb = embedding.detach().cpu().float().numpy()
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    rows = np.asarray(timesteps, dtype=np.float64) if timesteps is not None else np.arange(emb.shape[0])
    cols = np.asarray(columns, dtype=np.float64) if columns is not None else np.arange(emb.shape[1])
    extent = (cols[0], cols[-1], rows[-1], rows[0])
    im = ax.imshow(emb, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", extent=extent)
    ax.set(xlabel=xlabel, ylabel="timestep t" if timesteps is not None else "row", title=title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def noising_strip(image: torch.Tensor, schedules, timesteps, *, seed: int = 0, size: float = 1.6) -> Figure:
    """One image (3, H, W) in [-1, 1] noised to each of `timesteps` under each schedule (one row each),
    with the same noise everywhere, so the rows differ only by the schedule."""
    schedules = list(schedules)
    timesteps = [int(t) for t in timesteps]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    x0 = image.detach().cpu().float()[None].expand(len(timesteps), *image.shape)
    fig = Figure(figsize=(size * len(timesteps), size * len(schedules) + 0.3), layout="constrained")
    axes = np.array(fig.subplots(len(schedules), len(timesteps))).reshape(len(schedules), len(timesteps))
    for row, s in zip(axes, schedules):
        ts = torch.tensor([min(t, s.timesteps - 1) for t in timesteps])
        x_t = s.add_noise(x0, noise[None].expand_as(x0), ts)
        for ax, t, x in zip(row, ts.tolist(), x_t):
            _imshow(ax, x.clamp(-1, 1), f"t={t}  ᾱ={float(s.alphas_cumprod[t]):.3f}")
        row[0].text(-0.1, 0.5, s.name, transform=row[0].transAxes, rotation=90, va="center", ha="right")
    return fig


def schedule_snapshot(schedule, image: torch.Tensor, t: int, *, seed: int = 0) -> Figure:
    """One schedule at one timestep: its rates with t marked, and `image` noised to t (the widget's view)."""
    t = int(min(max(t, 0), schedule.timesteps - 1))
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    x_t = schedule.add_noise(image.detach().cpu().float()[None], noise[None], torch.tensor([t]))[0]
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_curve, ax_clean, ax_noisy = fig.subplots(1, 3, width_ratios=[2, 1, 1])
    steps = np.arange(schedule.timesteps)
    ax_curve.plot(steps, schedule.signal_rates.numpy(), label="signal rate")
    ax_curve.plot(steps, schedule.noise_rates.numpy(), label="noise rate")
    ax_curve.axvline(t, color="k", lw=0.8)
    ax_curve.set(xlabel="t", title=_label(schedule), ylim=(0, 1.02))
    ax_curve.legend(fontsize=8)
    ax_curve.grid(True, alpha=0.3)
    _imshow(ax_clean, image, "x_0")
    abar = float(schedule.alphas_cumprod[t])
    _imshow(ax_noisy, x_t.clamp(-1, 1), f"x_t, t={t}: signal {abar**0.5:.2f}, noise {(1 - abar) ** 0.5:.2f}")
    return fig


class TrajectoryRecorder:
    """A sampler callback, callback(i, t, x_t, x0_pred), that keeps every `every`-th step (and the last).

    rec = TrajectoryRecorder(every=5); sample(..., callback=rec); rec.timesteps, rec.x_t, rec.x0
    Tensors are copied to the CPU; `keep` limits how many images of the batch are stored.
    """

    def __init__(self, every: int = 1, *, keep: int | None = None):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.every, self.keep = every, keep
        self._steps: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self._last = None

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        entry = (
            int(i),
            int(t),
            x_t[: self.keep].detach().float().cpu().clone(),
            x0_pred[: self.keep].detach().float().cpu().clone(),
        )
        if i % self.every == 0:
            self._steps.append(entry)
        self._last = entry

    @property
    def records(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(step index, timestep, x_t, x0_pred) for the kept steps, the last step always included."""
        if self._last is not None and (not self._steps or self._steps[-1][0] != self._last[0]):
            return self._steps + [self._last]
        return list(self._steps)

    @property
    def timesteps(self) -> list[int]:
        return [r[1] for r in self.records]

    @property
    def x_t(self) -> list[torch.Tensor]:
        return [r[2] for r in self.records]

    @property
    def x0(self) -> list[torch.Tensor]:
        return [r[3] for r in self.records]

    def frames(self, which: str = "both") -> list[torch.Tensor]:
        """One batch per kept step for save_gif: "x_t", "x0", or "both" (the x_t images, then their x_0
        predictions, so with nrow = batch size the GIF shows x_t above predicted x_0)."""
        if which not in ("x_t", "x0", "both"):
            raise ValueError(f"which={which!r}: use 'x_t', 'x0' or 'both'")
        if which == "both":
            return [torch.cat([x_t, x0]) for x_t, x0 in zip(self.x_t, self.x0)]
        return self.x_t if which == "x_t" else self.x0

    def __len__(self) -> int:
        return len(self.records)


def denoising_strip(
    recorder: TrajectoryRecorder, *, index: int = 0, max_columns: int = 10, size: float = 1.5
) -> Figure:
    """Top row x_t, bottom row the model's prediction of x_0, along one trajectory (image `index`)."""
    records = recorder.records
    if not records:
        raise ValueError("the recorder is empty: pass it to sample(..., callback=recorder) first")
    picks = np.unique(np.linspace(0, len(records) - 1, min(max_columns, len(records))).round().astype(int))
    fig = Figure(figsize=(size * len(picks), 2 * size + 0.4), layout="constrained")
    axes = np.array(fig.subplots(2, len(picks))).reshape(2, len(picks))
    for col, k in enumerate(picks):
        _, t, x_t, x0 = records[k]
        _imshow(axes[0, col], x_t[index].clamp(-1, 1), f"t={t}")
        _imshow(axes[1, col], x0[index])
    axes[0, 0].text(-0.1, 0.5, "x_t", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "predicted x_0", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    return fig


# ---------------------------------------------------------------------------------------------- GIFs


class GIF:
    """A GIF on disk that Jupyter displays inline (as an <img>, embedded, so it survives in saved notebooks)."""

    def __init__(self, path, *, n_frames: int, width: int):
        self.path, self.n_frames, self.width = Path(path), n_frames, width

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.path.read_bytes()).decode("ascii")
        return f'<img src="data:image/gif;base64,{data}" width="{self.width}" alt="{self.path.name}"/>'

    def __repr__(self) -> str:
        return f"GIF({str(self.path)!r}, n_frames={self.n_frames})"


def save_gif(
    frames, path, *, fps: float = 10, nrow: int | None = None, hold_last: int = 10, min_width: int = 256
) -> GIF:
    """Frames (each (B, C, H, W) or (C, H, W) in [-1, 1]) as an animated GIF that loops.

    Each frame is a grid; small images are enlarged (nearest neighbour) to at least `min_width` px so
    32 px samples are visible; the last frame is held `hold_last` extra frames.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    grids = [_grid_uint8(f, nrow=nrow) for f in frames]
    scale = max(1, math.ceil(min_width / grids[0].shape[1]))
    Image = _pil()
    images = [
        Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.Resampling.NEAREST) for g in grids
    ]
    images += [images[-1]] * hold_last
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, optimize=False)
    return GIF(path, n_frames=len(images), width=images[0].width)


# ---------------------------------------------------------------------------------------------- training progress


def training_frames(run_dir, *, images: int = 8, max_frames: int | None = None) -> tuple[list[int], torch.Tensor]:
    """The training-time sample grids of a run (run_dir/samples/step_*.png, all from the same start noise) cut back
    into images: (steps, uint8 tensor (frames, images, 3, S, S)), the first `images` of each grid. With
    `max_frames`, frames evenly spaced from the first to the last step."""
    import json

    run_dir = Path(run_dir)
    files = sorted((run_dir / "samples").glob("step_*.png"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/samples holds no step_*.png sample grids (train.sample_every = 0?)")
    if max_frames and len(files) > max_frames:
        files = [files[round(i * (len(files) - 1) / (max_frames - 1))] for i in range(max_frames)]
    size = json.loads((run_dir / "config.json").read_text())["data"]["image_size"]
    frames = [_tiles(np.asarray(_pil().open(f).convert("RGB")), size, images) for f in files]
    return [int(f.stem.split("_")[1]) for f in files], torch.stack(frames)


def _tiles(grid: np.ndarray, size: int, count: int, padding: int = 2) -> torch.Tensor:
    """The first `count` size x size images of a grid save_grid wrote (row-major, `padding` px between)."""
    per_row = (grid.shape[1] - padding) // (size + padding)
    tiles = []
    for i in range(min(count, per_row * ((grid.shape[0] - padding) // (size + padding)))):
        y, x = padding + (i // per_row) * (size + padding), padding + (i % per_row) * (size + padding)
        tiles.append(torch.from_numpy(grid[y : y + size, x : x + size].copy()).permute(2, 0, 1))
    return torch.stack(tiles)


def progress_figure(run_dir, *, images: int = 8, max_frames: int = 8, size: float = 1.2) -> Figure:
    """One row per training step, the same start noise in each column: how samples form as training goes."""
    steps, frames = training_frames(run_dir, images=images, max_frames=max_frames)
    return class_grid_figure(frames.flatten(0, 1), [f"step {s:,}" for s in steps], size=size)


def progress_gif(run_dir, path, *, images: int = 16, fps: float = 2) -> GIF:
    """The training-time sample grids of a run as an animation, step 0 to the end."""
    _, frames = training_frames(run_dir, images=images)
    return save_gif(list(frames), path, fps=fps, hold_last=4)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m ddpm.viz", description="A run's training-time sample grids as a progress montage and a GIF."
    )
    p.add_argument("run_dir", help="a run folder (its samples/step_*.png and config.json)")
    p.add_argument("--out", default=None, help="montage PNG (default RUN_DIR/progress.png)")
    p.add_argument("--gif", default=None, help="also write this GIF")
    p.add_argument("--images", type=int, default=8, help="images per step (the first of each grid)")
    p.add_argument("--frames", type=int, default=8, help="steps in the montage, evenly spaced")
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.run_dir) / "progress.png")
    try:
        save_figure(progress_figure(args.run_dir, images=args.images, max_frames=args.frames), out)
        if args.gif:
            progress_gif(args.run_dir, args.gif, images=args.images)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}" + (f" and {args.gif}" if args.gif else ""))


# ---------------------------------------------------------------------------------------------- widgets


def _display():
    from IPython.display import display

    return display


class TrainingMonitor:
    """A callback for ddpm.train.train(..., callback=monitor): redraws the loss curve in place and
    shows the newest sample grid the run has written (run_dir/samples/*.png).

    Works outside Jupyter too (it then only collects the rows). monitor.figure() is the loss figure.
    """

    def __init__(self, *, every: int = 1, show: bool = True):
        self.rows: list[dict] = []
        self.every, self.show = every, show
        self._loss_handle = self._sample_handle = None
        self._shown_sample = None

    def __call__(self, step: int, row: dict) -> None:
        self.rows.append({k: v for k, v in row.items() if k != "run_dir"})
        if not self.show or len(self.rows) % self.every:
            return
        try:
            display = _display()
        except ImportError:
            return
        fig = self.figure()
        if self._loss_handle is None:
            self._loss_handle = display(fig, display_id=True)
        else:
            self._loss_handle.update(fig)
        samples = sorted((Path(row["run_dir"]) / "samples").glob("*.png")) if "run_dir" in row else []
        if samples and samples[-1] != self._shown_sample:
            self._shown_sample = samples[-1]
            sample_fig = image_files_figure(samples[-1:])
            if self._sample_handle is None:
                self._sample_handle = display(sample_fig, display_id=True)
            else:
                self._sample_handle.update(sample_fig)

    def figure(self) -> Figure:
        last = self.rows[-1] if self.rows else None
        title = f"training loss (step {last['step']}: {last['loss']:.4f})" if last else "training loss"
        return loss_figure(self.rows, title=title)


def schedule_explorer(image: torch.Tensor, make_schedule, *, seed: int = 0):
    """Sliders for schedule, T, beta range, min/max signal rate and t that redraw schedule_snapshot live.

    make_schedule: ddpm.make_schedule (passed in so this module needs no ddpm import).
    Returns an ipywidgets.VBox; the widgets that do not apply to the chosen schedule are disabled.
    """
    import ipywidgets as w

    name = w.Dropdown(options=["linear", "cosine", "offset_cosine"], value="cosine", description="schedule")
    T = w.IntSlider(value=1000, min=10, max=2000, step=10, description="T", continuous_update=False)
    beta = w.FloatRangeSlider(
        value=(1e-4, 0.02),
        min=1e-5,
        max=0.05,
        step=1e-4,
        readout_format=".4f",
        description="beta range",
        continuous_update=False,
    )
    rates = w.FloatRangeSlider(
        value=(0.02, 0.95),
        min=0.001,
        max=0.999,
        step=0.001,
        readout_format=".3f",
        description="signal rate",
        continuous_update=False,
    )
    t = w.IntSlider(value=500, min=0, max=999, description="t", continuous_update=False)
    out = w.Output()

    def params():
        if name.value == "linear":
            return {"beta_start": beta.value[0], "beta_end": beta.value[1]}
        if name.value == "offset_cosine":
            return {"min_signal_rate": rates.value[0], "max_signal_rate": rates.value[1]}
        return {}

    def redraw(_=None):
        beta.disabled, rates.disabled = name.value != "linear", name.value != "offset_cosine"
        t.max = T.value - 1
        with out:
            out.clear_output(wait=True)
            try:
                _display()(schedule_snapshot(make_schedule(name.value, T.value, **params()), image, t.value, seed=seed))
            except ValueError as err:  # e.g. equal ends of a range: say why instead of a traceback
                print(err)

    for widget in (name, T, beta, rates, t):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([name, T]), w.HBox([beta, rates]), t, out])


# Slider range, step and readout format of each schedule parameter (ddpm.schedules' names); others get a
# range around their default.
SCHEDULE_SLIDERS = {
    "beta_start": (1e-5, 0.01, 1e-5, ".5f"),
    "beta_end": (1e-3, 0.05, 1e-4, ".4f"),
    "s": (0.0, 0.1, 0.001, ".3f"),
    "max_beta": (0.9, 0.9999, 1e-4, ".4f"),
    "max_signal_rate": (0.5, 0.999, 0.001, ".3f"),
    "min_signal_rate": (0.001, 0.5, 0.001, ".3f"),
    "start": (-10.0, 0.0, 0.1, ".1f"),
    "end": (0.0, 10.0, 0.1, ".1f"),
    "tau": (0.1, 3.0, 0.05, ".2f"),
}


def schedule_sliders(image: torch.Tensor, make_schedule, defaults: dict, *, value: str = "cosine", seed: int = 0):
    """schedule_explorer for any schedules: one slider per parameter that some schedule takes.

    defaults: {schedule name: {parameter: default}} (e.g. from ddpm.schedules.default_params); the sliders
    of parameters the chosen schedule does not take are disabled. Returns an ipywidgets.VBox.
    """
    import ipywidgets as w

    names = list(defaults)
    params = {p: v for d in defaults.values() for p, v in d.items()}
    sliders = {}
    for p, v in params.items():
        lo, hi, step, fmt = SCHEDULE_SLIDERS.get(p, (min(0.0, 2 * v), max(1.0, 2 * v), 0.01, ".2f"))
        sliders[p] = w.FloatSlider(
            value=v, min=lo, max=hi, step=step, readout_format=fmt, description=p, continuous_update=False
        )
    name = w.Dropdown(options=names, value=value if value in names else names[0], description="schedule")
    T = w.IntSlider(value=1000, min=10, max=2000, step=10, description="T", continuous_update=False)
    t = w.IntSlider(value=500, min=0, max=999, description="t", continuous_update=False)
    out = w.Output()

    def redraw(_=None):
        for p, slider in sliders.items():
            slider.disabled = p not in defaults[name.value]
        t.max = T.value - 1
        chosen = {p: sliders[p].value for p in defaults[name.value]}
        with out:
            out.clear_output(wait=True)
            try:
                _display()(schedule_snapshot(make_schedule(name.value, T.value, **chosen), image, t.value, seed=seed))
            except ValueError as err:  # e.g. beta_start above beta_end: say why instead of a traceback
                print(err)

    for widget in (name, T, t, *sliders.values()):
        widget.observe(redraw, names="value")
    redraw()
    rows = [w.HBox(list(sliders.values())[i : i + 3]) for i in range(0, len(sliders), 3)]
    return w.VBox([w.HBox([name, T]), *rows, t, out])


class GeneratePanel:
    """A small app: pick a model, sampler, steps, seed and number of images (a flower class and the guidance
    weight for conditional models), press Generate, watch the progress bar, get the grid; Save writes the grid
    and every image as PNG into a folder named after the settings, plus a zip offered as a download link.

    checkpoints: {name: path} of models (exported .pt files, checkpoints or run folders).
    load:        ddpm.checkpoint.load_model (path -> (model, schedule, config)); models are loaded once.
    generate:    ddpm.sample.generate (model, schedule, config, n=..., method=..., ...) -> images.
    methods:     the samplers offered; each model starts on its own default sampler and steps
                 (ddpm.samplers.default_sampler), unless steps is given.
    save_dir:    where Save writes (relative to the notebook's folder, so Jupyter can serve the zip).
    panel.figure(...) generates without widgets and returns the grid figure (the static fallback).
    """

    def __init__(
        self,
        checkpoints: dict,
        *,
        load,
        generate,
        methods=("ddim", "dpmpp_2m_sde", "dpmpp_2m", "ddpm"),
        steps: int | None = None,
        n: int = 16,
        seed: int = 0,
        save_dir="generated",
    ):
        if not checkpoints:
            raise ValueError("GeneratePanel needs at least one checkpoint ({name: path}); train one first")
        self.checkpoints, self.load, self.generate = dict(checkpoints), load, generate
        self.methods, self.steps, self.n, self.seed = tuple(methods), steps, n, seed
        self.save_dir = Path(save_dir)
        self.last = None  # (images, settings) of the last Generate, what Save writes
        self._models: dict = {}
        self._widget = None

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = self.load(self.checkpoints[name])
        return self._models[name]

    def images(
        self,
        name: str | None = None,
        *,
        method: str | None = None,
        steps: int | None = None,
        seed: int | None = None,
        n: int | None = None,
        class_label: int | None = None,
        guidance_scale: float | None = None,
        progress=None,
    ) -> tuple[torch.Tensor, dict]:
        """Generate and return (images, settings); the settings name the Save folder and title the grid.
        guidance_scale None: the model's own (ddpm.samplers.default_guidance)."""
        name = name or next(iter(self.checkpoints))
        model, schedule, config = self.model(name)
        default_method, default_steps = self.default_sampler(name)
        method, steps = method or default_method, steps or default_steps
        kwargs = {
            "n": n or self.n,
            "method": method,
            "steps": min(steps, schedule.timesteps),
            "seed": self.seed if seed is None else seed,
            "progress": False,
        }
        if config.model.num_classes is not None:
            w = default_guidance(config) if guidance_scale is None else guidance_scale
            kwargs.update(class_label=class_label, guidance_scale=w)
        if progress is not None and "callback" in inspect.signature(self.generate).parameters:
            kwargs["callback"] = progress
        start = time.perf_counter()
        images = self.generate(model, schedule, config, **kwargs)
        settings = {
            "model": name,
            **{k: v for k, v in kwargs.items() if k not in ("progress", "callback")},
            "seconds": time.perf_counter() - start,
        }
        self.last = (images, settings)
        return images, settings

    def figure(self, name: str | None = None, **options) -> Figure:
        """Generate (as images()) and return the grid figure: what the button shows."""
        images, s = self.images(name, **options)
        label = f", class {s['class_label']}, guidance {s['guidance_scale']:g}" if "class_label" in s else ""
        return grid_figure(
            images,
            title=f"{s['model']}: {s['method']}, {s['steps']} steps, seed {s['seed']}{label} ({s['seconds']:.1f} s)",
        )

    def save(self) -> tuple[Path, Path]:
        """Write the last generated images: save_dir/SETTINGS/grid.png, 000.png, ..., and SETTINGS.zip beside it."""
        import shutil

        if self.last is None:
            raise RuntimeError("nothing generated yet: press Generate (or call figure()/images()) first")
        images, s = self.last
        label = f"_class{s['class_label']}_guidance{s['guidance_scale']:g}" if "class_label" in s else ""
        folder = self.save_dir / f"{s['model']}_{s['method']}_{s['steps']}steps_seed{s['seed']}_n{s['n']}{label}"
        save_grid(images, folder / "grid.png")
        width = max(3, len(str(len(images) - 1)))
        for i, image in enumerate(images):
            save_grid(image[None], folder / f"{i:0{width}d}.png", padding=0)
        archive = Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
        return folder, archive

    def default_sampler(self, name: str) -> tuple[str, int]:
        """(method, steps) the panel starts on for model `name`: the model's own default sampler,
        at self.steps if set."""
        d = self.model(name)[2].diffusion
        method, steps = default_sampler(d.prediction_type, d.schedule)
        return method, self.steps or steps

    @property
    def widget(self):
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _controls(self) -> dict:
        import ipywidgets as w

        return {
            "pick": w.Dropdown(options=list(self.checkpoints), description="model"),
            "method": w.Dropdown(options=list(self.methods), description="sampler"),
            "steps": w.IntSlider(value=self.steps or 20, min=1, max=1000, description="steps"),
            "seed": w.IntText(value=self.seed, description="seed"),
            "n": w.IntSlider(value=self.n, min=1, max=256, description="images"),
            "label": w.Dropdown(options=[("(none)", 0)], description="class"),
            "guidance": w.FloatSlider(value=1.0, min=0.0, max=10.0, step=0.5, description="guidance"),
            "button": w.Button(description="Generate", button_style="primary"),
            "save": w.Button(description="Save", disabled=True),
            "bar": w.IntProgress(value=0, min=0, max=1, description="progress"),
            "out": w.Output(),
            "files": w.Output(),
        }

    def _build(self):
        import ipywidgets as w

        c = self._controls()
        c["pick"].observe(lambda _: self._on_pick(c), names="value")
        c["button"].on_click(lambda _: self._on_generate(c))
        c["save"].on_click(lambda _: self._on_save(c))
        self._on_pick(c)
        box = w.VBox(
            [
                w.HBox([c["pick"], c["method"]]),
                w.HBox([c["steps"], c["seed"]]),
                w.HBox([c["n"]]),
                w.HBox([c["label"], c["guidance"]]),
                w.HBox([c["button"], c["bar"], c["save"]]),
                c["out"],
                c["files"],
            ]
        )
        box.controls = c  # for tests and for users who want to drive the panel from code
        return box

    def _on_pick(self, c) -> None:
        classes = self.model(c["pick"].value)[2].model.num_classes
        c["label"].disabled = c["guidance"].disabled = classes is None
        c["label"].options = class_options(classes) if classes else [("(none)", 0)]
        default_method, c["steps"].value = self.default_sampler(c["pick"].value)
        c["guidance"].value = default_guidance(self.model(c["pick"].value)[2]) if classes else 1.0
        if default_method in self.methods:
            c["method"].value = default_method

    def _on_generate(self, c) -> None:
        c["button"].disabled = True
        c["bar"].value, c["bar"].max = 0, c["steps"].value

        def progress(i, *args):
            c["bar"].value = i + 1

        try:
            fig = self.figure(
                c["pick"].value,
                method=c["method"].value,
                steps=c["steps"].value,
                seed=c["seed"].value,
                n=c["n"].value,
                guidance_scale=c["guidance"].value,
                class_label=None if c["label"].disabled else c["label"].value,
                progress=progress,
            )
            c["bar"].value = c["bar"].max
            c["save"].disabled = False
            with c["out"]:
                c["out"].clear_output(wait=True)
                _display()(fig)
        except Exception as err:  # noqa: BLE001 -- any failure is shown in the panel, not lost in a log
            with c["out"]:
                c["out"].clear_output()
                print(f"{type(err).__name__}: {err}")
        finally:
            c["button"].disabled = False

    def _on_save(self, c) -> None:
        from IPython.display import FileLink

        folder, archive = self.save()
        with c["files"]:
            c["files"].clear_output()
            print(f"wrote {folder}/ (grid.png and {len(self.last[0])} images)")
            _display()(FileLink(str(archive), result_html_prefix="download: "))

    def _ipython_display_(self):
        _display()(self.widget)


def class_names(num_classes: int) -> list[str]:
    """What to call each class: Flowers102's flower names for a 102-class model, else the numbers."""
    if num_classes == 102:
        from .data import flowers102_class_names

        return flowers102_class_names()
    return [str(i) for i in range(num_classes)]


def class_options(num_classes: int) -> list[tuple[str, int]]:
    """(label, class index) choices for a class picker: "12: colt's foot" for Flowers102, else numbers."""
    names = class_names(num_classes)
    return [(f"{i}: {name}" if name != str(i) else name, i) for i, name in enumerate(names)]


if __name__ == "__main__":
    main()
