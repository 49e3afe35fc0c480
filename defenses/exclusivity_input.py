"""``exclusivity-reduction-input``: input-side exclusivity reduction under an L∞ budget.

OUR INTERPRETATION, not the paper's defense. Pan et al. (USENIX Security 2022, "Exploring the
Security Boundary of Data Reconstruction via Neuron Exclusivity Analysis") devise an
"exclusivity reduction strategy to enlarge the secure boundary", but its mechanics could not be
found in the paper's text. This module is the first of our three variants (input
perturbation, gradient suppression, batch mixing): the client perturbs its samples, within
‖x'_m − x_m‖∞ ≤ ε, so that the units active for only one sample (ExANs) become inactive or
shared; the mirror image of the fishing attack's LP (:mod:`leakbench.attacks.fishing`).

Threat model: the client knows its batch and the model it trains (it computes the update with
it); the server attacks the update of the perturbed batch. The perturbation is what the client
trains on, so it also costs utility.

Method (projected sign-gradient descent, deterministic). With pre-activations a_m^l of every
ReLU layer l for the perturbed batch, sample m's slack in layer l is its ExAN count minus what
the exclusivity condition requires (2 in the last ReLU layer, 1 elsewhere); its *weakest* layer
is the one of least slack, where removing ExANs breaks the condition soonest. For every ExAN j
of sample m in m's weakest layer, with t_1 ≥ t_2 the two largest pre-activations of unit j over
the batch, the surrogate

    φ_j = min( relu(t_1 + margin), relu(margin − t_2) )

is zero once the unit is inactive for everyone (t_1 ≤ −margin) or active for two samples
(t_2 ≥ margin); for one sample, t_2 = −∞ and φ_j = relu(t_1 + margin). Each of ``steps`` steps
sets δ ← clip(δ − ``step_size`` · sign(∇_δ Σ φ), −ε, ε); the weakest layers are re-chosen at
every step. The answer is the iterate with the fewest samples meeting the condition, then the
fewest ExANs (δ = 0 included, so the defense never increases exclusivity as counted here).

The budget ``epsilon`` is in model-input (normalised) units, without a pixel-box constraint.

Needs the victim model: the harness must call ``transform_model`` before ``transform_batch``
for every trial (the model reference is used once and dropped).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from leakbench.analysis.exclusivity import (
    MIN_EXANS_LAST_LAYER,
    MIN_EXANS_OTHER_LAYERS,
    buffers_restored,
    condition_per_sample,
    exan_mask,
)
from leakbench.interfaces import Defense
from leakbench.registry import register_defense


def relu_inputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Differentiable inputs (B, units) of every ReLU call of ``model`` on ``images``."""
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: Any) -> None:
        # A clone: an in-place ReLU would otherwise overwrite the tensor autograd needs.
        captured.append(inputs[0].clone().flatten(1))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def exclusivity_surrogate(pre_activations: list[Tensor], margin: float) -> tuple[Tensor, Tensor]:
    """Σ φ over the ExANs of every sample's weakest layer, and the ExAN counts (B, L)."""
    exans = [exan_mask(pre.detach() > 0) for pre in pre_activations]
    counts = torch.stack([mask.sum(dim=1) for mask in exans], dim=1)
    required = torch.full((counts.shape[1],), MIN_EXANS_OTHER_LAYERS, dtype=counts.dtype)
    required[-1] = MIN_EXANS_LAST_LAYER
    weakest = (counts - required).argmin(dim=1)
    loss = pre_activations[0].new_zeros(())
    for layer, (pre, mask) in enumerate(zip(pre_activations, exans, strict=True)):
        targeted = mask & (weakest == layer)[:, None]
        units = targeted.any(dim=0)
        if not bool(units.any()):
            continue
        if pre.shape[0] > 1:
            top = pre[:, units].topk(2, dim=0).values
            penalty = torch.minimum((top[0] + margin).relu(), (margin - top[1]).relu())
        else:
            penalty = (pre[0, units] + margin).relu()
        loss = loss + penalty.sum()
    return loss, counts


def reduce_exclusivity(
    model: nn.Module, images: Tensor, epsilon: float, steps: int, step_size: float, margin: float
) -> Tensor:
    """The perturbed batch (see the module docstring); ``model`` is left unchanged."""
    delta = torch.zeros_like(images, requires_grad=True)
    best: tuple[int, int, Tensor] | None = None
    with torch.enable_grad(), buffers_restored(model):
        for step in range(steps + 1):
            pre_activations = relu_inputs(model, images + delta)
            loss, counts = exclusivity_surrogate(pre_activations, margin)
            score = (int(condition_per_sample(counts).sum()), int(counts.sum()))
            if best is None or score < best[:2]:
                best = (*score, delta.detach().clone())
            if step == steps or not loss.requires_grad:
                break
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= step_size * grad.sign()
                delta.clamp_(-epsilon, epsilon)
    assert best is not None
    return (images + best[2]).detach()


@register_defense("exclusivity-reduction-input")
class InputExclusivityReduction(Defense):
    def __init__(
        self,
        epsilon: float = 0.1,
        steps: int = 40,
        step_size: float | None = None,
        margin: float = 1e-3,
    ) -> None:
        super().__init__(epsilon=epsilon, steps=steps, step_size=step_size, margin=margin)
        if not (isinstance(epsilon, int | float) and epsilon >= 0):
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 or None, got {step_size!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.epsilon = float(epsilon)
        self.steps = steps
        self.step_size = float(step_size) if step_size is not None else self.epsilon / 10
        self.margin = float(margin)

    def defend_batch(
        self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        if self.epsilon == 0 or self.steps == 0:
            return images, labels
        perturbed = reduce_exclusivity(
            model, images, self.epsilon, self.steps, self.step_size, self.margin
        )
        return perturbed, labels
