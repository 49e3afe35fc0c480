"""``exclusivity-reduction-gradient``: gradient-side suppression of the rows ExANs own.

OUR INTERPRETATION, not the paper's defense. Pan et al. (USENIX Security 2022, "Exploring the
Security Boundary of Data Reconstruction via Neuron Exclusivity Analysis") devise an
"exclusivity reduction strategy", whose mechanics the paper's text does not give. This module
is the second of our three variants (input perturbation, gradient suppression, batch mixing):
the client zeroes, before sharing, exactly the parts of the update that the ExAN attack divides
by.

Threat model: the client knows its batch and its model, computes its own ExANs, and shares the
update with them removed; the server sees only the suppressed update.

Math. For a ``Linear → ReLU`` pair, unit j of the ReLU layer owns row j of the Linear's weight
gradient and entry j of its bias gradient; at an ExAN j of sample m these equal
(1/B) δ_m[j] h_mᵀ and (1/B) δ_m[j], whose ratio is sample m's input to the layer. The defense
sets both to zero for every ExAN of the batch. With ``zero_outgoing_columns`` it also zeroes
column j of the next Linear's weight gradient ((1/B) h_m[j] δ_m^{next}, which tells the server
the ExAN's sample and, after the last ReLU layer, its loss vector and label). The rest of the
update is unchanged, so the shared update is the true one minus the ExANs' contributions.

Only ReLU layers fed by an ``nn.Linear`` (called just before the ReLU, with one output per unit)
are suppressed; units of convolutional layers own no gradient row and are left as they are.

"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from leakbench.analysis.exclusivity import activation_patterns, exan_mask
from leakbench.interfaces import Defense
from leakbench.registry import register_defense


def suppress_exan_gradients(
    model: nn.Module, images: Tensor, update: Mapping[str, Tensor], zero_outgoing_columns: bool
) -> dict[str, Tensor]:
    """A copy of ``update`` with the rows (and optionally columns) of the batch's ExANs zeroed."""
    result = {name: g.clone() for name, g in update.items()}
    modules = dict(model.named_modules())
    for pattern in activation_patterns(model, images):
        producer = modules.get(pattern.producer or "")
        if not isinstance(producer, nn.Linear) or producer.out_features != pattern.units:
            continue
        units = exan_mask(pattern.active).any(dim=0)
        for kind in ("weight", "bias"):
            key = f"{pattern.producer}.{kind}"
            if key in result:
                result[key][units.to(result[key].device)] = 0
        consumer = modules.get(pattern.consumer or "")
        key = f"{pattern.consumer}.weight"
        if (
            zero_outgoing_columns
            and isinstance(consumer, nn.Linear)
            and consumer.in_features == pattern.units
            and key in result
        ):
            result[key][:, units.to(result[key].device)] = 0
    return result


@register_defense("exclusivity-reduction-gradient")
class GradientExclusivityReduction(Defense):
    def __init__(self, zero_outgoing_columns: bool = True) -> None:
        super().__init__(zero_outgoing_columns=zero_outgoing_columns)
        if not isinstance(zero_outgoing_columns, bool):
            raise ValueError(f"zero_outgoing_columns must be a bool, got {zero_outgoing_columns!r}")
        self.zero_outgoing_columns = zero_outgoing_columns

    def defend_update(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        update: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        return suppress_exan_gradients(model, images, update, self.zero_outgoing_columns)
