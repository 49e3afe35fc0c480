"""``precode``: the client trains its PRECODE victim with a sampled variational bottleneck.

Scheliga, Mäder, Seeland, "PRECODE - A Generic Model Extension to Prevent Deep Gradient
Leakage", WACV 2022. Threat model: the victim carries PRECODE's variational bottleneck (model
``precode``, :mod:`leakbench.models.precode`; the server knows the architecture and weights);
the client draws the bottleneck's noise ε from its own randomness in every forward pass of its
round and shares the gradient of

    ℓ = (1/B) Σ_b CE(f_ε(x_b), y_b) + β · (1/B) Σ_b KL(N(μ_b, σ_b²) ‖ N(0, I)),
    KL = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1),

where f_ε is the network with z = μ + σ ⊙ ε in the bottleneck. The server never sees ε, so an
attack that replays the client's computation does not know the code its gradient came from.

What it leaves open: the layers before the bottleneck are shared unchanged in form. At one
sample, a first ``nn.Linear`` with a bias still has the rank-one gradient δ xᵀ, whatever ε was,
so the generic bias attack reads the input off it (the defense is measured with every generic
attack on a defense track; no attack specific to PRECODE is registered).

``compute_update`` (the client protocol) is not used: the loss adds the KL term, so the update
is this defense's own FedSGD gradient (FedSGD and sums of FedSGD clients only).

Steps, as :meth:`PrecodeDefense.apply` runs them:

1. find the model's variational bottleneck (refused without one);
2. the bottleneck's noise source set to the trial's generator for this round only;
3. one forward pass: the logits (ε drawn per sample) and, from a hook on the encoder, μ and
   log σ²; the loss above; its gradient over every trainable parameter;
4. the noise source removed (the client's model is left as it was);
5. the report: β, the latent size, the KL term and the cross-entropy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from leakbench.interfaces import ClientShare, Defense, UpdateFn
from leakbench.models.precode import VariationalBottleneck
from leakbench.registry import register_defense


def bottleneck_of(model: nn.Module) -> VariationalBottleneck:
    """The model's one variational bottleneck; ValueError without one."""
    found = [m for m in model.modules() if isinstance(m, VariationalBottleneck)]
    if len(found) != 1:
        raise ValueError(
            f"precode needs a victim with one variational bottleneck (model 'precode', e.g. "
            f"model_options {{base: fcn}}), found {len(found)}"
        )
    return found[0]


@register_defense("precode")
class PrecodeDefense(Defense):
    client_protocols = frozenset({"fedsgd", "aggregate"})

    def __init__(self, beta: float = 1e-3) -> None:
        super().__init__(beta=beta)
        if (
            not (
                isinstance(beta, int | float) and not isinstance(beta, bool) and math.isfinite(beta)
            )
            or beta < 0
        ):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.beta = float(beta)

    def check_model(self, model: nn.Module) -> None:
        bottleneck_of(model)

    def apply(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        compute_update: UpdateFn,
    ) -> ClientShare:
        # 1. The bottleneck.
        bottleneck = bottleneck_of(model)
        captured: list[Tensor] = []
        hook = bottleneck.encoder.register_forward_hook(
            lambda module, args, output: captured.append(output)
        )
        # 2. The client's secret draws, for this round only.
        bottleneck.noise_source = generator
        parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        try:
            # 3. Forward with sampled codes, the loss and its gradient.
            with torch.enable_grad():
                logits = model(images)
                mean, log_variance = captured[0].chunk(2, dim=-1)
                divergence = 0.5 * (mean**2 + log_variance.exp() - log_variance - 1).sum(-1).mean()
                cross_entropy = F.cross_entropy(logits, labels)
                grads = torch.autograd.grad(
                    cross_entropy + self.beta * divergence, [p for _, p in parameters]
                )
        finally:
            # 4. The client's model as it was.
            bottleneck.noise_source = None
            hook.remove()
        update = {name: g.detach() for (name, _), g in zip(parameters, grads, strict=True)}
        # 5. The report.
        info: dict[str, Any] = {
            "beta": self.beta,
            "latent": bottleneck.latent,
            "kl": float(divergence.detach()),
            "cross_entropy": float(cross_entropy.detach()),
        }
        return ClientShare(images=images, labels=labels, update=update, info=info)
