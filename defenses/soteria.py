"""``soteria``: pruning of the representation's most reconstructable features.

Sun, Li, Chen, Rong, Dou, Ding, "Soteria: Provable Defense Against Privacy Leakage in Federated
Learning From Representation Perspective", CVPR 2021. Threat model: the client knows its batch
and model and shares an update whose defended layer carries a perturbed representation; the
server (honest-but-curious, running a gradient-inversion attack) sees only that update.

The defended layer. The paper perturbs the *data representation*: the output of the feature
extractor, i.e. the input r of the fully connected layer that follows it. In the paper's victims
(LeNet, ConvNet) that is the classifier, the last fully connected layer, and its weight gradient
is the one pruned (the authors' code masks the second to last gradient tensor, the weight of the
last ``nn.Linear``). So the default here is the last ``nn.Linear`` of the model; ``layer`` names
another one.

Math. Let r = r(x) ∈ R^d be the representation, the input of the defended fully connected layer
W (d inputs). Its weight gradient is ∂ℓ/∂W = Σ_b δ_b r_bᵀ / B, so column i carries feature i
of every sample. Soteria perturbs r into r' so that the input x' reconstructed from r' is far
from x while ‖r − r'‖ stays small; to first order, removing feature i moves the reconstruction
by about |r_i| / ‖∂r_i/∂x‖, so the features with the largest ratio ‖r_i‖ / ‖∂r_i/∂x‖ are pruned
(Sun et al., Sec. 4). For a batch, the score of feature i sums the inverse ratio over the
samples, as the authors' code does:

    s_i = Σ_b ‖∂r_{b,i}/∂x_b‖₂ / |r_{b,i}|,

(a term 0/0 counts 0, a term c/0 with c > 0 counts +∞), and the k = ⌊f · d⌋ features of smallest
s_i (largest ratio) are pruned, for f = ``prune_fraction``; ties go to the lower index. Pruning
feature i zeroes column i of the defended layer's weight gradient; the layer's bias gradient
and all other layers are left unchanged, as in the authors' implementation.

The gradient ∂r_{b,i}/∂x_b is the gradient of Σ_b r_{b,i} with respect to the batch, read at
sample b; it is exact when samples do not interact in the forward pass (every model in eval
mode, and every model without BatchNorm in train mode).

What it leaves open (the adaptive attacks of :meth:`SoteriaDefense.adaptive_attacks`): every
layer but the defended one is shared unchanged, and the pruned columns are visibly zero.
Balunović, Dimitrov, Jovanović, Vechev ("Bayesian Framework for Gradient Leakage", ICLR 2022)
break Soteria by leaving the defended layer out of the gradient-matching objective
(``soteria-skip``); matching only the entries the client kept (``mask-aware``) uses the kept
columns too. On a fully connected victim with a first-layer bias the generic bias attack reads
the input off the untouched first layer.

Steps, as :meth:`SoteriaDefense.apply` runs them:

1. find the defended layer (``layer`` by module name, default the last ``nn.Linear`` in module
   order) and check that its weight is in the update;
2. the client's update through the client protocol (``compute_update``);
3. the representation r: the defended layer's input on the client's batch, read by a forward
   hook, in the model's own mode;
4. ‖∂r_{b,i}/∂x_b‖ for every sample and feature, by batched backward passes (features in chunks
   to bound memory), and the scores s_i in float64;
5. the k features of smallest score, and their columns of the layer's weight gradient set to 0;
6. the report: the layer, d, k, the pruned features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.interfaces import ClientShare, Defense, UpdateFn
from leakbench.registry import register_defense

# Entries of one chunk of the batched Jacobian (features × batch × input): bounds memory.
CHUNK_ENTRIES = 2**20


def defended_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    """The named ``nn.Linear`` (default: the last one in module order, whose input is the
    representation)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layer is None:
        if not linears:
            raise ValueError("soteria needs a model with an nn.Linear layer, found none")
        return linears[-1]
    for name, module in linears:
        if name == layer:
            return name, module
    valid = ", ".join(repr(n) for n, _ in linears) or "none"
    raise ValueError(f"layer {layer!r} is not an nn.Linear of the model; valid: {valid}")


def representation_scores(
    model: nn.Module, layer: nn.Linear, images: Tensor
) -> tuple[Tensor, Tensor]:
    """(r, s): the layer's input r (B, d) on ``images`` and the scores s_i (d,) in float64."""
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    x = images.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            model(x)
    finally:
        handle.remove()
    r = captured[0]
    if r.dim() != 2:
        raise ValueError(
            f"soteria needs the defended layer's input to be (batch, features), got "
            f"{tuple(r.shape)}"
        )
    batch, features = r.shape
    chunk = max(1, CHUNK_ENTRIES // max(1, x.numel()))
    gradient_norms = torch.empty(batch, features, dtype=torch.float64, device=r.device)
    for start in range(0, features, chunk):
        stop = min(features, start + chunk)
        # One backward per feature i, batched: the output gradient is 1 at (every b, i).
        selectors = torch.zeros(stop - start, batch, features, dtype=r.dtype, device=r.device)
        selectors[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
        (jacobian,) = torch.autograd.grad(
            r, x, grad_outputs=selectors, is_grads_batched=True, retain_graph=True
        )
        gradient_norms[:, start:stop] = jacobian.double().flatten(2).norm(dim=2).T
    magnitudes = r.detach().double().abs()
    ratios = torch.where(
        magnitudes > 0,
        gradient_norms / magnitudes.clamp_min(torch.finfo(torch.float64).tiny),
        torch.where(gradient_norms > 0, math.inf, 0.0),
    )
    return r.detach(), ratios.sum(dim=0)


@register_defense("soteria")
class SoteriaDefense(Defense):
    def __init__(self, prune_fraction: float = 0.5, layer: str | None = None) -> None:
        super().__init__(prune_fraction=prune_fraction, layer=layer)
        if not (
            isinstance(prune_fraction, int | float)
            and not isinstance(prune_fraction, bool)
            and 0 <= prune_fraction <= 1
        ):
            raise ValueError(f"prune_fraction must be in [0, 1], got {prune_fraction!r}")
        if layer is not None and not (isinstance(layer, str) and layer):
            raise ValueError(f"layer must be a module name or None, got {layer!r}")
        self.prune_fraction = float(prune_fraction)
        self.layer = layer

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {"soteria-skip": {"layer": self.layer}, "mask-aware": {}}

    def apply(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        compute_update: UpdateFn,
    ) -> ClientShare:
        # 1. The defended layer, checked before anything is computed.
        name, layer = defended_layer(model, self.layer)
        key = f"{name}.weight"
        if not layer.weight.requires_grad:
            raise ValueError(f"layer {name!r} has a frozen weight; soteria defends a trained one")
        # 2. The client's own update.
        update = dict(compute_update(model, images, labels))
        if key not in update:
            raise ValueError(f"the update has no {key!r}; soteria needs the layer's weight")
        # 3-4. Representation and scores.
        _, scores = representation_scores(model, layer, images)
        features = scores.numel()
        count = math.floor(self.prune_fraction * features)
        # 5. The `count` smallest scores (stable: ties go to the lower index), columns zeroed.
        pruned = torch.sort(scores.cpu(), stable=True).indices[:count].sort().values
        weight = update[key].clone()
        weight[:, pruned.to(weight.device)] = 0
        update[key] = weight
        # 6. The report.
        info: dict[str, Any] = {
            "layer": name,
            "features": features,
            "pruned": count,
            "pruned_fraction": count / features,
            "pruned_features": pruned.tolist(),
        }
        return ClientShare(images=images, labels=labels, update=update, info=info)
