"""``soteria-skip``: gradient matching through the layers Soteria leaves untouched.

Paper: M. Balunović, D. I. Dimitrov, N. Jovanović, M. Vechev, "Bayesian Framework for Gradient
Leakage", ICLR 2022 (Sec. 6, "Breaking existing defenses": Soteria is attacked by leaving the
defended layer's gradient out of the reconstruction objective). The defense:
:mod:`leakbench.defenses.soteria` (Sun et al., CVPR 2021).

Threat model: an honest-but-curious server that knows the architecture, the parameters and the
batch size, observes one update, and knows that the client runs Soteria on a named layer
(Kerckhoffs: the defense's configuration is public; which features it pruned is not needed).
Labels are used if granted, otherwise read from the output layer's bias gradient, which Soteria
does not touch.

Math. Soteria zeroes columns of one layer's weight gradient, ∂ℓ/∂W_d, and shares every other
tensor exactly. With M_p = 0 for the defended weight and M_p = 1 for every other parameter p,
the attack minimises over dummies x'

    L(x') = 1 − ⟨M ⊙ ∇θ ℓ(x', y), M ⊙ U⟩ / (‖M ⊙ ∇θ ℓ(x', y)‖ ‖M ⊙ U⟩‖) + α · TV(x'),

the Inverting Gradients objective on the untouched tensors only, with Inverting Gradients'
optimiser (:mod:`leakbench.attacks._defense_aware`). A generic attack matches the zeroed
columns too and is pulled towards inputs whose representation has those features at zero.

Steps, as :meth:`SoteriaSkip.reconstruct` runs them:

1. the defended layer: ``layer`` (a module name), or Soteria's default, the last ``nn.Linear``;
2. the mask M: every parameter tensor but that layer's weight;
3. the masked cosine matching, ``restarts`` runs sharing the trial budget, the one with the
   smallest final masked distance returned.

Hyperparameters: ``layer`` (None: the last ``nn.Linear``); the schedule ``iterations`` (2000;
Inverting Gradients' published budget is 24 000), ``lr`` (0.1), ``tv_weight`` (1e-4),
``restarts`` (1).

Client protocols: all that Inverting Gradients replays (FedAvg with the local hyperparameters).
"""

from __future__ import annotations

import torch
from torch import nn

from leakbench.attacks._defense_aware import (
    DefenseAwareAttack,
    MatchingSchedule,
    masked_cosine,
    match,
)
from leakbench.interfaces import UnsupportedModelError
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction


def defended_linear(model: nn.Module, layer: str | None) -> str:
    """The name of Soteria's defended ``nn.Linear``: ``layer``, or the last one."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnsupportedModelError("soteria-skip needs a model with an nn.Linear layer")
    if layer is None:
        return linears[-1]
    if layer not in linears:
        valid = ", ".join(repr(n) for n in linears)
        raise UnsupportedModelError(
            f"layer {layer!r} is not an nn.Linear of the model; valid: {valid}"
        )
    return layer


@register_attack("soteria-skip")
class SoteriaSkip(DefenseAwareAttack):
    adapts_to = frozenset({"soteria"})
    threat_model = (
        "honest-but-curious server observing one update; knows the architecture, the "
        "parameters, the batch size and Soteria's defended layer; matches the other layers"
    )

    def __init__(
        self,
        layer: str | None = None,
        iterations: int = 2000,
        lr: float = 0.1,
        tv_weight: float = 1e-4,
        restarts: int = 1,
    ) -> None:
        self.schedule = MatchingSchedule(iterations, lr, tv_weight, restarts)
        super().__init__(layer=layer, **self.schedule.hparams())
        if layer is not None and not (isinstance(layer, str) and layer):
            raise ValueError(f"layer must be a module name or None, got {layer!r}")
        self.layer = layer

    def check_model(self, model: nn.Module) -> None:
        defended_linear(model, self.layer)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        # 1. The defended layer.
        defended = f"{defended_linear(observation.model, self.layer)}.weight"
        # 2. The mask: every tensor but the defended weight.
        names = [name for name, _ in observation.model.named_parameters()]
        masks = [
            torch.full_like(g, name != defended, dtype=torch.bool)
            for name, g in zip(names, observation.gradients(), strict=True)
        ]
        # 3. Matching on the untouched tensors.
        return match(
            observation,
            "soteria-skip",
            masked_cosine(masks),
            self.schedule,
            info={"skipped": defended},
        )
