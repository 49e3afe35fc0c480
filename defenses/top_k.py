"""``top-k``: top-k gradient sparsification of the whole update.

Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017; Stich,
Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (top_k). The communication
compressor that defense papers compare with (it is the "gradient sparsification" of Zhu et al.'s
DLG, Sec. 5, applied globally). Threat model: the client shares only the k entries of largest
magnitude of its whole update (values and positions); the server sees those.

For the update flattened over all its tensors into v ∈ R^n, with k = ``k`` entries, or
k = ⌈f · n⌉ for ``fraction`` f ∈ (0, 1]:

    top_k(v)_i = v_i if |v_i| is among the k largest magnitudes, else 0,

ties at the cut broken by ``torch.topk`` (exactly k entries are kept). Unlike ``pruning``
(:mod:`leakbench.defenses.pruning`, which keeps a fraction per tensor by default), the budget is
one count over the whole update, so layers with large gradients keep more entries. The memory
(error feedback) of Stich et al. is left out: a defense here is stateless, one round.

Adaptive attack: ``mask-aware`` (the kept positions are visible; the attack matches only them).

Steps, as :meth:`TopKDefense.defend_update` runs them:

1. the update flattened in its tensors' order;
2. its k largest magnitudes kept, every other entry set to 0
   (:func:`leakbench.defenses.pruning.keep_largest`);
3. split back into the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.defenses.pruning import keep_largest
from leakbench.interfaces import Defense, positive_int
from leakbench.registry import register_defense


@register_defense("top-k")
class TopKDefense(Defense):
    def __init__(self, k: int | None = None, fraction: float | None = None) -> None:
        super().__init__(k=k, fraction=fraction)
        if (k is None) == (fraction is None):
            raise ValueError(
                f"give exactly one of k and fraction, got k={k!r}, fraction={fraction!r}"
            )
        if k is not None:
            positive_int("k", k)
        if fraction is not None and not (
            isinstance(fraction, int | float)
            and not isinstance(fraction, bool)
            and 0 < fraction <= 1
        ):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.k = k
        self.fraction = None if fraction is None else float(fraction)

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {"mask-aware": {}}

    def defend_update(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        update: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        # 1. Flatten.
        names = list(update)
        flat = torch.cat([update[n].flatten() for n in names])
        # 2. The k largest magnitudes.
        count = self.k if self.fraction is None else math.ceil(self.fraction * flat.numel())
        kept = keep_largest(flat, 1.0, count=count)
        # 3. Back into tensors.
        pieces = kept.split([update[n].numel() for n in names])
        return {n: piece.view_as(update[n]) for n, piece in zip(names, pieces, strict=True)}
