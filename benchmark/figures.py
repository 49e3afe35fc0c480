"""Every matplotlib figure of leakbench, as PNG bytes: the cell figure of a run and the figure of
the security-boundary study.

**Cell figure** (``figures/<cell>.png`` in a run folder): two rows, "ground truth" and
"reconstruction", one column per shown sample. Tiles are enlarged by an integer factor with
nearest-neighbour repetition (to at least :data:`MIN_TILE_PX` pixels on their longer side) and
placed pixel for pixel (``Figure.figimage``), so the figure shows the very pixels that were scored.
Under each reconstruction: its PSNR and SSIM; a sample no reconstruction was matched to (or a
failed trial) gets an empty tile labelled "not reconstructed". The title names the cell and
gives its median PSNR over all images and its trial count (the numbers of ``summary.json``).

**Boundary figure**: P(exclusivity condition) versus batch size with 95 % Wilson score intervals
(Wilson, 1927), and the median PSNR per ExAN bin with the 95 % distribution-free order-statistic
interval of a median (``scipy.stats.quantile_test``); every point is annotated with its count.
With fewer than 6 values no order-statistic interval reaches 95 %: that point has no bar.

**Privacy–utility figure** of a defense track: one point per defense setting, the worst-case
median PSNR over the applicable attacks against the test accuracy of victims trained with it
(horizontal bar: the range over the utility seeds), the undefended accuracy as a dashed line.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window, also on machines without a display

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402
from torch import Tensor  # noqa: E402

MIN_TILE_PX = 96  # a tile's longer side at least: 8×8 digits ×12, 32×32 ×3, 25×25 faces ×4
MAX_TILES = 8  # samples shown per cell
# The cell figure's layout, in pixels. A power-of-two DPI keeps inch ↔ pixel conversions exact,
# so a figure is exactly the size :func:`cell_figure_size` says.
DPI = 128
LEFT, RIGHT, GAP = 124, 10, 8
TITLE, LABEL, CAPTION, BOTTOM = 46, 18, 34, 6
MIN_WIDTH = 440
EMPTY_TILE = 235  # light grey: clearly no image, unlike a black or white reconstruction
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Tile:
    """One sample of a cell: its ground truth and the reconstruction matched to it (uint8 HWC
    RGB), or ``None`` where nothing was reconstructed, with that sample's scores."""

    trial: int
    truth: np.ndarray
    reconstruction: np.ndarray | None
    psnr: float
    ssim: float


def to_uint8(pixels: Tensor | np.ndarray) -> np.ndarray:
    """Pixels in [0, 1], (C, H, W) with C = 1 or 3, as uint8 (H, W, 3): what PNG writers and
    ``wandb.Image`` take (wandb casts floats to uint8 without scaling: [0, 1] would be black)."""
    array = pixels.detach().cpu().double().numpy() if isinstance(pixels, Tensor) else pixels
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"pixels: shape {array.shape}, expected (C, H, W) with C = 1 or 3")
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


def tiles_of(
    record: dict[str, Any], pairs: Sequence[tuple[Tensor, Tensor]], limit: int = MAX_TILES
) -> list[Tile]:
    """The first ``limit`` samples of a trial (its record and (truth, matched pixels) pairs)."""
    tiles = []
    for sample, (truth, matched) in zip(record["metrics"]["samples"], pairs[:limit], strict=False):
        reconstructed = sample["matched_reconstruction"] is not None
        tiles.append(
            Tile(
                trial=int(record["trial"]),
                truth=to_uint8(truth),
                reconstruction=to_uint8(matched) if reconstructed else None,
                psnr=float(sample["psnr"]),
                ssim=float(sample["ssim"]),
            )
        )
    return tiles


def tile_scale(height: int, width: int) -> int:
    """The integer enlargement that brings an image's longer side to at least MIN_TILE_PX."""
    return max(1, math.ceil(MIN_TILE_PX / max(height, width)))


def cell_figure_size(tiles: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of the cell figure of ``tiles`` samples of height × width."""
    scale = tile_scale(height, width)
    figure_width = max(MIN_WIDTH, LEFT + tiles * (scale * width + GAP) - GAP + RIGHT)
    return figure_width, TITLE + 2 * scale * height + LABEL + CAPTION + BOTTOM


def cell_figure(tiles: Sequence[Tile], cell: str, aggregates: dict[str, Any]) -> bytes:
    """The cell figure as PNG bytes; ``aggregates`` is the cell's entry of ``summary.json``."""
    if not tiles:
        raise ValueError(f"cell {cell!r}: no tiles to draw, expected at least one sample")
    tiles = list(tiles[:MAX_TILES])
    height, width = tiles[0].truth.shape[:2]
    scale = tile_scale(height, width)
    tile_h, tile_w = scale * height, scale * width
    fig_w, fig_h = cell_figure_size(len(tiles), height, width)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")

    def text(x: float, y: float, words: str, **options: Any) -> None:
        # Pixel coordinates from the top-left corner, as the layout is written.
        fig.text(x / fig_w, 1 - y / fig_h, words, fontsize=options.pop("size", 7), **options)

    median = aggregates["psnr"]["median"]
    median_words = "no image scored" if median is None else f"median PSNR {median:.2f} dB"
    text(8, 6, cell, size=9, weight="bold", va="top")
    text(
        8,
        24,
        f"{median_words} over {aggregates['images']} images; "
        f"{aggregates['trials']} trials, {aggregates['failed']} failed",
        va="top",
    )
    truth_top = TITLE
    recon_top = TITLE + tile_h + LABEL
    text(LEFT - 8, truth_top + tile_h / 2, "ground truth", ha="right", va="center", size=8)
    text(LEFT - 8, recon_top + tile_h / 2, "reconstruction", ha="right", va="center", size=8)
    for column, tile in enumerate(tiles):
        x = LEFT + column * (tile_w + GAP)
        _place(fig, tile.truth, scale, x, truth_top, fig_h)
        text(x + tile_w / 2, truth_top + tile_h + 2, f"trial {tile.trial}", ha="center", va="top")
        if tile.reconstruction is None:
            empty = np.full((height, width, 3), EMPTY_TILE, dtype=np.uint8)
            _place(fig, empty, scale, x, recon_top, fig_h)
            words = "not\nreconstructed"
            text(x + tile_w / 2, recon_top + tile_h / 2, words, ha="center", va="center")
            caption = "-"
        else:
            _place(fig, tile.reconstruction, scale, x, recon_top, fig_h)
            caption = f"PSNR {tile.psnr:.1f} dB\nSSIM {tile.ssim:.3f}"
        text(x + tile_w / 2, recon_top + tile_h + 2, caption, ha="center", va="top")
    return _png(fig)


def _place(fig: Figure, image: np.ndarray, scale: int, left: int, top: int, fig_h: int) -> None:
    """Draw ``image`` enlarged ``scale``× (nearest neighbour) with its top-left corner at pixel
    (left, top), unresampled: figimage maps one array element to one output pixel."""
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    fig.figimage(big, xo=left, yo=fig_h - top - big.shape[0], origin="upper")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a success rate."""
    if trials < 1:
        raise ValueError(f"trials: {trials}, expected at least 1")
    interval = stats.binomtest(successes, trials).proportion_ci(CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95 % distribution-free (order-statistic) interval of a median; (nan, nan) for fewer
    than 6 values, where even [min, max] covers less than 95 %."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("values: empty, expected at least one value")
    interval = stats.quantile_test(array, q=float(np.median(array)), p=0.5).confidence_interval(
        CONFIDENCE
    )
    return float(interval.low), float(interval.high)


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def boundary_figure(
    condition: list[dict[str, Any]], binned: list[dict[str, Any]], title: str
) -> bytes:
    """The boundary study's curves as PNG bytes. ``condition`` rows: state, batch_size, trials,
    p_condition; ``binned`` rows: state, min_exans, samples, psnr_median, psnr_median_low/high
    (None where no interval exists)."""
    panels = 2 if binned else 1
    fig = Figure(figsize=(5.5 * panels, 4.2), dpi=120, facecolor="white")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    for state in dict.fromkeys(r["state"] for r in condition):
        rows = [r for r in condition if r["state"] == state]
        x = np.array([r["batch_size"] for r in rows], dtype=np.float64)
        p = np.array([r["p_condition"] for r in rows], dtype=np.float64)
        # p is the mean of `trials` booleans: the count of successes is exact after rounding.
        bounds = np.array(
            [wilson_interval(round(r["p_condition"] * r["trials"]), r["trials"]) for r in rows]
        )
        line = ax.errorbar(
            x, p, yerr=[p - bounds[:, 0], bounds[:, 1] - p], fmt="o-", capsize=3, label=state
        )
        for r, xi, pi in zip(rows, x, p, strict=True):
            ax.annotate(
                f"n={r['trials']}", (xi, pi), textcoords="offset points", xytext=(4, 6),
                fontsize=7, color=line[0].get_color(),
            )  # fmt: skip
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in condition})
    ax.set_xticks(sizes, [str(b) for b in sizes])  # batch sizes as numbers, not powers of 2
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("P(exclusivity condition), 95 % Wilson interval")
    ax.set_ylim(-0.05, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("insecure boundary")
    if binned:
        ax = axes[1]
        bins = list(dict.fromkeys(r["min_exans"] for r in binned))  # in the study's bin order
        for state in dict.fromkeys(r["state"] for r in binned):
            rows = [r for r in binned if r["state"] == state]
            positions = np.array([bins.index(r["min_exans"]) for r in rows], dtype=np.float64)
            median = np.array([r["psnr_median"] for r in rows], dtype=np.float64)
            # No bar where no 95 % interval exists (None or nan): the count says why.
            low = np.array([_number(r["psnr_median_low"]) for r in rows], dtype=np.float64)
            high = np.array([_number(r["psnr_median_high"]) for r in rows], dtype=np.float64)
            below = np.where(np.isnan(low), 0.0, median - low)
            above = np.where(np.isnan(high), 0.0, high - median)
            line = ax.errorbar(
                positions, median, yerr=[below, above], fmt="o-", capsize=3, label=state
            )
            for r, xi, yi in zip(rows, positions, median, strict=True):
                ax.annotate(
                    f"n={r['samples']}", (xi, yi), textcoords="offset points", xytext=(4, 6),
                    fontsize=7, color=line[0].get_color(),
                )  # fmt: skip
        ax.set_xticks(np.arange(len(bins)), bins)
        ax.set_xlabel("fewest ExANs of the sample over its ReLU layers")
        ax.set_ylabel("median PSNR (dB), 95 % order-statistic interval")
        ax.legend(fontsize=8)
        ax.set_title("attack quality vs exclusivity")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def privacy_utility_figure(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """The defense track's scatter as PNG bytes. ``rows``: the table's rows (setting,
    worst_psnr_median, worst_psnr_attack, accuracy, accuracy_per_seed, undefended_accuracy).
    Points are told apart by colour and marker in the legend (settings often overlap)."""
    fig = Figure(figsize=(9.5, 5.0), dpi=120, facecolor="white")
    ax = fig.subplots()
    markers = "osD^vP*Xh<>"
    for i, row in enumerate(rows):
        psnr = _number(row["worst_psnr_median"])
        seeds = row["accuracy_per_seed"]
        ax.errorbar(
            row["accuracy"],
            psnr,
            xerr=[[row["accuracy"] - min(seeds)], [max(seeds) - row["accuracy"]]],
            fmt=markers[i % len(markers)],
            color=matplotlib.colormaps["tab20"](i % 20),
            markersize=7,
            capsize=3,
            label=f"{row['setting']} ({row['worst_psnr_attack']})",
        )
    ax.axvline(
        rows[0]["undefended_accuracy"],
        linestyle="--",
        color="grey",
        linewidth=1,
        label="undefended accuracy",
    )
    ax.set_xlabel("test accuracy of victims trained with the defense (range over seeds)")
    ax.set_ylabel("worst-case median PSNR over attacks (dB)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="setting (attack)")
    fig.tight_layout()
    return _png(fig)
