"""What the unmixing attacks on MixUp and InstaHide share: recovering the batch the client
trained on, and separating convex mixtures of private images.

1. **The trained batch** (:func:`recover_trained_batch`). A mixing defense trains on B mixes
   x'_b = Σ_j λ_bj x_s(b,j) with soft labels, so attacks that read a loss vector's single
   negative entry (ExAN's grouping, iDLG's rule) do not apply. With a first ``nn.Linear`` with
   a bias fed the input, row i of its gradient over its bias entry is
   r_i = ∇W_i / ∇b_i = Σ_m δ_mi x'_m / Σ_m δ_mi (Phong et al.'s bias attack, row by row): a
   unit that only mix m activates gives x'_m exactly, and several such units give the same
   vector (the first-layer identity of the ExAN attack, Pan et al., USENIX Security 2022),
   while a shared unit gives a combination that no other unit repeats. So the rows are grouped
   (relative distance at most ``tolerance``), groups of at least two rows are mixes, the largest
   first; at B = 1 every active row is the one sample. Without such a layer, DLG
   (:mod:`leakbench.attacks.dlg`) recovers the mixes and their soft labels by optimisation.
2. **Unmixing** (:func:`unmix`). In pixel space the mixes are Y = Λ X with Λ ≥ 0, rows summing
   to 1 (convex combinations commute with the affine normalisation). Each column Y[:, p] (one
   pixel across the B mixes) is a non-negative combination of Λ's columns, weighted by the
   sources' values at p; at a pixel where only source b is non-zero it is a multiple of column
   b. Images with dark backgrounds have such pixels, so Λ's columns are the extreme rays of the
   cone of pixel columns: separable non-negative matrix factorisation, solved by the
   successive projection algorithm (Gillis & Vavasis, "Fast and Robust Recursive Algorithms for
   Separable Nonnegative Matrix Factorization", IEEE TPAMI 2014) on the columns scaled to unit
   sum. The scale of each column follows from Λ 1 = 1, then X = Λ⁻¹ Y, refined by alternating
   projected least squares (X in [0, 1], rows of Λ on the simplex).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from leakbench.attacks._defense_aware import first_layer_update
from leakbench.attacks.dlg import DLG
from leakbench.interfaces import TrialFailure
from leakbench.threat_model import Observation

# Rounds of alternating projected least squares after the successive projections.
REFINEMENT_ROUNDS = 50


def first_layer_rows(observation: Observation) -> Tensor | None:
    """r_i = ∇W_i / ∇b_i for every first-layer unit with a non-zero bias gradient (float64),
    or None without a first ``nn.Linear`` with a bias fed the input."""
    first = first_layer_update(observation)
    if first is None:
        return None
    weight, bias = first
    active = bias.abs() > 1e-12 * bias.abs().max().clamp_min(1e-300)
    return weight[active] / bias[active, None]


def group_rows(rows: Tensor, tolerance: float) -> list[Tensor]:
    """Connected groups of rows within ``tolerance`` relative distance, largest first."""
    norms = rows.norm(dim=1).clamp_min(1e-300)
    distance = torch.cdist(rows, rows) / torch.maximum(norms[:, None], norms[None, :])
    linked = (distance <= tolerance).numpy()
    label = -np.ones(len(rows), dtype=int)
    for seed in range(len(rows)):
        if label[seed] >= 0:
            continue
        label[seed] = seed
        stack = [seed]
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(linked[i] & (label < 0)):
                label[j] = seed
                stack.append(int(j))
    groups = [torch.from_numpy(np.flatnonzero(label == g)) for g in np.unique(label)]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def recover_trained_batch(
    observation: Observation, batch_size: int, tolerance: float, dlg_options: dict
) -> tuple[Tensor, dict]:
    """Step 1 of the module docstring: up to ``batch_size`` mixes in model-input space."""
    rows = first_layer_rows(observation)
    if rows is not None and rows.shape[0] > 0:
        if batch_size == 1:
            mixes = rows.mean(dim=0, keepdim=True)  # every active row is the one sample
            return mixes.reshape(1, *observation.input_shape), {"stage_one": "bias rows"}
        groups = [g for g in group_rows(rows, tolerance) if len(g) >= 2][:batch_size]
        if groups:
            mixes = torch.stack([rows[g].mean(dim=0) for g in groups])
            info = {
                "stage_one": "exclusive first-layer rows",
                "rows_per_mix": [len(g) for g in groups],
            }
            return mixes.reshape(len(groups), *observation.input_shape), info
    answer = DLG(**dlg_options).reconstruct(observation)
    return answer.images.double(), {"stage_one": "dlg", "dlg": answer.info}


def _simplex_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row projected onto the probability simplex (Duchi et al., ICML 2008)."""
    projected = np.empty_like(matrix)
    for i, row in enumerate(matrix):
        ordered = np.sort(row)[::-1]
        cumulative = np.cumsum(ordered) - 1
        index = np.arange(1, len(row) + 1)
        rho = np.flatnonzero(ordered - cumulative / index > 0)[-1]
        projected[i] = np.maximum(row - cumulative[rho] / (rho + 1), 0)
    return projected


def successive_projections(columns: np.ndarray, count: int) -> list[int]:
    """Indices of ``count`` extreme columns (SPA on the columns scaled to unit sum)."""
    residual = columns / columns.sum(axis=0, keepdims=True)
    chosen: list[int] = []
    for _ in range(count):
        norms = (residual**2).sum(axis=0)
        j = int(np.argmax(norms))
        if norms[j] <= 1e-24:
            break
        chosen.append(j)
        u = residual[:, j] / np.sqrt(norms[j])
        residual = residual - np.outer(u, u @ residual)
    return chosen


def unmix(mixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 of the module docstring: (X, Λ) with Y ≈ Λ X for pixel-space mixes Y (B, d)."""
    count = mixes.shape[0]
    support = mixes.sum(axis=0) > 1e-9
    if support.sum() < count:
        raise TrialFailure(
            f"the mixes have {int(support.sum())} non-zero pixels, fewer than {count}"
        )
    columns = mixes[:, support]
    chosen = successive_projections(columns, count)
    if len(chosen) < count:
        raise TrialFailure(f"only {len(chosen)} of {count} extreme pixel columns were found")
    basis = columns[:, chosen]
    try:
        scales = np.linalg.solve(basis, np.ones(count))
    except np.linalg.LinAlgError:
        raise TrialFailure("the extreme pixel columns are linearly dependent") from None
    mixing = _simplex_rows(basis * scales[None, :])
    sources = np.clip(np.linalg.lstsq(mixing, mixes, rcond=None)[0], 0, 1)
    for _ in range(REFINEMENT_ROUNDS):
        mixing = _simplex_rows(np.linalg.lstsq(sources.T, mixes.T, rcond=None)[0].T)
        sources = np.clip(np.linalg.lstsq(mixing, mixes, rcond=None)[0], 0, 1)
    return sources, mixing


def to_pixels(observation: Observation, images: Tensor) -> np.ndarray:
    """Model-input images as (N, C·H·W) pixel values in [0, 1] (float64)."""
    return observation.to_image_space(images.double()).clamp(0, 1).flatten(1).cpu().numpy()


def from_pixels(observation: Observation, pixels: np.ndarray, like: Tensor) -> Tensor:
    """(N, C·H·W) pixels back to model-input images in ``like``'s dtype and device."""
    images = torch.from_numpy(pixels).reshape(-1, *observation.input_shape)
    return observation.to_input_space(images).to(like)
