"""``exclusivity-reduction-mixing``: batch-side mixing so that activation patterns overlap.

OUR INTERPRETATION, not the paper's defense. Pan et al. (USENIX Security 2022, "Exploring the
Security Boundary of Data Reconstruction via Neuron Exclusivity Analysis") devise an
"exclusivity reduction strategy", whose mechanics the paper's text does not give. This module
is the third of our three variants (input perturbation, gradient suppression, batch mixing), in
a MixUp-like form (Zhang et al., "mixup", ICLR 2018): every sample is blended
with a partner from the same batch, which pulls the samples' activation patterns towards each
other and so leaves fewer units active for a single sample.

Threat model: the client trains on (and so shares the update of) the mixed batch; the server
attacks that update. What the server can recover is at best the mixed images, which differ
from the private ones by the partner's share.

Method. Draw a permutation σ of the batch from the generator and give sample σ(i) the partner
σ(i + 1 mod B), a random cyclic derangement (no sample is its own partner). With
λ = ``mix_weight`` ∈ [0, 1/2):

    x'_m = (1 − λ) x_m + λ x_partner(m),    y'_m = y_m,

so each mixed image keeps the label of its dominant sample (the shared loss is the hard-label
cross-entropy). A batch of one has no partner and is left unchanged.

Duplicating samples instead would be no defense: a batch holding every sample twice has no
ExANs at all, yet its mean gradient equals that of the original batch, which the ExAN attack
would have reconstructed exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leakbench.interfaces import Defense
from leakbench.registry import register_defense


def mix_with_partners(images: Tensor, mix_weight: float, generator: torch.Generator) -> Tensor:
    """Blend every sample with a random other sample of the batch (module docstring)."""
    batch = images.shape[0]
    if batch < 2 or mix_weight == 0:
        return images
    order = torch.randperm(batch, generator=generator, device=generator.device).to(images.device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return (1 - mix_weight) * images + mix_weight * images[partner]


@register_defense("exclusivity-reduction-mixing")
class MixingExclusivityReduction(Defense):
    def __init__(self, mix_weight: float = 0.3) -> None:
        super().__init__(mix_weight=mix_weight)
        if not (isinstance(mix_weight, int | float) and 0 <= mix_weight < 0.5):
            raise ValueError(f"mix_weight must be in [0, 0.5), got {mix_weight!r}")
        self.mix_weight = float(mix_weight)

    def defend_batch(
        self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        return mix_with_partners(images, self.mix_weight, generator), labels
