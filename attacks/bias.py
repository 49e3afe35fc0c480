"""``bias``: the bias attack on a first fully connected layer (Phong et al. 2017).

Paper: L. T. Phong, Y. Aono, T. Hayashi, L. Wang, S. Moriai, "Privacy-Preserving Deep Learning
via Additively Homomorphic Encryption", 2017 preprint; IEEE Transactions on Information Forensics
and Security 13(5), 2018.

Threat model: an honest-but-curious server that observes one FedSGD update of a network whose
first trainable layer is ``nn.Linear`` with a bias, fed the flattened input (only an
``nn.Flatten``/``nn.Identity`` may come before it). Nothing else is needed: no batch size, no
labels, no optimisation.

Math. Let a = W x + b be the first layer and δ_m = ∂ℓ_m/∂a the error signal of sample m. The
client shares the mean over its batch of B samples:

    ∇W = (1/B) Σ_m δ_m x_mᵀ,    ∇b = (1/B) Σ_m δ_m.

For one sample every row i with ∇b_i ≠ 0 gives x = ∇W_i / ∇b_i. The attack returns the
least-squares fit of ∇W ≈ ∇b x̂ᵀ over all rows, computed in float64:

    x̂ = Σ_i ∇b_i ∇W_i / Σ_i ∇b_i² = ∇Wᵀ ∇b / ‖∇b‖²,

so rows weigh in proportion to ∇b_i² (rows of inactive neurons, ∇b_i = 0, drop out); it is exact
for B = 1. For B > 1 it returns ONE image, the affine mixture

    x̂ = Σ_m c_m x_m,    c_m = (g_m · ∇b) / (B ‖∇b‖²),    Σ_m c_m = 1,

where g_m = δ_m is the bias gradient of sample m's loss alone (∇b = (1/B) Σ_m g_m). With
``relative_threshold`` τ > 0 only the rows S = {i : |∇b_i| ≥ τ max_k |∇b_k|} enter both sums
(x̂ = Σ_{i∈S} ∇b_i ∇W_i / Σ_{i∈S} ∇b_i², and c_m uses the dot products over S); this drops
rows dominated by noise under a perturbing defense and is still exact for B = 1.

Client protocols: all. The update is read through :func:`leakbench.client.fedsgd_equivalent`;
x̂ is a ratio of gradient entries, so neither the sign flip nor the scale of a FedAvg delta or of
a sum of K clients changes it. A FedAvg delta of one full-batch step is exactly −η ∇θ (the same
answer as FedSGD); after several local steps, or summed over clients, ∇W ≈ ∇b x̂ᵀ holds only
approximately (weights move between steps; more samples mix), as in breaching, which reads a
weight delta as a gradient.

Hyperparameters: ``relative_threshold`` (0.0: every row, the plain least-squares estimate).
The attack infers neither the batch size nor the labels.
"""

from __future__ import annotations

import math

from torch import nn

from leakbench.client import EVERY_PROTOCOL, fedsgd_equivalent
from leakbench.interfaces import Attack, TrialFailure, UnsupportedModelError
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction

# Parameter-free layers that leave the sample's values as they are.
_PASS_THROUGH = (nn.Flatten, nn.Identity)


def first_linear_layer(
    model: nn.Module, attack: str = "the bias attack", bias: bool = True
) -> tuple[str, nn.Linear]:
    """The first trainable layer, which must be ``nn.Linear`` fed the raw input, with a bias
    unless ``bias`` is False; ``attack`` names the attack that needs it in a refusal.

    Walks the leaf modules in registration order, which is the execution order of the
    ``nn.Sequential`` victims this attack targets.
    """
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        if isinstance(module, _PASS_THROUGH):
            continue
        if not isinstance(module, nn.Linear):
            trainable = next(module.parameters(), None) is not None
            kind = "the first trainable layer" if trainable else "the first layer"
            with_bias = " with a bias" if bias else ""
            raise UnsupportedModelError(
                f"{attack} needs the first trainable layer to be nn.Linear{with_bias} "
                f"fed the input; {kind} {name!r} is {module!r}"
            )
        if bias and module.bias is None:
            raise UnsupportedModelError(
                f"{attack} needs the first trainable layer to be nn.Linear with a bias; "
                f"the first trainable layer {name!r} ({module!r}) has no bias"
            )
        return name, module
    raise UnsupportedModelError(f"{attack} found no nn.Linear layer in the model")


@register_attack("bias")
class BiasAttack(Attack):
    requires = frozenset()
    # SoK letter: A, the update alone (the ratio of two of its entries).
    threat_letter = "A"
    client_protocols = EVERY_PROTOCOL
    threat_model = (
        "honest-but-curious server observing one FedSGD update; first trainable layer is "
        "nn.Linear with a bias; no batch size or labels needed"
    )

    def __init__(self, relative_threshold: float = 0.0) -> None:
        super().__init__(relative_threshold=relative_threshold)
        if not (isinstance(relative_threshold, int | float) and 0 <= relative_threshold <= 1):
            raise ValueError(f"relative_threshold must be in [0, 1], got {relative_threshold!r}")
        self.relative_threshold = float(relative_threshold)

    def check_model(self, model: nn.Module) -> None:
        first_linear_layer(model)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        observation = fedsgd_equivalent(observation)
        name, layer = first_linear_layer(observation.model)
        if layer.in_features != math.prod(observation.input_shape):
            raise TrialFailure(
                f"layer {name!r} takes {layer.in_features} features, but a sample of shape "
                f"{observation.input_shape} has {math.prod(observation.input_shape)}"
            )
        prefix = f"{name}." if name else ""
        weight_grad = observation.update[f"{prefix}weight"].double()
        bias_grad = observation.update[f"{prefix}bias"].double()
        scale = bias_grad.abs().max()
        if scale == 0:
            raise TrialFailure(f"the bias gradient of {name!r} is zero: no row reveals the input")
        rows = bias_grad.abs() >= self.relative_threshold * scale
        bias_rows = bias_grad[rows]
        image = bias_rows @ weight_grad[rows] / (bias_rows @ bias_rows)
        return Reconstruction(
            images=image.reshape(1, *observation.input_shape),
            info={"rows_used": int(rows.sum()), "rows_total": int(bias_grad.numel())},
        )
