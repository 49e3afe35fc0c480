"""``none``: no defense. The client shares its update x ↦ ∇θ ℓ unchanged: the baseline every
defended run is compared with. Threat model: whatever the attack assumes; nothing is hidden."""

from __future__ import annotations

from leakbench.interfaces import Defense
from leakbench.registry import register_defense


@register_defense("none")
class NoDefense(Defense):
    """The identity on batch, model and update."""
