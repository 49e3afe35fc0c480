"""``noise``: norm clipping of the whole update followed by additive noise.

The Gaussian mechanism of differential privacy applied once to the shared update (Abadi et al.,
"Deep Learning with Differential Privacy", CCS 2016, without per-sample clipping or accounting),
and the noise defense DLG evaluates (Zhu, Liu, Han, NeurIPS 2019, Sec. 5: Gaussian and Laplacian
noise). Threat model: the client perturbs its update before sharing it; the server sees only
the perturbed update.

For the update g = (g_1, ..., g_L) of all L parameter tensors:

1. clipping (``clip_norm`` C, or ``None`` for none): g ← g · min(1, C / ‖g‖₂), with
   ‖g‖₂ = sqrt(Σ_l ‖g_l‖²) the norm of the whole update;
2. noise (``scale`` s ≥ 0): g_l ← g_l + s · n_l with n_l i.i.d. per entry, either standard
   normal (``distribution: gaussian``, std s) or standard Laplace with density ½ e^{−|n|}
   (``distribution: laplace``, scale parameter s, std √2 s), drawn as the difference of two
   Exp(1) variables −log(1 − u), u ~ U[0, 1).

Noise is drawn from the passed generator, tensor by tensor in the update's order, in each
tensor's dtype, on the generator's device, then moved to the tensor's device.

Adaptive attack (Kerckhoffs: s, the distribution and C are public): ``noise-aware``, whose
likelihood models the clipping and the noise of known scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.interfaces import Defense
from leakbench.registry import register_defense

DISTRIBUTIONS = ("gaussian", "laplace")


def _standard_noise(distribution: str, like: Tensor, generator: torch.Generator) -> Tensor:
    """Unit-scale noise shaped like ``like``, drawn from ``generator``."""
    options = {"generator": generator, "dtype": like.dtype, "device": generator.device}
    if distribution == "gaussian":
        noise = torch.randn(like.shape, **options)
    else:
        first = -torch.log1p(-torch.rand(like.shape, **options))
        noise = first + torch.log1p(-torch.rand(like.shape, **options))
    return noise.to(like.device)


@register_defense("noise")
class NoiseDefense(Defense):
    def __init__(
        self, scale: float, distribution: str = "gaussian", clip_norm: float | None = None
    ) -> None:
        super().__init__(scale=scale, distribution=distribution, clip_norm=clip_norm)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown noise distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
            )
        if not _is_real(scale) or not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"noise scale must be a finite number >= 0, got {scale!r}")
        if clip_norm is not None and not (
            _is_real(clip_norm) and math.isfinite(clip_norm) and clip_norm > 0
        ):
            raise ValueError(f"clip_norm must be a finite number > 0 or None, got {clip_norm!r}")
        self.scale = float(scale)
        self.distribution = distribution
        self.clip_norm = None if clip_norm is None else float(clip_norm)

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {
            "noise-aware": {
                "mechanism": "update",
                "noise_std": self.scale,
                "distribution": self.distribution,
                "clip_norm": self.clip_norm,
            }
        }

    def defend_update(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        update: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        result = dict(update)
        if self.clip_norm is not None:
            norm = torch.sqrt(sum(g.double().pow(2).sum().cpu() for g in result.values()))
            factor = min(1.0, self.clip_norm / norm.item()) if norm > 0 else 1.0
            result = {name: g * factor for name, g in result.items()}
        if self.scale > 0:
            result = {
                name: g + self.scale * _standard_noise(self.distribution, g, generator)
                for name, g in result.items()
            }
        return result


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
