"""Golden values of the privacy metrics: identifiability (IIP), task leakage, LPIPS fetching."""

import math
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

from leakbench import metrics
from leakbench.metrics import (
    LpipsFetchError,
    aggregate,
    fetch_lpips_weights,
    gallery_from_samples,
    identifiability,
    score_trial,
)

IDENTITY = ((0.0,), (1.0,))
SIDE = 6


def _gallery(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Random grey images in [0, 1], none of them mid-grey, with ids g0..g{n-1}."""
    images = torch.rand(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)).double()
    return images, [f"g{i}" for i in range(n)]


def _score(truth, ids, reconstructions, gallery, gallery_ids=None, **options):
    return score_trial(
        truth_images=truth,
        truth_labels=torch.zeros(len(truth), dtype=torch.long),
        sample_ids=ids,
        mean=IDENTITY[0],
        std=IDENTITY[1],
        reconstructed_images=reconstructions,
        gallery=gallery,
        gallery_ids=gallery_ids,
        **options,
    )


def test_exact_reconstruction_is_identified():
    gallery, ids = _gallery()
    order = [5, 2, 7]
    truth = gallery[order]
    scores = _score(truth, [ids[i] for i in order], truth.flip(0), gallery, ids)
    assert [s["iip_pixel"] for s in scores["samples"]] == [True, True, True]
    assert scores["iip_pixel_rate"] == 1.0
    assert scores["iip_gallery_size"] == 8


def test_constant_image_scores_exactly_one_over_gallery_size():
    """Grey identifies only the gallery image nearest to grey: over every truth, 1/N."""
    gallery, ids = _gallery()
    nearest_to_grey = int(((gallery - 0.5) ** 2).flatten(1).mean(1).argmin())
    outcomes = []
    for i in range(len(gallery)):
        grey = torch.full((1, 1, SIDE, SIDE), 0.5, dtype=torch.float64)
        row = _score(gallery[i : i + 1], [ids[i]], grey, gallery, ids)["samples"][0]
        outcomes.append(row["iip_pixel"])
    assert outcomes == [i == nearest_to_grey for i in range(len(gallery))]
    assert sum(outcomes) / len(outcomes) == pytest.approx(1 / 8, abs=0)


def test_a_noisy_reconstruction_is_identified_while_nearer_its_truth():
    gallery, ids = _gallery()
    truth = gallery[3:4]
    direction = gallery[4:5] - truth
    near = _score(truth, ["g3"], truth + 0.45 * direction, gallery, ids)["samples"][0]
    far = _score(truth, ["g3"], truth + 0.55 * direction, gallery, ids)["samples"][0]
    assert (near["iip_pixel"], far["iip_pixel"]) == (True, False)


def test_a_tie_with_a_different_image_is_not_an_identification():
    dark = torch.full((1, 1, SIDE, SIDE), 0.25, dtype=torch.float64)
    light = torch.full((1, 1, SIDE, SIDE), 0.75, dtype=torch.float64)
    others = 0.1 * _gallery(3)[0]  # MSE to grey at least 0.16
    grey = torch.full((1, 1, SIDE, SIDE), 0.5, dtype=torch.float64)  # MSE 0.0625 to both
    gallery = torch.cat([dark, light, others])
    ids = ["dark", "light", "a", "b", "c"]
    row = _score(dark, ["dark"], grey, gallery, ids)["samples"][0]
    assert row["iip_pixel"] is False
    # Without the light image, dark is strictly nearest.
    row = _score(dark, ["dark"], grey, gallery[[0, 2, 3, 4]], ["dark", "a", "b", "c"])
    assert row["samples"][0]["iip_pixel"] is True


def test_an_identical_duplicate_under_another_id_counts_as_the_truth():
    gallery, ids = _gallery()
    with_copy = torch.cat([gallery, gallery[2:3]])
    copy_ids = [*ids, "copy-of-g2"]
    truth = gallery[2:3]
    row = _score(truth, ["g2"], truth, with_copy, copy_ids)["samples"][0]
    assert row["iip_pixel"] is True  # nearest neighbours are g2 and its copy: both are g2
    # The copy is found within SAME_IMAGE_ATOL, not only at exact equality.
    with_copy[-1] += 0.5 * metrics.SAME_IMAGE_ATOL
    row = _score(truth, ["g2"], with_copy[-1:], with_copy, copy_ids)["samples"][0]
    assert row["iip_pixel"] is True


def test_without_ids_the_truth_is_found_by_its_pixels():
    gallery, _ = _gallery()
    truth = gallery[[6, 1]]
    scores = _score(truth, ["a", "b"], truth, gallery.float())  # float32 gallery: rounding
    assert [s["iip_pixel"] for s in scores["samples"]] == [True, True]


def test_unmatched_truth_is_not_identified():
    gallery, ids = _gallery()
    truth = gallery[[0, 1]]
    scores = _score(truth, ["g0", "g1"], truth[:1], gallery, ids)
    assert [s["iip_pixel"] for s in scores["samples"]] == [True, False]
    failed = _score(truth, ["g0", "g1"], None, gallery, ids)
    assert failed["iip_pixel_rate"] == 0.0


def test_iip_is_measured_on_denormalised_clamped_pixels():
    gallery, ids = _gallery()
    mean, std = (0.5,), (0.25,)
    truth = (gallery[4:5] - 0.5) / 0.25
    # Far outside the pixel range: clamps to an all-white image.
    white = torch.full((1, 1, SIDE, SIDE), 100.0, dtype=torch.float64)
    brightest = int(gallery.flatten(1).mean(1).argmax())
    row = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0]),
        sample_ids=["g4"],
        mean=mean,
        std=std,
        reconstructed_images=white,
        gallery=gallery,
        gallery_ids=ids,
    )["samples"][0]
    assert row["iip_pixel"] is (brightest == 4)
    exact = score_trial(
        truth_images=truth,
        truth_labels=torch.tensor([0]),
        sample_ids=["g4"],
        mean=mean,
        std=std,
        reconstructed_images=truth,
        gallery=gallery,
        gallery_ids=ids,
    )["samples"][0]
    assert exact["iip_pixel"] is True


def test_iip_lpips_uses_the_lpips_space(monkeypatch):
    """With LPIPS on, the LPIPS distance ranks the gallery (here a stand-in that inverts it)."""
    gallery, ids = _gallery()
    monkeypatch.setattr(metrics, "lpips", lambda a, b: torch.zeros(len(a), dtype=torch.float64))
    monkeypatch.setattr(
        metrics, "lpips_distances", lambda: lambda image, g: -metrics.pixel_distances(image, g)
    )
    truth = gallery[[3]]
    row = _score(truth, ["g3"], truth, gallery, ids, with_lpips=True)["samples"][0]
    assert row["iip_pixel"] is True and row["iip_lpips"] is False


def test_identifiability_takes_any_distance():
    gallery, _ = _gallery()
    outcomes = identifiability([gallery[0], None], [0, 1], gallery, metrics.pixel_distances)
    assert outcomes == [True, False]


GOOD_GALLERY, GOOD_IDS = _gallery()


@pytest.mark.parametrize(
    ("gallery", "gallery_ids", "message"),
    [
        (GOOD_GALLERY, ["g0"] * 8, "gallery_ids: got repeated ids ['g0'], expected unique ids"),
        (GOOD_GALLERY, ["g1"], "gallery_ids: got 1 ids, expected one per gallery image (8)"),
        (GOOD_GALLERY, [f"x{i}" for i in range(8)], "gallery_ids: ground truth 'g0' is missing"),
        (torch.rand(3, 1, 5, 5), None, "gallery: got shape (3, 1, 5, 5), expected (N, 1, 6, 6)"),
        (torch.full((3, 1, SIDE, SIDE), 2.0), None, "gallery: got torch.float32 values outside"),
        (torch.full((3, 1, SIDE, SIDE), math.nan), None, "gallery: got torch.float32 values"),
        (torch.zeros(0, 1, SIDE, SIDE), None, "gallery: got 0 images"),
        (torch.zeros(3, 1, SIDE, SIDE), None, "gallery: ground truth 'g0' is not among its 3"),
        (None, GOOD_IDS, "gallery_ids: given without a gallery, expected gallery too"),
    ],
)
def test_bad_galleries_are_refused_in_one_line(gallery, gallery_ids, message):
    truth = GOOD_GALLERY[:1]
    with pytest.raises(ValueError) as error:
        _score(truth, ["g0"], truth, gallery, gallery_ids)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# --- task leakage -------------------------------------------------------------------------


def _mean_threshold_classifier() -> nn.Module:
    """Class 0 iff the normalised image's mean is positive (pixel mean above 0.5 here)."""
    linear = nn.Linear(SIDE * SIDE, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0] = 1.0 / (SIDE * SIDE)
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), linear).eval()


MEAN, STD = (0.5,), (0.25,)
PIXEL_MEANS = [0.8, 0.9, 0.2, 0.1, 0.7]  # classifier says 0, 0, 1, 1, 0
LABELS = torch.tensor([0, 0, 1, 1, 1])  # so it is right on 4 of 5


def _task_batch() -> torch.Tensor:
    noise = torch.rand(5, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(7)) - 0.5
    noise -= noise.mean(dim=(1, 2, 3), keepdim=True)  # zero mean: pixel means are exact
    pixels = torch.tensor(PIXEL_MEANS).view(-1, 1, 1, 1) + 0.1 * noise
    return ((pixels.double() - 0.5) / 0.25).clone()


def _task_scores(reconstructions: torch.Tensor | None, classifier: nn.Module) -> dict:
    truth = _task_batch()
    return score_trial(
        truth_images=truth,
        truth_labels=LABELS,
        sample_ids=list("abcde"),
        mean=MEAN,
        std=STD,
        reconstructed_images=reconstructions,
        classifier=classifier,
    )


def test_exact_reconstruction_leaks_the_task_up_to_the_classifier_ceiling():
    truth = _task_batch()
    scores = _task_scores(truth[[4, 3, 2, 1, 0]], _mean_threshold_classifier())
    assert [s["task_leakage"] for s in scores["samples"]] == [True, True, True, True, False]
    assert [s["task_ceiling"] for s in scores["samples"]] == [True, True, True, True, False]
    assert scores["task_leakage_rate"] == pytest.approx(0.8, abs=1e-15)
    assert scores["task_ceiling_rate"] == pytest.approx(0.8, abs=1e-15)


def test_constant_image_leaks_the_rate_of_the_class_it_is_given():
    dark = torch.full((5, 1, SIDE, SIDE), (0.3 - 0.5) / 0.25, dtype=torch.float64)  # class 1
    scores = _task_scores(dark, _mean_threshold_classifier())
    assert [s["task_leakage"] for s in scores["samples"]] == (LABELS == 1).tolist()
    assert scores["task_leakage_rate"] == pytest.approx(3 / 5, abs=1e-15)
    assert scores["task_ceiling_rate"] == pytest.approx(4 / 5, abs=1e-15)


def test_unmatched_truth_leaks_nothing():
    scores = _task_scores(None, _mean_threshold_classifier())
    assert scores["task_leakage_rate"] == 0.0
    assert scores["task_ceiling_rate"] == pytest.approx(0.8, abs=1e-15)


def test_classifier_sees_clamped_pixels_renormalised_in_its_dtype():
    seen = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float32))

        def forward(self, x):
            seen.append(x)
            return torch.stack([x.flatten(1).mean(1), torch.zeros(len(x))], dim=1)

    far = torch.full((5, 1, SIDE, SIDE), 100.0, dtype=torch.float64)  # pixel 1.0 after clamp
    _task_scores(far, Spy().eval())
    assert all(x.dtype == torch.float32 for x in seen)
    assert torch.allclose(seen[1], torch.full_like(seen[1], (1.0 - 0.5) / 0.25))


def test_classifier_must_be_an_eval_mode_module():
    with pytest.raises(ValueError, match=r"^classifier: got Sequential in training mode"):
        _task_scores(_task_batch(), _mean_threshold_classifier().train())
    with pytest.raises(ValueError, match=r"^classifier: got function, expected a torch.nn.Module"):
        _task_scores(_task_batch(), lambda x: x)


# --- aggregation ---------------------------------------------------------------------------


def _record(status, rows, gallery_size=None):
    metrics_block = {
        "samples": [
            {"mse": 0.01, "psnr": 20.0, "ssim": 0.5, "psnr_scale_aligned": 20.0, "success": False}
            | {"label_correct": None}
            | row
            for row in rows
        ],
        "label_accuracy": None,
        "batch_size_correct": None,
    }
    if gallery_size is not None:
        metrics_block["iip_gallery_size"] = gallery_size
    return {
        "status": status,
        "error": None if status == "ok" else "boom",
        "time_s": 1.0,
        "budget": {"used": {"iterations": 1}},
        "metrics": metrics_block,
    }


def test_aggregate_reports_privacy_rates_counts_and_chance():
    ok = _record(
        "ok",
        [
            {"iip_pixel": True, "task_leakage": True, "task_ceiling": True},
            {"iip_pixel": False, "task_leakage": True, "task_ceiling": True},
        ],
        gallery_size=40,
    )
    failed = _record(
        "failed", [{"iip_pixel": False, "task_leakage": False, "task_ceiling": False}], 10
    )
    summary = aggregate([ok, failed])
    assert summary["iip_pixel"] == {
        "rate": pytest.approx(1 / 3, abs=1e-15),
        "count": 1,
        "images": 3,
        "chance": pytest.approx((1 / 40 + 1 / 40 + 1 / 10) / 3, abs=1e-15),
    }
    assert summary["task_leakage"] == {"rate": pytest.approx(2 / 3), "count": 2, "images": 3}
    assert summary["task_ceiling"]["count"] == 2
    assert "iip_lpips" not in summary


def test_aggregate_of_old_records_has_no_privacy_fields():
    summary = aggregate([_record("ok", [{}, {}])])
    assert not set(metrics.PRIVACY_FIELDS) & set(summary)


# --- gallery of a split ----------------------------------------------------------------------


def test_gallery_from_samples_denormalises_and_keeps_ids():
    pixels = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    items = [((pixels[i] - 0.5) / 0.25, 0, f"s{i}") for i in range(3)]
    images, ids = gallery_from_samples(items, (0.5,), (0.25,))
    assert ids == ["s0", "s1", "s2"]
    assert images.dtype == torch.float32
    assert torch.allclose(images, pixels, atol=1e-6, rtol=0)


# --- fetching the LPIPS backbone ---------------------------------------------------------------


def test_fetch_fails_in_one_line_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    started = time.perf_counter()
    with pytest.raises(LpipsFetchError) as error:
        fetch_lpips_weights(timeout_s=2.0)
    elapsed = time.perf_counter() - started
    message = str(error.value)
    assert message == (
        f"cannot fetch {metrics.LPIPS_BACKBONE_URL}: [Errno -3] Temporary failure in name "
        "resolution"
    )
    assert calls == [(metrics.LPIPS_BACKBONE_URL, 2.0)]
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert list((tmp_path / "hub" / "checkpoints").iterdir()) == []  # nothing half-written


def test_fetch_reports_a_timeout_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def hanging(url, timeout):
        raise TimeoutError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", hanging)
    with pytest.raises(LpipsFetchError, match=r"^cannot fetch https://\S+: TimeoutError: timed"):
        fetch_lpips_weights()


class _Response:
    def __init__(self, payload: bytes) -> None:
        self.chunks = [payload[:3], payload[3:], b""]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size):
        return self.chunks.pop(0)


def test_fetch_checks_the_hash_the_file_name_carries(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(b"not it"))
    with pytest.raises(LpipsFetchError, match="does not start with 7be5be79"):
        fetch_lpips_weights()
    assert list((tmp_path / "hub" / "checkpoints").iterdir()) == []
    available, _ = metrics.lpips_status()
    assert not available


def test_fetch_saves_where_lpips_status_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    payload = b"weights"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(payload))
    # A payload whose digest matches the file name cannot be built; accept any for this check.
    monkeypatch.setattr(metrics, "LPIPS_BACKBONE", "alexnet-owt-.pth")
    lines = []
    path = fetch_lpips_weights(echo=lines.append)
    assert path == tmp_path / "hub" / "checkpoints" / "alexnet-owt-.pth"
    assert path.read_bytes() == payload
    assert lines == [f"LPIPS backbone saved to {path}"]
    assert metrics.lpips_status()[0]
    assert fetch_lpips_weights(echo=lines.append) == path  # already there: no download
    assert lines[-1] == f"LPIPS backbone already present at {path}"


def test_fetch_url_is_torchvisions_alexnet():
    torchvision = pytest.importorskip("torchvision")
    assert metrics.LPIPS_BACKBONE_URL == torchvision.models.AlexNet_Weights.DEFAULT.url


def test_fetch_refuses_a_bad_timeout():
    with pytest.raises(ValueError, match=r"^timeout_s: got 0, expected a positive number"):
        fetch_lpips_weights(timeout_s=0)
