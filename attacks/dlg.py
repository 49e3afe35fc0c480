"""``dlg``: Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

Paper: L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019.

Threat model: an honest-but-curious server that knows the architecture and the current
parameters θ, observes one FedSGD update ∇θ = ∇θ (1/B) Σ_b CE(f_θ(x_b), y_b) and knows the batch
size B (``Capability.BATCH_SIZE``: it sizes the dummies). The labels are unknown and optimised
jointly with the images.

Method: draw dummy images x' ~ N(0, 1) of shape (B, C, H, W) and dummy label logits y' ~ N(0, 1)
of shape (B, K) from the trial seed, in this order, and minimise the gradient distance

    D(x', y') = Σ_layers ‖∇θ ℓ(x', softmax(y')) − ∇θ‖²,
    ℓ(x', p) = (1/B) Σ_b −Σ_c p_bc log softmax(f_θ(x'_b))_c,

with L-BFGS over (x', y'). The images are the final x' (model-input space); the labels are
argmax_c y'_bc. A non-finite loss ends the trial with :class:`TrialFailure`.

Hyperparameters:

* ``iterations`` (300, as in the paper's code): L-BFGS steps, each drawn from the trial budget.
  One step evaluates the objective up to ``max_iter`` times.
* ``lr`` (1.0): L-BFGS step length, as in the paper's code.
* ``history_size`` (100, PyTorch's default): curvature pairs L-BFGS keeps.
* ``max_iter`` (20, PyTorch's default, used by the paper's code): objective evaluations per step.
* ``line_search`` (``None``, as in the paper's code, or ``"strong_wolfe"``): L-BFGS line search.
  Without one, a step of length ``lr`` can overshoot and L-BFGS can stall at a worse point than
  its start; the strong-Wolfe search avoids that at the price of extra evaluations.

Client protocols: all, the update read through :func:`leakbench.client.fedsgd_equivalent` as
the FedSGD gradient of every sample behind it. That is exact for FedSGD, for one full-batch
FedAvg step and for a sum of K FedSGD clients when the local hyperparameters
(``Capability.LOCAL_HYPERPARAMETERS``) give η and K (the dummies then number K·B, the granted
batch size); after several local steps −Δ/(ηE) is only the mean of gradients taken at moving
weights, an approximation; and without the hyperparameters the scale of the target is off, which
the L2 distance does not forgive.

The model is used in the mode the client trained it in; the attack never changes it.

Speed: the distance is taken on the layers concatenated into one vector, and tiny victims run
their convolutions without oneDNN (:mod:`leakbench.attacks._gradient_matching`). The profile
of one L-BFGS step on LeNet-Zhu: about half is the double backward of the objective's
evaluations, a quarter PyTorch's L-BFGS itself (its two-loop recursion over up to
``history_size`` curvature pairs, two small vector operations per pair and evaluation).
``info["evaluations"]`` counts the objective's evaluations (at most ``max_iter`` per step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from leakbench.attacks._gradient_matching import (
    dummy_gradients,
    flat,
    gaussian_dummy,
    granted_batch_size,
    seeded_generator,
    tuned_convolutions,
)
from leakbench.client import EVERY_PROTOCOL, fedsgd_equivalent
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction

LINE_SEARCHES = (None, "strong_wolfe")


def l2_gradient_distance(dummy: list[Tensor], target: Tensor) -> Tensor:
    """DLG's objective Σ_layers ‖∇θ' − ∇θ‖², the target given as one vector (:func:`flat`)."""
    return ((flat(dummy) - target) ** 2).sum()


@register_attack("dlg")
class DLG(Attack):
    requires = frozenset({Capability.BATCH_SIZE})
    # SoK letter: A, as the SoK gives DLG (and iDLG): labels are optimised or inferred.
    threat_letter = "A"
    client_protocols = EVERY_PROTOCOL
    threat_model = (
        "honest-but-curious server observing one FedSGD update; knows the architecture, the "
        "parameters and the batch size; labels unknown (optimised jointly)"
    )

    def __init__(
        self,
        iterations: int = 300,
        lr: float = 1.0,
        history_size: int = 100,
        max_iter: int = 20,
        line_search: str | None = None,
    ) -> None:
        super().__init__(
            iterations=iterations,
            lr=lr,
            history_size=history_size,
            max_iter=max_iter,
            line_search=line_search,
        )
        self.iterations = positive_int("iterations", iterations)
        self.history_size = positive_int("history_size", history_size)
        self.max_iter = positive_int("max_iter", max_iter)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.lr = float(lr)
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"line_search must be one of {LINE_SEARCHES}, got {line_search!r}")
        self.line_search = line_search

    def reconstruct(self, observation: Observation) -> Reconstruction:
        observation = fedsgd_equivalent(observation)
        batch_size = granted_batch_size(observation, "DLG")
        target = [g.detach() for g in observation.gradients()]
        generator = seeded_generator(observation)
        images = gaussian_dummy((batch_size, *observation.input_shape), generator, like=target[0])
        label_logits = gaussian_dummy((batch_size, observation.num_classes), generator, target[0])
        info = self._match_gradients(observation, target, images, label_logits=label_logits)
        labels = label_logits.detach().argmax(dim=1)
        return Reconstruction(images=images.detach(), labels=labels, info=info)

    def _match_gradients(
        self,
        observation: Observation,
        target: list[Tensor],
        images: Tensor,
        *,
        label_logits: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Any]:
        """Minimise the L2 gradient distance over ``images`` (and ``label_logits`` if given).

        Exactly one of ``label_logits`` (soft labels, optimised) and ``labels`` (fixed class
        indices) is given. Returns the diagnostics recorded with the trial.
        """
        variables = [images] if label_logits is None else [images, label_logits]
        target_flat = flat(target)

        def matching_loss() -> Tensor:
            targets = labels if label_logits is None else label_logits.softmax(dim=1)
            return l2_gradient_distance(dummy_gradients(observation, images, targets), target_flat)

        steps = evaluations = 0

        def closure() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            loss = matching_loss()
            if not torch.isfinite(loss):
                raise TrialFailure(
                    f"the gradient-matching loss became {loss.item()} in L-BFGS step {steps + 1}"
                )
            for variable, grad in zip(variables, torch.autograd.grad(loss, variables), strict=True):
                variable.grad = grad
            return loss

        with tuned_convolutions(observation.model), torch.enable_grad():
            initial_loss = matching_loss().item()
            optimizer = torch.optim.LBFGS(
                variables,
                lr=self.lr,
                history_size=self.history_size,
                max_iter=self.max_iter,
                line_search_fn=self.line_search,
            )
            for _ in observation.budget.iterations(self.iterations):
                optimizer.step(closure)
                steps += 1
            final_loss = matching_loss().item()
        if not math.isfinite(final_loss):
            raise TrialFailure(
                f"the gradient-matching loss became {final_loss} after the last step"
            )
        for variable in variables:
            variable.grad = None
        return {
            "initial_loss": initial_loss,
            "final_loss": final_loss,
            "steps": steps,
            "evaluations": evaluations,
        }
