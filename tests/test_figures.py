"""Figures a person can read and a progress bar that says what runs: the cell figures of a run
(size, pixels, "not reconstructed" tiles), the intervals of the boundary figure, the bar."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from leakbench.figures import (
    EMPTY_TILE,
    LEFT,
    TITLE,
    Tile,
    boundary_figure,
    cell_figure,
    median_interval,
    to_uint8,
    wilson_interval,
)
from leakbench.progress import track
from leakbench.runner import run
from tests.components import small_bias_run

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def tiny_run(tmp_path, progress=False, **overrides):
    return run(small_bias_run(tmp_path, **overrides), progress=progress, echo=lambda _: None)


def rgb(path_or_bytes):
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def test_a_two_cell_run_writes_one_readable_figure_per_cell(tmp_path):
    summary = tiny_run(tmp_path)
    figures = tmp_path / "run" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == ["bias__none__b1.png", "bias__none__b2.png"]
    # 8x8 tiles drawn 12x (96 px): B=1 shows 2 samples (minimum width 440 px), B=2 shows 4:
    # 124 + 4 * (96 + 8) - 8 + 10 = 542 px wide; 46 + 96 + 18 + 96 + 34 + 6 = 296 px high.
    with Image.open(figures / "bias__none__b1.png") as image:
        assert image.size == (440, 296)
    with Image.open(figures / "bias__none__b2.png") as image:
        assert image.size == (542, 296)
    # B=2: the bias attack returns one image, so each trial has one sample not reconstructed.
    pixels = rgb(figures / "bias__none__b2.png")
    recon_top = TITLE + 96 + 18
    empty = [
        column
        for column in range(4)
        if (pixels[recon_top + 2, LEFT + column * 104 + 2] == EMPTY_TILE).all()
    ]
    assert len(empty) == 2
    assert summary["cells"]["bias__none__b2"]["trials"] == 2


def test_tiles_are_the_scored_pixels_enlarged_by_nearest_neighbour():
    generator = torch.Generator().manual_seed(0)
    truth = torch.rand(3, 8, 8, generator=generator, dtype=torch.float64)
    recon = torch.rand(3, 8, 8, generator=generator, dtype=torch.float64)
    tiles = [
        Tile(0, to_uint8(truth), to_uint8(recon), 21.5, 0.75),
        Tile(1, to_uint8(recon), None, 3.0, 0.0),
    ]
    aggregates = {"psnr": {"median": 12.25}, "images": 2, "trials": 2, "failed": 1}
    pixels = rgb(cell_figure(tiles, "a__none__b1", aggregates))
    expected_truth = np.round(truth.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    big = np.repeat(np.repeat(expected_truth, 12, axis=0), 12, axis=1)
    assert np.array_equal(pixels[TITLE : TITLE + 96, LEFT : LEFT + 96], big)
    recon_top = TITLE + 96 + 18
    expected_recon = np.repeat(np.repeat(to_uint8(recon), 12, axis=0), 12, axis=1)
    assert np.array_equal(pixels[recon_top : recon_top + 96, LEFT : LEFT + 96], expected_recon)
    # the second tile is empty grey with the words "not reconstructed" drawn on it (dark text)
    empty = pixels[recon_top : recon_top + 96, LEFT + 104 : LEFT + 200]
    assert (empty[:10] == EMPTY_TILE).all() and empty.min() < 100


def test_grey_pixels_become_three_equal_channels_and_bad_shapes_are_refused():
    grey = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]])
    assert to_uint8(grey).tolist() == [[[0] * 3, [128] * 3], [[255] * 3, [255] * 3]]
    with pytest.raises(ValueError, match=r"pixels: shape \(2, 2\), expected \(C, H, W\)"):
        to_uint8(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="cell 'x': no tiles to draw"):
        cell_figure([], "x", {})


def wilson_closed_form(k, n):
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(3, 10), (0, 10), (20, 20), (7, 40)])
def test_wilson_interval_matches_the_closed_form(k, n):
    low, high = wilson_interval(k, n)
    expected_low, expected_high = wilson_closed_form(k, n)
    assert low == pytest.approx(max(expected_low, 0.0), abs=1e-12)
    assert high == pytest.approx(min(expected_high, 1.0), abs=1e-12)


def test_median_interval_is_the_order_statistic_interval():
    # n = 10: [x_(2), x_(9)] covers 1 - 2 P(Bin(10, 1/2) <= 1) = 0.979; [x_(3), x_(8)] only 0.891
    assert median_interval([9, 3, 0, 5, 1, 8, 2, 7, 4, 6]) == (1.0, 8.0)
    # n = 5: even [min, max] covers 1 - 2/32 = 0.9375 < 0.95: no interval
    assert all(math.isnan(v) for v in median_interval([1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="values: empty"):
        median_interval([])
    with pytest.raises(ValueError, match="trials: 0, expected at least 1"):
        wilson_interval(0, 0)


def test_boundary_figure_draws_counts_and_intervals():
    condition = [
        {"state": "random-init", "batch_size": b, "trials": 20, "p_condition": p}
        for b, p in ((2, 1.0), (4, 0.55), (8, 0.1))
    ]
    binned = [
        {"state": "random-init", "min_exans": "0", "samples": 4, "psnr_median": 12.0}
        | {"psnr_median_low": None, "psnr_median_high": None},
        {"state": "random-init", "min_exans": "1", "samples": 12, "psnr_median": 40.0}
        | {"psnr_median_low": 35.0, "psnr_median_high": 48.0},
    ]
    with Image.open(io.BytesIO(boundary_figure(condition, binned, "t"))) as image:
        assert image.size == (1320, 504)
    with Image.open(io.BytesIO(boundary_figure(condition, [], "t"))) as image:
        assert image.size == (660, 504)


def test_progress_names_the_cell_and_the_trial_on_stderr_only(tmp_path, capsys):
    tiny_run(tmp_path, progress=True, run_name="shown")
    shown = capsys.readouterr()
    assert "bias__none__b1 trial 0" in shown.err and "bias__none__b2 trial 1" in shown.err
    assert "4/4" in shown.err and "trial" not in shown.out
    tiny_run(tmp_path, progress=False, run_name="hidden")
    assert capsys.readouterr().err == ""


def test_track_labels_each_step_and_can_be_switched_off(capsys):
    assert list(track([5, 6, 7], "study B=4", name=lambda v: f"value {v}")) == [5, 6, 7]
    err = capsys.readouterr().err
    assert "study B=4 value 7" in err and "3/3" in err
    assert list(track(iter([1, 2]), "quiet", enabled=False)) == [1, 2]
    assert capsys.readouterr().err == ""
