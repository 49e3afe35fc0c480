"""``instahide``: MixUp of k private samples followed by a random pixel-wise sign flip.

Huang, Song, Li, Arora, "InstaHide: Instance-hiding Schemes for Private Distributed Learning",
ICML 2020. Threat model: the client encodes every training sample before it trains; the server
sees only the update of the encoded batch, and the encoding's randomness (partners,
coefficients, sign masks) never leaves the client.

This is the paper's *inside-dataset* variant: the k − 1 partners of a sample come from the
client's own batch (the cross-dataset variant mixes in images of a large public set, which the
benchmark would have to download; it does not). Math, with the mixing of
:mod:`leakbench.defenses.mixup` (coefficients λ_b ~ Dirichlet(α) with max_j λ_{b,j} ≤ c; the
paper's defaults are k = 4 and c = 0.65):

    x̃_b = σ_b ⊙ Σ_j λ_{b,j} x_{s(b,j)},   t_b = Σ_j λ_{b,j} e_{y_{s(b,j)}},

where σ_b ∈ {−1, +1}^{C×H×W} has i.i.d. uniform signs, one mask per encoded image. The flip is
applied in model-input space (after the datamodule's normalisation), as InstaHide flips
normalised pixels. The client trains on x̃ with the probability targets t; what it trained on is
reported as x̃ with the hard label of each mix's largest coefficient.

Steps, as :meth:`InstaHideDefense.apply` runs them:

1. the partners s(b, j) from a permutation drawn from the trial's generator;
2. the coefficients λ from NumPy's Dirichlet sampler, seeded by one draw from the generator;
3. the mixed batch and soft targets, then the sign masks σ (one uniform bit per entry from the
   generator) multiplied in;
4. the update of (x̃, t) through the client protocol;
5. the hard labels and the report (k, α, c, coefficients, partners, fraction of flipped signs).

Adaptive attack (Kerckhoffs: k is public; partners, coefficients and masks are not):
``instahide-decoding`` (Carlini et al., IEEE S&P 2021), which works on the encodings'
magnitudes and unmixes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from leakbench.defenses.mixup import MixingDefense
from leakbench.registry import register_defense


def sign_masks(like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform ±1 entries shaped like ``like``, in its dtype and on its device."""
    bits = torch.randint(0, 2, like.shape, generator=generator, device=generator.device)
    return (2 * bits - 1).to(device=like.device, dtype=like.dtype)


@register_defense("instahide")
class InstaHideDefense(MixingDefense):
    def __init__(self, k: int = 4, alpha: float = 1.0, max_coefficient: float = 0.65) -> None:
        super().__init__(k=k, alpha=alpha, max_coefficient=max_coefficient)

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {"instahide-decoding": {"k": self.k}}

    def transform(self, mixed: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        masks = sign_masks(mixed, generator)
        return mixed * masks, {"flipped_fraction": float((masks < 0).double().mean())}
