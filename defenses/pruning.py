"""``pruning``: gradient pruning, the defense DLG found effective (Zhu, Liu, Han, NeurIPS 2019,
Sec. 5, "gradient compression"; the sparsification of Lin et al., "Deep Gradient Compression",
ICLR 2018).

Threat model: the client shares a sparsified update; the server sees only the kept entries.

Keep the k entries of largest magnitude and zero the rest, with k = ⌈f · n⌉ for
``keep_fraction`` f ∈ (0, 1]:

* ``scope: layer`` (default): per parameter tensor, n = its number of entries;
* ``scope: global``: over the whole update, n = the total number of entries.

Ties in magnitude at the cut are broken by ``torch.topk``, so exactly k entries are kept.

Adaptive attack: ``mask-aware`` (the kept positions are visible; the attack matches only them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.interfaces import Defense
from leakbench.registry import register_defense

SCOPES = ("layer", "global")


def keep_largest(values: Tensor, keep_fraction: float, count: int | None = None) -> Tensor:
    """``values`` with all but its ⌈keep_fraction · n⌉ (or ``count``) largest-magnitude entries
    set to zero."""
    flat = values.flatten()
    kept_count = math.ceil(keep_fraction * flat.numel()) if count is None else count
    kept = torch.topk(flat.abs(), min(kept_count, flat.numel())).indices
    pruned = torch.zeros_like(flat)
    pruned[kept] = flat[kept]
    return pruned.view_as(values)


@register_defense("pruning")
class PruningDefense(Defense):
    def __init__(self, keep_fraction: float, scope: str = "layer") -> None:
        super().__init__(keep_fraction=keep_fraction, scope=scope)
        if (
            not isinstance(keep_fraction, int | float)
            or isinstance(keep_fraction, bool)
            or not 0 < keep_fraction <= 1
        ):
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
        if scope not in SCOPES:
            raise ValueError(f"unknown pruning scope {scope!r}; valid: {', '.join(SCOPES)}")
        self.keep_fraction = float(keep_fraction)
        self.scope = scope

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
        if self.scope == "layer":
            return {name: keep_largest(g, self.keep_fraction) for name, g in update.items()}
        names = list(update)
        flat = keep_largest(torch.cat([update[n].flatten() for n in names]), self.keep_fraction)
        pieces = flat.split([update[n].numel() for n in names])
        return {n: piece.view_as(update[n]) for n, piece in zip(names, pieces, strict=True)}
