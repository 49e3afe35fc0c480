"""What the best lookup of the public dataset scores against a track's secretly changed samples.

Verification changes every private sample with the track's secret transform
(:mod:`leakbench.protocol.private_transform`), so that an attack which looks its answer up in
the public dataset, instead of inverting the gradient, cannot find the sample the client held.
``leakbench leaderboard lookup-bound TRACK`` measures how far that lookup gets: it draws
``--trials`` samples of the track's split (batch size 1, public seed ``--seed``), changes each
with the track's ``verification.private_transform`` (transform seed ``--seed``) and scores two
oracles against it, both chosen *with* the truth, so that they bound every attack that does not
have it:

(a) the *nearest public image*: every image of the public dataset (every split), mirrored or
    not, moved by every whole-pixel shift (dy, dx) in [−2, 2]² with replicated edges, times its
    least-squares gain, clamped to [0, 1]; the best PSNR over them. It bounds the enumerators
    that beat the earlier list-like transform (images × shifts × flips × a gain search);
(b) the *noise floor*: the sample's own public image under the exact transform parameters of
    the trial, without the noise. However well a lookup searched the continuous parameters, what
    still separates it from the truth is noise drawn for this sample alone.

The track's bound is, per sample, the better of the two oracles; its median and maximum over
the samples go into the track file as ``verification.lookup_bound``. Every PSNR comes from the
canonical metrics module (:mod:`leakbench.metrics`), on pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

MAX_SHIFT = 2  # whole-pixel shifts of oracle (a), each way
CANDIDATES_PER_CHUNK = 4096  # candidates scored at once: bounds the memory of one comparison


@dataclass(frozen=True)
class LookupFigures:
    """Per transformed sample, the PSNR (dB) of each oracle."""

    track: str
    source: str  # "<dataset>/<split>"
    public_images: int
    nearest: list[float]  # (a)
    noise_floor: list[float]  # (b)

    @property
    def best(self) -> list[float]:
        return [max(a, b) for a, b in zip(self.nearest, self.noise_floor, strict=True)]

    def bound(self, trials: int, seed: int) -> dict[str, Any]:
        """The ``verification.lookup_bound`` block of the track."""
        command = f"leakbench leaderboard lookup-bound {self.track} --trials {trials}"
        return {
            "psnr_max": round(max(self.best), 2),
            "psnr_median": round(float(np.median(self.best)), 2),
            "measured_with": command + (f" --seed {seed}" if seed else ""),
        }


def shifted_and_flipped(images: Tensor, max_shift: int = MAX_SHIFT) -> Tensor:
    """Every image (N, C, H, W), mirrored left-right or not, moved by every whole-pixel
    (dy, dx) in [−max_shift, max_shift]² with the uncovered border copied from the edge:
    (N · 2 · (2·max_shift + 1)², C, H, W), image by image."""
    h, w = images.shape[-2:]
    p = max_shift
    padded = F.pad(torch.cat([images, images.flip(-1)], 1), (p, p, p, p), mode="replicate")
    moves = [
        padded[..., p - dy : p - dy + h, p - dx : p - dx + w]
        for dy in range(-p, p + 1)
        for dx in range(-p, p + 1)
    ]
    # (N, moves, 2C, H, W) -> (N, moves, 2, C, H, W) -> one candidate per row
    stacked = torch.stack(moves, 1).unflatten(2, (2, images.shape[1]))
    return stacked.flatten(0, 2)


def nearest_psnr(candidates: Tensor, truth: Tensor) -> float:
    """Oracle (a): the best PSNR against ``truth`` (C, H, W) of any of ``candidates``
    (:func:`shifted_and_flipped` of the public images) times its least-squares gain, in [0, 1]."""
    # Imported here, not at the top: attack code imports shifted_and_flipped without them.
    from leakbench.metrics import least_squares_gains, mse_matrix, psnr_from_mse

    best = float("inf")
    for chunk in candidates.split(CANDIDATES_PER_CHUNK):
        gains = least_squares_gains(chunk, truth).view(-1, 1, 1, 1)
        best = min(best, float(mse_matrix((gains * chunk).clamp(0, 1), truth[None]).min()))
    return psnr_from_mse(best)


def public_pixels(datamodule: Any) -> Tensor:
    """Every image of every split of the datamodule, as float64 pixels in [0, 1]."""
    from leakbench.metrics import to_pixels

    images = [
        torch.stack([x for x, _, _ in datamodule.samples(split)]) for split in datamodule.splits
    ]
    return to_pixels(torch.cat(images), datamodule.mean, datamodule.std)


def measure(
    track: Mapping[str, Any],
    trials: int,
    seed: int = 0,
) -> LookupFigures:
    """Both oracles on ``trials`` samples of ``track`` (a track file's mapping)."""
    from leakbench.config import RunConfig
    from leakbench.metrics import mse_matrix, psnr_from_mse, to_pixels
    from leakbench.protocol.private_transform import PrivateTransform
    from leakbench.runner import build_datamodule

    name = track["track"]["name"]
    options = track["track"].get("verification", {}).get("private_transform")
    if options is None:
        raise ValueError(f"track {name!r} declares no verification.private_transform")
    transform = PrivateTransform.from_options({**options, "seed": seed})
    config = RunConfig.from_mapping({**track, "trials": trials, "seed": seed})
    datamodule = build_datamodule(config, 1)
    public = public_pixels(datamodule)
    candidates = shifted_and_flipped(public)
    draws = datamodule.trials()
    nearest, floor = [], []
    for trial in range(trials):
        original = to_pixels(draws[trial]["images"], datamodule.mean, datamodule.std)
        truth = transform.pixels(original, trial)[0]
        without_noise = transform.pixels(original, trial, noise=False)[0]
        nearest.append(nearest_psnr(candidates, truth))
        floor.append(psnr_from_mse(float(mse_matrix(without_noise[None], truth[None])[0, 0])))
    return LookupFigures(
        track=name,
        source=f"{config.dataset}/{config.split}",
        public_images=len(public),
        nearest=nearest,
        noise_floor=floor,
    )


def report(figures: LookupFigures, seed: int) -> list[str]:
    """What ``lookup-bound`` prints for one track."""
    candidates = 2 * (2 * MAX_SHIFT + 1) ** 2

    def line(label: str, values: Sequence[float]) -> str:
        return f"  {label}: median {np.median(values):.2f} dB, max {max(values):.2f} dB"

    return [
        f"{figures.track}: {len(figures.nearest)} samples of {figures.source} under the track's "
        f"private transform (seed {seed})",
        line(
            f"(a) nearest public image, chosen with the truth ({figures.public_images} images "
            f"x {candidates} flips and shifts x least-squares gain)",
            figures.nearest,
        ),
        line("(b) exact transform parameters without the noise (noise floor)", figures.noise_floor),
        line("lookup bound (the better oracle per sample)", figures.best),
    ]
