"""``mask-aware``: gradient matching on the entries a sparsifying defense kept.

Defenses it adapts to: gradient pruning (:mod:`leakbench.defenses.pruning`, DLG's Sec. 5),
top-k sparsification (:mod:`leakbench.defenses.top_k`) and Soteria's column pruning
(:mod:`leakbench.defenses.soteria`). The attack of Balunović, Dimitrov, Jovanović, Vechev
("Bayesian Framework for Gradient Leakage", ICLR 2022, Sec. 6) on such defenses: the server
knows the defense zeroes entries, and the zeros are visible in what it receives, so it leaves
them out of the objective instead of asking the dummy's gradient to vanish there.

Threat model: an honest-but-curious server that knows the architecture, the parameters and the
batch size and observes one sparsified update; the mask is read off the update itself (an entry
is kept iff it is non-zero). Labels are used if granted, otherwise read from the output layer's
bias gradient where it survived, else learned jointly.

Math. With U the shared update and M = 1[U ≠ 0] entrywise, minimise over dummies x'

    L(x') = 1 − ⟨M ⊙ ∇θ ℓ(x', y), U⟩ / (‖M ⊙ ∇θ ℓ(x', y)‖ ‖U‖) + α · TV(x')

with Inverting Gradients' optimiser (:mod:`leakbench.attacks._defense_aware`). A generic
attack compares the dummy's full gradient with U, i.e. asks the dropped entries to be zero.

Closed-form start (our addition, for a first ``nn.Linear`` with a bias fed the input, at one
sample): row i of the first layer gives x_j = ∇W_ij / ∇b_i wherever both entries were kept
(Phong et al.'s bias attack, restricted to the kept entries); each pixel takes the median over
its kept rows, and a pixel no kept row reveals starts at the dataset mean (0 in model-input
space). The first restart starts there.

Steps, as :meth:`MaskAware.reconstruct` runs them:

1. the mask M from the update;
2. the closed-form start where it applies;
3. the masked cosine matching, ``restarts`` runs sharing the trial budget, the one with the
   smallest final masked distance returned.

Hyperparameters: the schedule ``iterations`` (2000; Inverting Gradients' published budget is
24 000), ``lr`` (0.1), ``tv_weight`` (1e-4), ``restarts`` (1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from leakbench.attacks._defense_aware import (
    DefenseAwareAttack,
    MatchingSchedule,
    first_layer_update,
    masked_cosine,
    match,
)
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction


def kept_entries_start(observation: Observation) -> Tensor | None:
    """The first-layer ratio estimate over kept entries (module docstring), or None where the
    victim has no first ``nn.Linear`` with a bias or the batch is not one sample."""
    first = first_layer_update(observation) if observation.batch_size == 1 else None
    if first is None:
        return None
    weight, bias = first
    rows = bias != 0
    ratios = weight[rows] / bias[rows, None]
    ratios[weight[rows] == 0] = math.nan  # pruned entries say nothing
    estimate = torch.nanmedian(ratios, dim=0).values if rows.any() else torch.zeros(weight.shape[1])
    estimate = torch.nan_to_num(estimate, nan=0.0)
    return estimate.reshape(1, *observation.input_shape).to(weight.device)


@register_attack("mask-aware")
class MaskAware(DefenseAwareAttack):
    adapts_to = frozenset({"pruning", "top-k", "soteria"})
    threat_model = (
        "honest-but-curious server observing one sparsified update; knows the architecture, "
        "the parameters and the batch size; matches only the entries the client kept"
    )

    def __init__(
        self, iterations: int = 2000, lr: float = 0.1, tv_weight: float = 1e-4, restarts: int = 1
    ) -> None:
        self.schedule = MatchingSchedule(iterations, lr, tv_weight, restarts)
        super().__init__(**self.schedule.hparams())

    def reconstruct(self, observation: Observation) -> Reconstruction:
        # 1. The mask: the entries the client kept.
        masks = [g != 0 for g in observation.gradients()]
        kept = sum(int(m.sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        # 2. The closed-form start, 3. matching on the kept entries.
        return match(
            observation,
            "mask-aware",
            masked_cosine(masks),
            self.schedule,
            start=kept_entries_start(observation),
            info={"kept_fraction": kept / total},
        )
