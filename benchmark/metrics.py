"""The canonical reconstruction metrics. Every number leakbench reports comes from here.

Conventions (fixed, so that results are comparable across attacks and papers):

1. De-normalise with the dataset's mean/std, clamp to [0, 1]; all image metrics live on that scale.
2. Match reconstructions to ground truth one-to-one by the Hungarian method on per-pair MSE
   (``scipy.optimize.linear_sum_assignment``). A ground-truth image left unmatched (the attack
   returned fewer images, or the trial failed) is scored against the *null reconstruction*, a
   uniform mid-grey image (0.5), and counts as a failure.
3. Per image: MSE; PSNR = 10·log10(1/MSE), capped at ``PSNR_CAP`` dB (MSE floored at 1e-30) so
   exact reconstructions stay finite in JSON; SSIM (torchmetrics, Gaussian window σ = 1.5, data
   range 1; smaller images get the largest odd window that fits); scale-aligned PSNR: the
   reconstruction in model-input space is first multiplied by its least-squares gain
   a = <r, t> / <r, r> against the matched truth t (this removes a pure brightness/scale error,
   such as the ExAN attack's without biases; it is an oracle alignment and is reported only
   under its own name).
4. Per trial: label accuracy over ground-truth samples (unmatched = wrong; not reported when the
   attack infers no labels), inferred-batch-size correctness (when the attack infers it),
   success = PSNR ≥ τ (τ = 30 dB by default, recorded with the results).
5. Aggregates over all ground-truth images of all trials, failed ones included: mean, median and
   worst (minimum PSNR/SSIM, maximum MSE).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_CAP = 300.0
MSE_FLOOR = 1e-30
NULL_PIXEL = 0.5
DEFAULT_SUCCESS_PSNR = 30.0
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"


def to_pixels(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Model inputs -> pixels in [0, 1] (float64)."""
    images = images.detach().to(torch.float64).cpu()
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    return (images * s + m).clamp(0.0, 1.0)


def mse_matrix(reconstructions: Tensor, truths: Tensor) -> Tensor:
    """Pairwise per-image MSE, shape (len(reconstructions), len(truths))."""
    r = reconstructions.flatten(1)
    t = truths.flatten(1)
    return ((r[:, None, :] - t[None, :, :]) ** 2).mean(-1)


def match(reconstructions: Tensor, truths: Tensor) -> dict[int, int]:
    """One-to-one matching minimising total MSE: {truth index: reconstruction index}."""
    if len(reconstructions) == 0:
        return {}
    rows, cols = linear_sum_assignment(mse_matrix(reconstructions, truths).numpy())
    return {int(t): int(r) for r, t in zip(rows, cols, strict=True)}


def psnr_from_mse(mse: float) -> float:
    return min(PSNR_CAP, 10.0 * math.log10(1.0 / max(mse, MSE_FLOOR)))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image SSIM of two (N, C, H, W) pixel batches in [0, 1].

    Gaussian window σ = 1.5 (11 taps). Images smaller than 11 px use the largest odd window k
    that fits and σ = (k − 1)/7, so that torchmetrics' Gaussian has exactly k taps.
    """
    side = min(a.shape[-2:])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3×3 pixels, got {tuple(a.shape[-2:])}")
    kernel = min(11, side if side % 2 else side - 1)
    sigma = 1.5 if kernel == 11 else (kernel - 1) / 7
    return structural_similarity_index_measure(
        a, b, data_range=1.0, kernel_size=kernel, sigma=sigma, reduction="none"
    ).reshape(-1)


def least_squares_gain(reconstruction: Tensor, truth: Tensor) -> float:
    r = reconstruction.flatten().to(torch.float64)
    t = truth.flatten().to(torch.float64)
    denominator = float(r @ r)
    return float(r @ t) / denominator if denominator > 0 else 0.0


def lpips_status() -> tuple[bool, str]:
    """LPIPS needs torchvision's AlexNet weights locally; it never downloads them."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE
    if path.is_file():
        return True, f"AlexNet backbone found at {path}"
    return False, f"unavailable: AlexNet backbone weights not found at {path} (no download)"


def lpips(a: Tensor, b: Tensor) -> Tensor:
    """Per-image LPIPS (AlexNet) of pixel batches in [0, 1]; call only if lpips_status() is ok."""
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    return torch.stack(
        [
            learned_perceptual_image_patch_similarity(
                x[None].float(), y[None].float(), net_type="alex", normalize=True
            )
            for x, y in zip(a, b, strict=True)
        ]
    )


def score_trial(
    *,
    truth_images: Tensor,
    truth_labels: Tensor,
    sample_ids: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    reconstructed_images: Tensor | None,
    reconstructed_labels: Tensor | None = None,
    inferred_batch_size: int | None = None,
    success_psnr: float = DEFAULT_SUCCESS_PSNR,
    with_lpips: bool = False,
) -> dict[str, Any]:
    """Score one trial. ``reconstructed_images=None`` scores a failed trial (all unmatched).

    Images are given in model-input space. Returns the per-sample rows and trial-level values.
    """
    truth_px = to_pixels(truth_images, mean, std)
    if reconstructed_images is None:
        reconstructed_images = truth_images.new_zeros((0, *truth_images.shape[1:]))
    recon_px = to_pixels(reconstructed_images, mean, std)
    pairs = match(recon_px, truth_px)
    null = torch.full_like(truth_px[0], NULL_PIXEL)

    paired = torch.stack([recon_px[pairs[i]] if i in pairs else null for i in range(len(truth_px))])
    aligned = []
    for i in range(len(truth_px)):
        if i not in pairs:
            aligned.append(null)
            continue
        r = reconstructed_images[pairs[i]].detach().cpu().to(torch.float64)
        t = truth_images[i].detach().cpu().to(torch.float64)
        aligned.append(to_pixels((least_squares_gain(r, t) * r)[None], mean, std)[0])
    aligned_px = torch.stack(aligned)

    mse = ((paired - truth_px) ** 2).flatten(1).mean(-1)
    mse_aligned = ((aligned_px - truth_px) ** 2).flatten(1).mean(-1)
    ssim_values = ssim(paired, truth_px)
    lpips_values = lpips(paired, truth_px) if with_lpips else None

    samples = []
    for i, sample_id in enumerate(sample_ids):
        label_correct = None
        if reconstructed_labels is not None:
            label_correct = bool(
                i in pairs and int(reconstructed_labels[pairs[i]]) == int(truth_labels[i])
            )
        row = {
            "sample_id": sample_id,
            "matched_reconstruction": pairs.get(i),
            "mse": float(mse[i]),
            "psnr": psnr_from_mse(float(mse[i])),
            "ssim": float(ssim_values[i]),
            "psnr_scale_aligned": psnr_from_mse(float(mse_aligned[i])),
            "label_correct": label_correct,
        }
        if lpips_values is not None:
            row["lpips"] = float(lpips_values[i])
        row["success"] = i in pairs and row["psnr"] >= success_psnr
        samples.append(row)

    labels_scored = [s["label_correct"] for s in samples if s["label_correct"] is not None]
    return {
        "samples": samples,
        "label_accuracy": float(np.mean(labels_scored)) if labels_scored else None,
        "batch_size_correct": (
            None if inferred_batch_size is None else inferred_batch_size == len(truth_images)
        ),
        "success_rate": float(np.mean([s["success"] for s in samples])),
        "matched_pixels": paired,
    }


def perturbation(
    original: Tensor, trained: Tensor, mean: Sequence[float], std: Sequence[float]
) -> list[dict[str, float]]:
    """What changing the private batch into the batch the client trained on cost each image.

    Both batches are given in model-input space and compared in [0, 1] pixels (clamped), sample
    by sample in the same order: L∞ and L2 distances and the PSNR of the trained image against
    the original.
    """
    a = to_pixels(original, mean, std).flatten(1)
    b = to_pixels(trained, mean, std).flatten(1)
    difference = b - a
    return [
        {
            "linf": float(d.abs().max()),
            "l2": float(d.norm()),
            "psnr": psnr_from_mse(float((d**2).mean())),
        }
        for d in difference
    ]


def _stats(values: list[float], worst: str) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "worst": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "worst": float(arr.min() if worst == "min" else arr.max()),
    }


def _rate_if_reported(outcomes: list[bool | None]) -> float | None:
    if all(o is None for o in outcomes):
        return None
    return float(np.mean([o is True for o in outcomes]))


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate trial records of one cell; failed trials count through their null scores."""
    records = list(records)
    samples = [s for r in records for s in r["metrics"]["samples"]]
    failed = [r for r in records if r["status"] != "ok"]
    trained = [s for r in records for s in r.get("metrics_vs_trained", {}).get("samples", [])]
    changes = [p for r in records for p in r.get("perturbation", [])]
    # Labels / batch size: scored when the attack reports them; failed trials count as wrong.
    labels = [s["label_correct"] for s in samples]
    batch_sizes = [r["metrics"]["batch_size_correct"] for r in records]
    summary: dict[str, Any] = {
        "trials": len(records),
        "failed": len(failed),
        "timeouts": sum(r["status"] == "timeout" for r in records),
        "failure_rate": len(failed) / len(records) if records else None,
        "failure_reasons": sorted({r["error"] for r in failed if r.get("error")}),
        "images": len(samples),
        "mse": _stats([s["mse"] for s in samples], "max"),
        "psnr": _stats([s["psnr"] for s in samples], "min"),
        "ssim": _stats([s["ssim"] for s in samples], "min"),
        "psnr_scale_aligned": _stats([s["psnr_scale_aligned"] for s in samples], "min"),
        "success_rate": float(np.mean([s["success"] for s in samples])) if samples else None,
        "label_accuracy": _rate_if_reported(labels),
        "batch_size_accuracy": _rate_if_reported(batch_sizes),
        "time_s": _stats([r["time_s"] for r in records], "max"),
        "iterations": _stats([r["budget"]["used"]["iterations"] for r in records], "max"),
    }
    if trained:  # the client trained on a changed batch (client code, or the defense)
        summary["psnr_vs_trained"] = _stats([s["psnr"] for s in trained], "min")
        summary["perturbation"] = {
            "linf": _stats([p["linf"] for p in changes], "max"),
            "psnr": _stats([p["psnr"] for p in changes], "min"),
        }
    if samples and all("lpips" in s for s in samples):
        summary["lpips"] = _stats([s["lpips"] for s in samples], "max")
    return summary
