"""``instahide-decoding``: Carlini et al.'s decoding of InstaHide encodings recovered from the
update.

Paper: N. Carlini, S. Deng, S. Garg, S. Jha, S. Mahloujifar, M. Mahmoody, S. Song, A. Thakurta,
F. Tramèr, "Is Private Learning Possible with Instance Encoding?", IEEE S&P 2021 (the attack on
InstaHide). Defense: :mod:`leakbench.defenses.instahide` (Huang et al., ICML 2020, inside-dataset
variant). Threat model: an honest-but-curious server that knows the architecture, the
parameters, the batch size, the dataset's normalisation and that the client encodes with
InstaHide at k (Kerckhoffs); the partners, coefficients and sign masks stay the client's.

InstaHide's encoding of a mix is x̃ = σ ⊙ Σ_j λ_j x_j in model-input space, σ a uniform sign
per entry. Carlini et al. observe that the magnitude survives: |x̃| = |Σ_j λ_j x_j|, and attack
that; then they find which encodings share a private image and solve for the images. Here, in
one round:

* the sign. With the per-channel normalisation x = (p − μ)/s, |x̃| fixes the mix's pixel value
  up to a reflection about μ: p ∈ {μ − s|x̃|, μ + s|x̃|}. Where only one lies in [0, 1] it is the
  value (our use of the pixel box; Carlini et al. keep |x̃|); where both do, the pair is resolved
  by smoothness: iterated conditional modes on the anisotropic total variation of the image
  (each ambiguous pixel in turn takes the value closer, in summed absolute difference, to its
  four neighbours), from the darker choice, until nothing changes;
* the sharing and the images. Every private image enters k of the B encodings of the round;
  with the signs resolved the encodings are convex mixtures, separated as MixUp's are
  (:mod:`leakbench.attacks._unmixing`: separable non-negative factorisation).

Steps, as :meth:`InstaHideDecoding.reconstruct` runs them:

1. the B encodings from the update (exclusive first-layer rows where the victim has a first
   ``nn.Linear`` with a bias, else DLG);
2. each encoding's magnitude, and its pixels resolved as above;
3. when every encoding was found and k, B > 1: the unmixing; otherwise the resolved images;
4. back to model-input space.

Hyperparameters: ``k`` (4, the defense's default), ``tolerance`` (1e-4) and ``dlg_iterations``
(300) as in ``mixup-unmixing``; ``sweeps`` (50): at most this many passes of the smoothing.
"""

from __future__ import annotations

import numpy as np
import torch

from leakbench.attacks._unmixing import from_pixels, recover_trained_batch, unmix
from leakbench.attacks.mixup_unmixing import check_unmixing_hyperparameters
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction

# A candidate pixel value counts as inside [0, 1] within this margin (float32 encodings).
BOX_MARGIN = 1e-4


def resolve_reflections(low: np.ndarray, high: np.ndarray, sweeps: int) -> tuple[np.ndarray, int]:
    """One (H, W) channel: each pixel is ``low`` or ``high``; the box decides where only one is
    in [0, 1], iterated conditional modes on total variation decide the rest (module
    docstring). Returns the values and the number of ambiguous pixels."""
    low_ok = (low >= -BOX_MARGIN) & (low <= 1 + BOX_MARGIN)
    high_ok = (high >= -BOX_MARGIN) & (high <= 1 + BOX_MARGIN)
    # Neither inside (noise): the nearer one, clamped.
    nearer_high = np.abs(np.clip(high, 0, 1) - high) < np.abs(np.clip(low, 0, 1) - low)
    values = np.where(high_ok & ~low_ok, high, low)
    values = np.where(~high_ok & ~low_ok, np.where(nearer_high, high, low), values)
    values = np.clip(values, 0, 1)
    ambiguous = np.argwhere(low_ok & high_ok & (np.abs(high - low) > BOX_MARGIN))
    rows, cols = values.shape
    for _ in range(sweeps):
        changed = False
        for i, j in ambiguous:
            neighbours = [
                values[a, b]
                for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                if 0 <= a < rows and 0 <= b < cols
            ]
            costs = [sum(abs(c - n) for n in neighbours) for c in (low[i, j], high[i, j])]
            best = np.clip(low[i, j] if costs[0] <= costs[1] else high[i, j], 0, 1)
            if best != values[i, j]:
                values[i, j] = best
                changed = True
        if not changed:
            break
    return values, len(ambiguous)


@register_attack("instahide-decoding")
class InstaHideDecoding(Attack):
    requires = frozenset({Capability.BATCH_SIZE})
    threat_letter = "B"  # the SoK's letter of Inverting Gradients, whose objective it extends
    adapts_to = frozenset({"instahide"})
    threat_model = (
        "honest-but-curious server observing one FedSGD update of an InstaHide client; knows "
        "the architecture, the parameters, the batch size and k (not the partners, "
        "coefficients or sign masks)"
    )

    def __init__(
        self, k: int = 4, tolerance: float = 1e-4, dlg_iterations: int = 300, sweeps: int = 50
    ) -> None:
        super().__init__(k=k, tolerance=tolerance, dlg_iterations=dlg_iterations, sweeps=sweeps)
        check_unmixing_hyperparameters(k, tolerance, dlg_iterations)
        self.k = k
        self.tolerance = float(tolerance)
        self.dlg_iterations = dlg_iterations
        self.sweeps = positive_int("sweeps", sweeps)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        batch_size = observation.batch_size
        if batch_size is None:
            raise TrialFailure("instahide-decoding needs the batch size")
        # 1. The encodings.
        encodings, info = recover_trained_batch(
            observation, batch_size, self.tolerance, {"iterations": self.dlg_iterations}
        )
        # 2. Magnitudes, and the pixel values they allow.
        magnitude = encodings.double().abs().cpu().numpy()
        mean = np.asarray(observation.mean).reshape(-1, 1, 1)
        std = np.asarray(observation.std).reshape(-1, 1, 1)
        resolved = np.empty_like(magnitude)
        ambiguous = 0
        for n, image in enumerate(magnitude):
            for c in range(image.shape[0]):
                values, count = resolve_reflections(
                    mean[c] - std[c] * image[c], mean[c] + std[c] * image[c], self.sweeps
                )
                resolved[n, c] = values
                ambiguous += count
        info["ambiguous_fraction"] = ambiguous / magnitude.size
        pixels = resolved.reshape(len(resolved), -1)
        # 3. Unmixing where it is determined.
        if min(self.k, batch_size) > 1 and len(pixels) == batch_size:
            pixels, mixing = unmix(pixels)
            info["mixing_matrix"] = mixing.round(6).tolist()
        # 4. Model-input space.
        return Reconstruction(
            images=from_pixels(observation, pixels, torch.zeros((), dtype=encodings.dtype)),
            info=info,
        )
