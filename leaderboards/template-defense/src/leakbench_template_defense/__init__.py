"""``template-relative-noise``: a third-party leakbench defense, as a template to copy.

Per-tensor clipping and Gaussian noise relative to each tensor's norm: the client shares, for
every parameter tensor g_l of its update,

1. g_l ← g_l · min(1, C / ‖g_l‖₂) (``clip_norm`` C; per tensor, so no layer dominates), then
2. g_l ← g_l + (σ · ‖g_l‖₂ / √n_l) · n_l, n_l ~ N(0, I) of the tensor's n_l entries, drawn from
   the client's generator (``relative_scale`` σ: the noise's RMS is σ times the tensor's).

Threat model: the server sees only the shared update; σ and C are public (Kerckhoffs), the
client's randomness is not. No privacy guarantee is claimed: the defense track measures it
against the board's generic attacks and, had the literature an attack adapted to it, against
that one (name it in ``adaptive_attacks``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.interfaces import Defense


class TemplateRelativeNoise(Defense):
    def __init__(self, relative_scale: float = 0.1, clip_norm: float = 1.0) -> None:
        # Hyperparameters go to the base class: they are recorded with every entry.
        super().__init__(relative_scale=relative_scale, clip_norm=clip_norm)
        if not (math.isfinite(relative_scale) and relative_scale >= 0):
            raise ValueError(f"relative_scale must be finite and >= 0, got {relative_scale!r}")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
        self.relative_scale, self.clip_norm = float(relative_scale), float(clip_norm)

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        # The registered attacks the literature uses against this defense, each with the options
        # that tell it the defense's public configuration; the defense track runs them too.
        return {}

    def defend_update(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        update: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        shared = {}
        for name, tensor in update.items():  # in the update's order: the draws are seeded
            norm = float(tensor.norm())
            clipped = tensor * min(1.0, self.clip_norm / norm) if norm > 0 else tensor
            rms = float(clipped.norm()) / math.sqrt(max(clipped.numel(), 1))
            noise = torch.randn(
                clipped.shape, generator=generator, dtype=clipped.dtype, device=generator.device
            )
            shared[name] = clipped + self.relative_scale * rms * noise.to(clipped.device)
        return shared
