"""``mixup``: the client trains on convex combinations of its samples, with mixed (soft) labels.

Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018; as a
privacy defense with k samples per mix, Huang, Song, Li, Arora, "InstaHide: Instance-hiding
Schemes for Private Distributed Learning", ICML 2020 (their MixUp baseline, also GradAttack's).
Threat model: the client shares the update of the mixed batch only; the server can at best
recover mixed images, each a blend of k private samples.

Math. For a batch (x_b, y_b) of B samples, k = min(``k``, B) samples per mix, coefficients
λ_b ~ Dirichlet(α, ..., α) (α = ``alpha``; α = 1 is uniform on the simplex, k = 2 gives
mixup's λ ~ Beta(α, α)), redrawn while max_j λ_{b,j} > c (``max_coefficient``, InstaHide's
upper bound; not applied when c · k ≤ 1, which only a batch smaller than ``k`` can cause):

    x'_b = Σ_j λ_{b,j} x_{s(b,j)},   t_b = Σ_j λ_{b,j} e_{y_{s(b,j)}},   Σ_j λ_{b,j} = 1,

where s(b, 0) = b and s(b, 1..k−1) are k − 1 distinct other samples: for a random permutation π
of the batch, s(π(m), j) = π(m + j mod B). The client's update is the client protocol's
gradient of the mean cross-entropy with the probability targets t_b (``F.cross_entropy``
accepts them in place of class indices). What the client trained on is reported as x' with
the hard label of each mix's largest coefficient, y_{s(b, argmax_j λ_{b,j})}.

Steps, as :meth:`MixUpDefense.apply` runs them:

1. the partners s(b, j) from a permutation drawn from the trial's generator;
2. the coefficients λ from NumPy's Dirichlet sampler, seeded by one draw from the generator;
3. the mixed batch x' and soft targets t (float64 sums, cast to the batch's dtype);
4. the update of (x', t) through the client protocol;
5. the hard labels and the report (k, α, c, the coefficients and partners of every mix).

Adaptive attack (Kerckhoffs: k is public; partners and coefficients are not):
``mixup-unmixing``, Carlini et al.'s decoding of instance encodings, which here is a linear
unmixing of the recovered mixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from leakbench.interfaces import ClientShare, Defense, UpdateFn
from leakbench.registry import register_defense

MAX_REDRAWS = 1000  # rounds of redrawing the coefficients that exceed max_coefficient


@dataclass(frozen=True)
class Mixing:
    """Who is mixed with whom, and how much: row b describes mix b."""

    coefficients: Tensor  # (B, k) float64, rows on the simplex
    sources: Tensor  # (B, k) int64 sample indices; column 0 is the sample itself
    max_coefficient: float  # the bound the coefficients obey (1.0: none)

    def mix(self, values: Tensor) -> Tensor:
        """Σ_j λ_{b,j} values[s(b, j)], summed in float64, in ``values``' dtype."""
        picked = values.double()[self.sources.to(values.device)]  # (B, k, ...)
        weights = self.coefficients.to(values.device)
        weights = weights.view(*weights.shape, *(1,) * (picked.dim() - 2))
        return (weights * picked).sum(dim=1).to(values.dtype)

    def dominant_labels(self, labels: Tensor) -> Tensor:
        """The label of each mix's largest coefficient (the first one on ties)."""
        strongest = self.coefficients.argmax(dim=1, keepdim=True)
        return labels[self.sources.gather(1, strongest).squeeze(1).to(labels.device)]

    def report(self) -> dict[str, Any]:
        return {
            "samples_per_mix": int(self.sources.shape[1]),
            "max_coefficient_applied": self.max_coefficient,
            "coefficients": self.coefficients.tolist(),
            "sources": self.sources.tolist(),
        }


def draw_mixing(
    batch: int, k: int, alpha: float, max_coefficient: float, generator: torch.Generator
) -> Mixing:
    """Partners and Dirichlet(α) coefficients for a batch (module docstring, steps 1-2)."""
    k = min(k, batch)
    order = torch.randperm(batch, generator=generator, device=generator.device).cpu()
    sources = torch.empty(batch, k, dtype=torch.int64)
    for j in range(k):
        sources[order, j] = order.roll(-j)
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    rng = np.random.default_rng(seed)
    bound = max_coefficient if max_coefficient * k > 1 else 1.0
    coefficients = rng.dirichlet([alpha] * k, size=batch)
    for _ in range(MAX_REDRAWS):
        over = coefficients.max(axis=1) > bound
        if not over.any():
            break
        coefficients[over] = rng.dirichlet([alpha] * k, size=int(over.sum()))
    else:
        raise ValueError(
            f"max_coefficient={max_coefficient!r} is too close to 1/k={1 / k:.4g}: no Dirichlet "
            f"draw fell within it after {MAX_REDRAWS} rounds; expected a larger bound"
        )
    return Mixing(torch.from_numpy(coefficients), sources, float(bound))


def soft_targets(model: nn.Module, images: Tensor, labels: Tensor, mixing: Mixing) -> Tensor:
    """The mixed one-hot targets t_b, with as many classes as the model has outputs."""
    # The probe runs on copies of the buffers: a train-mode BatchNorm must not count it.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.no_grad():
        classes = functional_call(model, buffers, (images,)).shape[1]
    return mixing.mix(F.one_hot(labels, classes).to(images.dtype))


def validate_mixing(k: int, alpha: float, max_coefficient: float) -> None:
    """One-line errors for the hyperparameters MixUp and InstaHide share."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (samples per mix), got {k!r}")
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0 < alpha < 1e6):
        raise ValueError(f"alpha must be a number in (0, 1e6), got {alpha!r}")
    if not (
        isinstance(max_coefficient, int | float)
        and not isinstance(max_coefficient, bool)
        and 1 / k < max_coefficient <= 1
    ):
        raise ValueError(
            f"max_coefficient must be in (1/k, 1] = ({1 / k:.4g}, 1], got {max_coefficient!r}"
        )


class MixingDefense(Defense):
    """A defense that trains on mixes of the batch with soft labels (MixUp, InstaHide)."""

    def __init__(self, k: int, alpha: float, max_coefficient: float, **extra: Any) -> None:
        super().__init__(k=k, alpha=alpha, max_coefficient=max_coefficient, **extra)
        validate_mixing(k, alpha, max_coefficient)
        self.k = k
        self.alpha = float(alpha)
        self.max_coefficient = float(max_coefficient)

    def transform(self, mixed: Tensor, generator: torch.Generator) -> tuple[Tensor, dict]:
        """What happens to the mixed batch before training (MixUp: nothing)."""
        return mixed, {}

    def apply(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        compute_update: UpdateFn,
    ) -> ClientShare:
        # 1-2. Partners and coefficients.
        mixing = draw_mixing(images.shape[0], self.k, self.alpha, self.max_coefficient, generator)
        # 3. Mixed batch (then the subclass's transform) and soft targets.
        trained, extra = self.transform(mixing.mix(images), generator)
        targets = soft_targets(model, images, labels, mixing)
        # 4. The client protocol's update on probability targets.
        update = compute_update(model, trained, targets)
        # 5. Hard labels and the report.
        info = {"k": self.k, "alpha": self.alpha, **mixing.report(), **extra}
        return ClientShare(trained, mixing.dominant_labels(labels), update, info)


@register_defense("mixup")
class MixUpDefense(MixingDefense):
    def __init__(self, k: int = 2, alpha: float = 1.0, max_coefficient: float = 1.0) -> None:
        super().__init__(k=k, alpha=alpha, max_coefficient=max_coefficient)

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {"mixup-unmixing": {"k": self.k}}
