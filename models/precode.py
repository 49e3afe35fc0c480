"""``precode``: a zoo victim extended with PRECODE's variational bottleneck.

Scheliga, Mäder, Seeland, "PRECODE - A Generic Model Extension to Prevent Deep Gradient
Leakage", WACV 2022. PRECODE inserts a variational bottleneck (VB) between a network's feature
extractor and its output layer: the representation h is encoded into the mean μ and the log
variance log σ² of a latent code, a code z = μ + σ ⊙ ε with ε ~ N(0, I) is sampled, and the
decoder maps it back to the representation's size before the output layer:

    [μ, log σ²] = E h,    z = μ + exp(½ log σ²) ⊙ ε,    h' = D z,    logits = W h' + b.

The sampling is what the defense rests on: ε is drawn by the client and never shared, so the
gradient of every layer depends on a draw the server does not know. It is drawn only while
the ``precode`` defense runs the client's round (:mod:`leakbench.defenses.precode`, which
also adds the VB's KL term to the loss); otherwise, at inference and in the server's copy of
the model, the bottleneck passes the mean, z = μ.

``base`` names a registered victim that is an ``nn.Sequential`` ending in its ``nn.Linear``
output layer (``fcn``, ``lenet-zhu``, ...); ``latent`` is the code's size (default: the
representation's size, as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.registry import MODELS, register_model


class VariationalBottleneck(nn.Module):
    """E: features → 2·latent (μ, log σ²), D: latent → features; samples only with a source."""

    def __init__(self, features: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, 2 * latent)
        self.decoder = nn.Linear(latent, features)
        self.latent = latent
        # Set by the precode defense for the client's round only: the client's secret draws.
        self.noise_source: torch.Generator | None = None

    def statistics(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of the code of each sample."""
        mean, log_variance = self.encoder(features).chunk(2, dim=-1)
        return mean, log_variance

    def forward(self, features: Tensor) -> Tensor:
        mean, log_variance = self.statistics(features)
        if self.noise_source is None:
            return self.decoder(mean)
        noise = torch.randn(
            mean.shape,
            generator=self.noise_source,
            dtype=mean.dtype,
            device=self.noise_source.device,
        ).to(mean.device)
        return self.decoder(mean + torch.exp(0.5 * log_variance) * noise)


@register_model("precode")
def precode(
    input_shape: tuple[int, ...],
    num_classes: int,
    base: str = "fcn",
    base_options: Mapping[str, Any] | None = None,
    latent: int | None = None,
) -> nn.Sequential:
    if base == "precode":
        raise ValueError("precode's base must be another victim, got 'precode'")
    network = MODELS.get(base)(tuple(input_shape), num_classes, **dict(base_options or {}))
    children = list(network.children()) if isinstance(network, nn.Sequential) else []
    if not children or not isinstance(children[-1], nn.Linear):
        raise ValueError(
            f"precode needs a base that is an nn.Sequential ending in its nn.Linear output "
            f"layer; {base!r} is not"
        )
    output = children[-1]
    width = output.in_features
    if latent is not None and (
        isinstance(latent, bool) or not isinstance(latent, int) or latent < 1
    ):
        raise ValueError(f"latent must be a positive integer, got {latent!r}")
    bottleneck = VariationalBottleneck(width, latent or width)
    return nn.Sequential(*children[:-1], bottleneck, output)
