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
6. Privacy beyond pixels, when the scorer is given a gallery and/or a reference classifier
   (absent otherwise, so records without them stay valid):

   * Image identifiability precision (IIP), from Yin, Mallya, Vahdat, Alvarez, Kautz and
     Molchanov (2021), "See through Gradients: Image Batch Recovery via GradInversion" (CVPR),
     as the breaching library (J. Geiping) computes it: a reconstruction r_i, matched to its
     ground truth t_i, *identifies* t_i when its nearest neighbour in a gallery G of the split's
     images is t_i. IIP = (1/B) Σ_i 1[argmin_{g ∈ G} d(r_i, g) = t_i], for d = L2 distance on
     [0, 1] pixels (``iip_pixel``; the same ranking as per-pixel MSE) and d = LPIPS
     (``iip_lpips``, only where LPIPS is available). Rules fixed here:
     a. the gallery must hold every ground truth; it is found by its sample id (``gallery_ids``)
        or, without ids, as the gallery image equal to it within ``SAME_IMAGE_ATOL``;
     b. gallery images equal to the ground truth within ``SAME_IMAGE_ATOL`` (duplicates under
        another id) *are* the ground truth: identifying a copy identifies the image;
     c. a tie between the ground truth and a different image is *not* an identification:
        r_i must be strictly closer to t_i (or a copy) than to every other gallery image;
     d. a ground truth left unmatched (no reconstruction) is not identified.
     Differences from breaching, by design: the whole gallery is searched rather than only the
     images of the reconstruction's label (labels are scored by their own metrics; a wrong
     label must not hide an identified face), distances are taken on clamped [0, 1] pixels
     rather than normalised inputs, and copies are found by a fixed pixel tolerance. A
     reconstruction that carries no information identifies its truth with chance 1/|G|.
   * Task leakage: a reference classifier for the dataset's task (any module mapping
     normalised inputs to logits, in eval mode) classifies each matched reconstruction
     (de-normalised, clamped, re-normalised); ``task_leakage`` is 1 where its class is the
     ground-truth label (unmatched: 0). ``task_ceiling`` is 1 where the classifier is right on
     the ground-truth image itself: a perfect reconstruction leaks exactly the ceiling.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor, nn
    from torch.utils.data import Dataset

# torch, torchmetrics and scipy are imported where a metric is computed: reading recorded
# figures (:func:`aggregate`, the leaderboard's checks) must not wait for them.

PSNR_CAP = 300.0
MSE_FLOOR = 1e-30
NULL_PIXEL = 0.5
DEFAULT_SUCCESS_PSNR = 30.0
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = f"https://download.pytorch.org/models/{LPIPS_BACKBONE}"
LPIPS_FETCH_TIMEOUT_S = 30.0  # per blocking network operation, so a dead network cannot hang
# Two gallery images closer than this (max |Δ| on [0, 1] pixels) are the same image: far below
# one 8-bit grey level (1/255), above float32 rounding of a normalise/de-normalise round trip.
SAME_IMAGE_ATOL = 1e-6
GALLERY_CHUNK = 256  # gallery images compared at once: bounds memory on large splits


def to_pixels(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Model inputs -> pixels in [0, 1] (float64)."""
    import torch

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
    from scipy.optimize import linear_sum_assignment

    if len(reconstructions) == 0:
        return {}
    rows, cols = linear_sum_assignment(mse_matrix(reconstructions, truths).numpy())
    return {int(t): int(r) for r, t in zip(rows, cols, strict=True)}


def psnr_from_mse(mse: float) -> float:
    return min(PSNR_CAP, 10.0 * math.log10(1.0 / max(mse, MSE_FLOOR)))


def null_psnr(truth_pixels: Tensor) -> list[float]:
    """Per image of ``truth_pixels`` (N, C, H, W in [0, 1]): the PSNR of the null
    reconstruction (item 2: uniform ``NULL_PIXEL`` grey), what a reconstruction that carries no
    information about the image scores; the chance level a leakage figure can be measured from."""
    import torch

    truths = truth_pixels.to(torch.float64).flatten(1)
    mse = ((truths - NULL_PIXEL) ** 2).mean(-1)
    return [psnr_from_mse(float(m)) for m in mse]


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image SSIM of two (N, C, H, W) pixel batches in [0, 1].

    Gaussian window σ = 1.5 (11 taps). Images smaller than 11 px use the largest odd window k
    that fits and σ = (k − 1)/7, so that torchmetrics' Gaussian has exactly k taps.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(a.shape[-2:])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3×3 pixels, got {tuple(a.shape[-2:])}")
    kernel = min(11, side if side % 2 else side - 1)
    sigma = 1.5 if kernel == 11 else (kernel - 1) / 7
    return structural_similarity_index_measure(
        a, b, data_range=1.0, kernel_size=kernel, sigma=sigma, reduction="none"
    ).reshape(-1)


def least_squares_gain(reconstruction: Tensor, truth: Tensor) -> float:
    return float(least_squares_gains(reconstruction[None], truth)[0])


def least_squares_gains(candidates: Tensor, truth: Tensor) -> Tensor:
    """Per candidate c (first dimension), the gain a = <c, t> / <c, c> that minimises
    ||a·c − t||² against ``truth``; 0 for a blank candidate. float64."""
    import torch

    c = candidates.flatten(1).to(torch.float64)
    t = truth.flatten().to(torch.float64)
    energy = (c * c).sum(1)
    return torch.where(energy > 0, (c @ t) / energy.clamp_min(MSE_FLOOR), 0.0)


# AlexNet's layers up to relu5, which LPIPS compares, need inputs of at least this many pixels
# per side (a smaller image is pooled down to nothing).
LPIPS_MIN_SIDE = 31


def lpips_status(input_shape: Sequence[int] | None = None) -> tuple[bool, str]:
    """Whether LPIPS can score images of ``input_shape`` (C, H, W) here, and why (not).

    It needs torchvision's AlexNet weights locally (it never downloads them; ``leakbench
    lpips-fetch`` does) and images of at least ``LPIPS_MIN_SIDE`` pixels per side."""
    import torch

    if input_shape is not None and min(input_shape[-2:]) < LPIPS_MIN_SIDE:
        side = "x".join(str(n) for n in input_shape[-2:])
        return False, (
            f"unavailable: images of {side} px are smaller than the {LPIPS_MIN_SIDE}x"
            f"{LPIPS_MIN_SIDE} px LPIPS's AlexNet layers need"
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE
    if path.is_file():
        return True, f"AlexNet backbone found at {path}"
    return False, (
        f"unavailable: AlexNet backbone weights not found at {path} (no download; "
        "`leakbench lpips-fetch` fetches them)"
    )


def lpips(a: Tensor, b: Tensor) -> Tensor:
    """Per-image LPIPS (AlexNet) of pixel batches in [0, 1]; call only if lpips_status() is ok."""
    import torch
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


class LpipsFetchError(OSError):
    """The LPIPS backbone could not be downloaded; the message is one line: URL and reason."""


def fetch_lpips_weights(
    timeout_s: float = LPIPS_FETCH_TIMEOUT_S,
    echo: Callable[[str], None] = print,
) -> Path:
    """Download the AlexNet backbone LPIPS needs into ``$TORCH_HOME/hub/checkpoints``.

    torchmetrics ships LPIPS's linear layers but loads the ImageNet AlexNet backbone through
    torchvision, which looks for ``LPIPS_BACKBONE`` there (where :func:`lpips_status` looks)
    and never downloads it during a run. Steps:

    1. if the file is already there, say so and return its path;
    2. stream ``LPIPS_BACKBONE_URL`` into a temporary file beside it, every blocking network
       operation bounded by ``timeout_s`` seconds;
    3. check the SHA-256 prefix the file name carries (torch.hub's convention);
    4. move the file into place atomically, say where, and return its path.

    Raises :class:`LpipsFetchError` with one line (URL and reason) when the network, the
    server or the check fails; no partial file is left behind.
    """
    import torch

    if not timeout_s > 0:
        raise ValueError(f"timeout_s: got {timeout_s!r}, expected a positive number of seconds")
    target = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE
    if target.is_file():
        echo(f"LPIPS backbone already present at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    expected_prefix = LPIPS_BACKBONE.rsplit("-", 1)[-1].split(".")[0]
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            with urllib.request.urlopen(LPIPS_BACKBONE_URL, timeout=timeout_s) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        if not digest.hexdigest().startswith(expected_prefix):
            raise LpipsFetchError(
                f"cannot fetch {LPIPS_BACKBONE_URL}: its SHA-256 {digest.hexdigest()[:16]}... "
                f"does not start with {expected_prefix}"
            )
        os.replace(partial, target)
    except LpipsFetchError:
        raise
    except urllib.error.URLError as exc:  # no network, DNS, refused, HTTP error
        raise LpipsFetchError(f"cannot fetch {LPIPS_BACKBONE_URL}: {exc.reason}") from None
    except OSError as exc:  # timeouts, a connection cut mid-file, a full disk
        raise LpipsFetchError(
            f"cannot fetch {LPIPS_BACKBONE_URL}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        Path(partial).unlink(missing_ok=True)
    echo(f"LPIPS backbone saved to {target}")
    return target


def gallery_from_samples(
    samples: Dataset, mean: Sequence[float], std: Sequence[float]
) -> tuple[Tensor, list[str]]:
    """A split's images as an identifiability gallery: [0, 1] pixels (float32) and sample ids.

    ``samples`` yields (normalised image, label, sample id) items, as every datamodule's split;
    a sample that cannot be read is left out.
    float32 halves the memory of large splits; the tolerance ``SAME_IMAGE_ATOL`` covers it.
    """
    import torch

    from leakbench.datamodules.base import DatasetError

    pixels, ids = [], []
    for index in range(len(samples)):  # type: ignore[arg-type]
        try:
            image, _, sample_id = samples[index]
        except DatasetError:
            continue  # an unreadable sample fails its trials before scoring: never looked up
        pixels.append(to_pixels(image[None], mean, std)[0].float())
        ids.append(str(sample_id))
    return torch.stack(pixels), ids


def _against_gallery(images: Tensor, gallery: Tensor, norm: float) -> Tensor:
    """The ``norm``-distance (float64) of every image to every gallery image: (K, N).

    One pass over the gallery in chunks, each converted to float64 on its own, so that a large
    split is never copied whole. Differences are taken directly (no ‖a‖² + ‖b‖² − 2ab expansion):
    an exact reconstruction is at distance 0 and a tie stays a tie.
    """
    import torch

    rows = images.reshape(len(images), -1).to(torch.float64)
    return torch.cat(
        [
            torch.cdist(
                rows,
                chunk.reshape(len(chunk), -1).to(torch.float64),
                p=norm,
                compute_mode="donot_use_mm_for_euclid_dist",
            )
            for chunk in gallery.split(GALLERY_CHUNK)
        ],
        dim=1,
    )


def pixel_distances(images: Tensor, gallery: Tensor) -> Tensor:
    """L2 distance (float64) of each [0, 1] image to every gallery image: (K, N).

    The same ranking as per-pixel MSE, and breaching's pixel score.
    """
    return _against_gallery(images, gallery, 2.0)


def lpips_distances() -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS (AlexNet) of each [0, 1] image to every gallery image, (K, N), network built once.

    Call only if :func:`lpips_status` is ok. Grey images are repeated to three channels, as in
    :func:`lpips`.
    """
    import torch
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(
        net_type="alex", reduction="none", normalize=True
    )

    def to_one(image: Tensor, gallery: Tensor) -> Tensor:
        scores = []
        for chunk in gallery.split(GALLERY_CHUNK):
            chunk = chunk.float().expand(-1, 3, -1, -1)
            metric.reset()
            metric.update(image.float()[None].expand(len(chunk), 3, -1, -1), chunk)
            scores.append(metric.compute().reshape(-1).to(torch.float64))
        return torch.cat(scores)

    def distances(images: Tensor, gallery: Tensor) -> Tensor:
        return torch.stack([to_one(image, gallery) for image in images])

    return distances


def same_image_mask(images: Tensor, gallery: Tensor) -> Tensor:
    """Which gallery images equal each image within ``SAME_IMAGE_ATOL`` (max |Δ|): (K, N)."""
    return _against_gallery(images, gallery, math.inf) <= SAME_IMAGE_ATOL


def nearest_is_truth(distances: Tensor, gallery: Tensor, truth: Tensor) -> bool:
    """Strictly closer to the ground truth (or a copy of it) than to any other gallery image.

    Equivalently: every gallery image at the smallest distance is a copy of ``truth``, which
    only the nearest few need checking for.
    """
    import torch

    nearest = torch.nonzero(distances == distances.min()).flatten()
    return bool(same_image_mask(truth[None], gallery[nearest]).all())


def gallery_truth_indices(
    truth_pixels: Tensor,
    sample_ids: Sequence[str],
    gallery: Tensor,
    gallery_ids: Sequence[str] | None,
) -> list[int]:
    """Where each ground truth sits in the gallery: by sample id, or by its pixels without ids.

    Raises ValueError (one line) for a gallery that cannot hold these ground truths.
    """
    import torch

    if gallery.dim() != 4 or tuple(gallery.shape[1:]) != tuple(truth_pixels.shape[1:]):
        raise ValueError(
            f"gallery: got shape {tuple(gallery.shape)}, expected (N, "
            f"{', '.join(map(str, truth_pixels.shape[1:]))}) like the ground truth"
        )
    if len(gallery) == 0:
        raise ValueError("gallery: got 0 images, expected at least the ground truths")
    if not gallery.is_floating_point() or not bool(gallery.min() >= 0 and gallery.max() <= 1):
        raise ValueError(
            f"gallery: got {gallery.dtype} values outside [0, 1] or NaN, expected pixels in [0, 1]"
        )
    if gallery_ids is None:
        indices = []
        for i, same in enumerate(same_image_mask(truth_pixels, gallery)):
            found = torch.nonzero(same).flatten()
            if len(found) == 0:
                raise ValueError(
                    f"gallery: ground truth {sample_ids[i]!r} is not among its {len(gallery)} "
                    f"images (within {SAME_IMAGE_ATOL}); expected the gallery to hold it"
                )
            indices.append(int(found[0]))
        return indices
    if len(gallery_ids) != len(gallery):
        raise ValueError(
            f"gallery_ids: got {len(gallery_ids)} ids, expected one per gallery image "
            f"({len(gallery)})"
        )
    position = {str(sample_id): index for index, sample_id in enumerate(gallery_ids)}
    if len(position) != len(gallery_ids):
        repeated = sorted({g for g in gallery_ids if list(gallery_ids).count(g) > 1})[:3]
        raise ValueError(f"gallery_ids: got repeated ids {repeated}, expected unique ids")
    missing = [str(s) for s in sample_ids if str(s) not in position]
    if missing:
        raise ValueError(
            f"gallery_ids: ground truth {missing[0]!r} is missing, expected the gallery to hold "
            f"every sample of the trial"
        )
    return [position[str(s)] for s in sample_ids]


def identifiability(
    matched: Sequence[Tensor | None],
    truth_indices: Sequence[int],
    gallery: Tensor,
    distances: Callable[[Tensor, Tensor], Tensor] = pixel_distances,
) -> list[bool]:
    """Per ground truth: does its matched reconstruction identify it in the gallery (IIP)?

    ``matched[i]`` is the [0, 1] reconstruction matched to ground truth i (None: unmatched);
    ``truth_indices[i]`` is that truth's place in ``gallery``; ``distances(images, gallery)``
    returns their (K, N) distances. Rules a-d of the module docstring.
    """
    import torch

    if len(matched) != len(truth_indices):
        raise ValueError(
            f"truth_indices: got {len(truth_indices)}, expected one per ground truth "
            f"({len(matched)})"
        )
    present = [i for i, reconstruction in enumerate(matched) if reconstruction is not None]
    identified = [False] * len(matched)
    if not present:
        return identified
    reconstructions = torch.stack([matched[i] for i in present])  # type: ignore[misc]
    for i, row in zip(present, distances(reconstructions, gallery), strict=True):
        identified[i] = nearest_is_truth(row, gallery, gallery[truth_indices[i]])
    return identified


def predicted_classes(
    classifier: nn.Module, pixels: Tensor, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """The classifier's class for [0, 1] images, re-normalised into its input space."""
    import torch

    parameter = next(classifier.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    inputs = ((pixels.to(torch.float64) - m) / s).to(device=device, dtype=dtype)
    with torch.no_grad():
        logits = classifier(inputs)
    if logits.dim() != 2 or len(logits) != len(pixels):
        raise ValueError(
            f"classifier: returned shape {tuple(logits.shape)}, expected logits of shape "
            f"({len(pixels)}, classes)"
        )
    return logits.argmax(dim=1).cpu()


def _check_classifier(classifier: Any) -> None:
    from torch import nn

    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier: got {type(classifier).__name__}, expected a torch.nn.Module")
    if classifier.training:
        raise ValueError(
            f"classifier: got {type(classifier).__name__} in training mode, expected eval mode "
            "(call .eval(): batch statistics would make its answers depend on the batch)"
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
    gallery: Tensor | None = None,
    gallery_ids: Sequence[str] | None = None,
    classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """Score one trial. ``reconstructed_images=None`` scores a failed trial (all unmatched).

    Images are given in model-input space. Returns the per-sample rows and trial-level values.
    With ``gallery`` ([0, 1] pixels, N×C×H×W, holding every ground truth; ``gallery_ids``
    locates them by sample id) each row gains ``iip_pixel`` (and ``iip_lpips`` with
    ``with_lpips``); with ``classifier`` (eval mode, normalised inputs to logits) each row gains
    ``task_leakage`` and ``task_ceiling``. See the module docstring, item 6.
    """
    import torch

    if gallery_ids is not None and gallery is None:
        raise ValueError("gallery_ids: given without a gallery, expected gallery too")
    truth_px = to_pixels(truth_images, mean, std)
    truth_indices = (
        gallery_truth_indices(truth_px, sample_ids, gallery, gallery_ids)
        if gallery is not None
        else None
    )
    if classifier is not None:
        _check_classifier(classifier)
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

    privacy: dict[str, list[bool]] = {}
    if gallery is not None and truth_indices is not None:
        matched = [recon_px[pairs[i]] if i in pairs else None for i in range(len(truth_px))]
        privacy["iip_pixel"] = identifiability(matched, truth_indices, gallery)
        if with_lpips:
            privacy["iip_lpips"] = identifiability(
                matched, truth_indices, gallery, lpips_distances()
            )
    if classifier is not None:
        truth_classes = predicted_classes(classifier, truth_px, mean, std)
        paired_classes = predicted_classes(classifier, paired, mean, std)
        privacy["task_leakage"] = [
            i in pairs and int(paired_classes[i]) == int(truth_labels[i])
            for i in range(len(truth_px))
        ]
        privacy["task_ceiling"] = [
            int(truth_classes[i]) == int(truth_labels[i]) for i in range(len(truth_px))
        ]

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
        for key, outcomes in privacy.items():
            row[key] = outcomes[i]
        samples.append(row)

    labels_scored = [s["label_correct"] for s in samples if s["label_correct"] is not None]
    scores: dict[str, Any] = {
        "samples": samples,
        "label_accuracy": float(np.mean(labels_scored)) if labels_scored else None,
        "batch_size_correct": (
            None if inferred_batch_size is None else inferred_batch_size == len(truth_images)
        ),
        "success_rate": float(np.mean([s["success"] for s in samples])),
    }
    if gallery is not None:
        scores["iip_gallery_size"] = len(gallery)
    for key, outcomes in privacy.items():
        scores[f"{key}_rate"] = float(np.mean(outcomes))
    scores["matched_pixels"] = paired
    return scores


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
    summary.update(_privacy_rates(records, samples))
    return summary


PRIVACY_FIELDS = ("iip_pixel", "iip_lpips", "task_leakage", "task_ceiling")


def _privacy_rates(records: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates and counts of the privacy fields over the samples scored for them.

    Every sample of an attacked trial is scored (a failed attack counts as not identified); a
    trial that failed before the attack ran (an unreadable sample) has no ground truth to look
    up, carries no privacy fields, and is left out of these rates (``images`` says how many
    count). IIP also gets its chance level: the mean over images of 1 / gallery size.
    """
    summary: dict[str, Any] = {}
    for key in PRIVACY_FIELDS:
        scored = [
            (s, r["metrics"].get("iip_gallery_size"))
            for r in records
            for s in r["metrics"]["samples"]
            if key in s
        ]
        if not scored:
            continue
        count = sum(bool(s[key]) for s, _ in scored)
        summary[key] = {"rate": count / len(scored), "count": count, "images": len(scored)}
        if key.startswith("iip_"):
            summary[key]["chance"] = float(np.mean([1.0 / n for _, n in scored]))
    return summary


def psnr_rate(records: Iterable[dict[str, Any]], threshold: float) -> float | None:
    """The fraction of the records' ground-truth images scored at a PSNR of at least
    ``threshold`` dB (success@τ for any τ; failed trials count through their null scores, as in
    :func:`aggregate`); None without images."""
    values = [s["psnr"] for r in records for s in r["metrics"]["samples"]]
    return float(np.mean([v >= threshold for v in values])) if values else None


def label_multisets(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Labels restored as a multiset, the way GradInversion restores a batch's labels (which
    labels, how often; not which image has which). Counts over the records: ``trials``,
    ``reported`` (trials whose attack restored labels), ``exact`` (trials whose restored label
    multiset equals the batch's), ``labels`` (ground-truth labels) and ``restored`` (per trial,
    the restored labels the batch's multiset holds: the size of the multisets' intersection).
    A trial without restored labels (an attack that infers none, or a failed trial) counts as
    none restored."""
    counts = {"trials": 0, "reported": 0, "exact": 0, "labels": 0, "restored": 0}
    for r in records:
        truth, restored = Counter(r["labels"]), Counter(r.get("inferred_labels") or [])
        counts["trials"] += 1
        counts["reported"] += r.get("inferred_labels") is not None
        counts["labels"] += len(r["labels"])
        counts["restored"] += sum((truth & restored).values())
        counts["exact"] += truth == restored
    return counts


def bootstrap_medians(trials: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """``np.median(trials[row].ravel())`` for every ``row`` of ``picks`` (a bootstrap's trial
    indices), bit for bit, without building the resamples: the pooled values are sorted once,
    a resample is a count per trial, and each middle element is found by bisection on the
    resample's running count (then the two are averaged as ``np.median`` does). Loading a board
    recomputes every entry's bootstrap, and partitioning 2000 resamples of up to 2560 values
    each dominated it."""
    order = np.argsort(trials, axis=None, kind="stable")
    values = trials.ravel()[order]
    owner = order // trials.shape[1]
    # seen[t, i]: how many of the i + 1 smallest values belong to trial t.
    seen = np.cumsum(owner[None, :] == np.arange(trials.shape[0])[:, None], axis=1)
    counts = np.zeros((len(picks), trials.shape[0]), dtype=np.int64)
    np.add.at(counts, (np.arange(len(picks))[:, None], picks), 1)
    size = picks.shape[1] * trials.shape[1]

    def element(position: int) -> np.ndarray:
        """Each resample's value at sorted ``position``: the first index whose running count
        exceeds it."""
        low = np.zeros(len(picks), dtype=np.int64)
        high = np.full(len(picks), len(values) - 1)
        while np.any(low < high):
            middle = (low + high) // 2
            above = np.einsum("rt,tr->r", counts, seen[:, middle]) > position
            high = np.where(above, middle, high)
            low = np.where(above, low, middle + 1)
        return values[low]

    return (element((size - 1) // 2) + element(size // 2)) / 2
