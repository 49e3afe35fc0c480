"""Golden values and conventions of the canonical metrics."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from leakbench import metrics
from leakbench.metrics import aggregate, match, psnr_from_mse, score_trial, ssim

IDENTITY = ((0.0,), (1.0,))


def test_psnr_golden_values():
    assert psnr_from_mse(0.01) == pytest.approx(20.0, abs=1e-12)
    assert psnr_from_mse(1e-4) == pytest.approx(40.0, abs=1e-12)
    assert psnr_from_mse(0.0) == metrics.PSNR_CAP


def test_ssim_of_constant_images_has_closed_form():
    a, b = 0.2, 0.6
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)  # variances vanish: structure term is 1
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    assert float(ssim(x, y)[0]) == pytest.approx(expected, abs=1e-12)
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_an_independent_gaussian_window_implementation():
    """Our convention: Gaussian window σ=1.5 (11 taps), mirror-padded borders, full-image mean.

    The interior of the map is the textbook SSIM (scikit-image's agrees there); torchmetrics
    averages over the whole image with mirrored borders, where scikit-image crops them instead.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(1, 1, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    a, b = x[0, 0].numpy(), y[0, 0].numpy()

    def blur(img):
        return gaussian_filter(img, sigma=1.5, truncate=3.5, mode="mirror")

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = np.clip(blur(a * a) - mu_a**2, 0, None)
    var_b = np.clip(blur(b * b) - mu_b**2, 0, None)
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    assert float(ssim(x, y)[0]) == pytest.approx(ssim_map.mean(), abs=1e-12)
    interior = structural_similarity(
        a,
        b,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )[1][5:-5, 5:-5]
    assert np.allclose(interior, ssim_map[5:-5, 5:-5], atol=1e-12)


@pytest.mark.parametrize("side", [3, 4, 7, 10])
def test_ssim_works_on_small_images(side):
    x = torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(side)).double()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (ssim(x, 1 - x) < 1).all()


def test_hungarian_matching_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    permutation = [3, 0, 5, 1, 4, 2]
    reconstructions = truth[permutation] + 0.01
    pairs = match(reconstructions, truth)
    assert pairs == {t: permutation.index(t) for t in range(6)}


def test_matching_is_one_to_one_even_when_one_truth_attracts_everything():
    truth = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]).double()
    reconstructions = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.1)]).double()
    pairs = match(reconstructions, truth)
    assert sorted(pairs.values()) == [0, 1]  # the second reconstruction must take the ones image
    assert pairs == {0: 0, 1: 1}


def test_score_trial_exact_permuted_batch():
    g = torch.Generator().manual_seed(2)
    truth = torch.rand(3, 1, 12, 12, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    order = [2, 0, 1]
    scores = score_trial(
        truth_images=truth,
        truth_labels=labels,
        sample_ids=["a", "b", "c"],
        mean=IDENTITY[0],
        std=IDENTITY[1],
        reconstructed_images=truth[order],
        reconstructed_labels=labels[order],
        inferred_batch_size=3,
    )
    assert [s["matched_reconstruction"] for s in scores["samples"]] == [1, 2, 0]
    assert all(s["psnr"] == metrics.PSNR_CAP for s in scores["samples"])
    assert scores["label_accuracy"] == 1.0
    assert scores["batch_size_correct"] is True
    assert scores["success_rate"] == 1.0


def test_metrics_use_denormalised_clamped_pixels():
    mean, std = (0.5,), (0.25,)
    truth = torch.zeros(1, 1, 8, 8, dtype=torch.float64)  # pixels 0.5
    recon = torch.full((1, 1, 8, 8), 0.4, dtype=torch.float64)  # pixels 0.6
    row = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0]),
        sample_ids=["x"],
        mean=mean,
        std=std,
        reconstructed_images=recon,
    )["samples"][0]
    assert row["mse"] == pytest.approx(0.01, abs=1e-12)
    far = torch.full((1, 1, 8, 8), 100.0, dtype=torch.float64)  # clamps to pixel 1.0
    row = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0]),
        sample_ids=["x"],
        mean=mean,
        std=std,
        reconstructed_images=far,
    )["samples"][0]
    assert row["mse"] == pytest.approx(0.25, abs=1e-12)


def test_unmatched_truth_is_scored_against_grey_and_fails():
    truth = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    scores = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0, 1]),
        sample_ids=["a", "b"],
        mean=IDENTITY[0],
        std=IDENTITY[1],
        reconstructed_images=truth[:1],
        reconstructed_labels=torch.tensor([0]),
    )
    unmatched = scores["samples"][1]
    assert unmatched["matched_reconstruction"] is None
    assert unmatched["mse"] == pytest.approx(float(((truth[1] - 0.5) ** 2).mean()))
    assert unmatched["success"] is False and unmatched["label_correct"] is False
    assert scores["label_accuracy"] == 0.5


def test_scale_aligned_psnr_removes_a_pure_gain():
    truth = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)).double()
    row = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0]),
        sample_ids=["a"],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        reconstructed_images=0.7 * truth,
    )["samples"][0]
    assert row["psnr"] < 40
    assert row["psnr_scale_aligned"] == pytest.approx(metrics.PSNR_CAP)


def _record(status, psnrs, labels_ok=None, batch_ok=None):
    samples = [
        {
            "mse": 10 ** (-p / 10),
            "psnr": p,
            "ssim": 0.5,
            "psnr_scale_aligned": p,
            "label_correct": labels_ok,
            "success": p >= 30,
        }
        for p in psnrs
    ]
    return {
        "status": status,
        "error": None if status == "ok" else "boom",
        "time_s": 1.0,
        "budget": {"used": {"iterations": 3}},
        "metrics": {"samples": samples, "label_accuracy": None, "batch_size_correct": batch_ok},
    }


def test_aggregate_counts_failed_trials_everywhere():
    summary = aggregate(
        [
            _record("ok", [40.0, 50.0], labels_ok=True, batch_ok=True),
            _record("failed", [10.0, 12.0]),
        ]
    )
    assert summary["trials"] == 2 and summary["failed"] == 1
    assert summary["failure_reasons"] == ["boom"]
    assert summary["psnr"]["median"] == pytest.approx(26.0)
    assert summary["psnr"]["worst"] == 10.0
    assert summary["success_rate"] == 0.5
    assert summary["label_accuracy"] == 0.5  # failed trial's samples count as wrong
    assert summary["batch_size_accuracy"] == 0.5
    assert math.isclose(summary["psnr"]["mean"], np.mean([40, 50, 10, 12]))


def test_lpips_is_reported_unavailable_without_local_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    available, reason = metrics.lpips_status()
    assert not available
    assert "unavailable" in reason and str(tmp_path) in reason
    assert "leakbench lpips-fetch" in reason


def test_lpips_is_unavailable_for_images_too_small_for_alexnet(tmp_path, monkeypatch):
    # Weights present: only the image size decides (lfw-subset is 25x25, AlexNet needs 31).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = tmp_path / "hub" / "checkpoints" / metrics.LPIPS_BACKBONE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert metrics.lpips_status((3, 32, 32))[0]
    available, reason = metrics.lpips_status((1, 25, 25))
    assert not available
    assert (
        reason == "unavailable: images of 25x25 px are smaller than the 31x31 px LPIPS's "
        "AlexNet layers need"
    )


def test_without_gallery_or_classifier_scores_carry_no_privacy_fields():
    truth = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    scores = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0, 1]),
        sample_ids=["a", "b"],
        mean=IDENTITY[0],
        std=IDENTITY[1],
        reconstructed_images=truth,
    )
    assert set(scores) == {
        "samples",
        "label_accuracy",
        "batch_size_correct",
        "success_rate",
        "matched_pixels",
    }
    assert not any(key in row for row in scores["samples"] for key in metrics.PRIVACY_FIELDS)
