"""``inverting-gradients``: Inverting Gradients (Geiping et al., NeurIPS 2020).

Paper: J. Geiping, H. Bauermeister, H. Dröge, M. Moeller, "Inverting Gradients — How easy is it to
break privacy in federated learning?", NeurIPS 2020.

Threat model: an honest-but-curious server that knows the architecture and the parameters,
observes one FedSGD update and knows the batch size (``Capability.BATCH_SIZE``). Labels are used
when the run grants them (``Capability.LABELS``); otherwise they are inferred from the update
(below).

Objective, over dummy images x' (model-input space) with labels y fixed:

    L(x') = 1 − ⟨∇θ ℓ(x', y), ∇θ⟩ / (‖∇θ ℓ(x', y)‖ ‖∇θ‖) + α · TV(x'),

the cosine distance between the gradients of all layers concatenated, plus the anisotropic total
variation TV(x) = mean |x[..., :, j+1] − x[..., :, j]| + mean |x[..., i+1, :] − x[..., i, :]|.

Optimisation, as in the paper's code: x' ~ N(0, 1) from the trial seed; Adam on the *signed*
gradient sign(∂L/∂x'); the learning rate drops by 10× at 3/8, 5/8 and 7/8 of the planned
iterations (MultiStepLR); after the initial draw and after every step x' is clamped to the box of
valid inputs [(0 − mean_c)/std_c, (1 − mean_c)/std_c] per channel c. ``restarts`` independent runs
(successive draws of the same generator) share the trial budget: each plans
min(iterations, budget iterations // restarts) so that its schedule completes within an
iteration budget (a budget of fewer iterations than restarts runs that many restarts, one
iteration each). The answer is the restart with the smallest final cosine gradient distance
(without TV), a quantity the server can compute: never chosen with private data.

Steps, as :meth:`InvertingGradients.reconstruct` runs them:

1. Labels (below), the box, and every restart's draw.
2. Under FedSGD with several restarts (and ``batch_restarts``), all restarts at once: the
   dummies of every restart stacked, each restart's objective gradient from one vectorised
   pass (``torch.func.vmap`` of ``torch.func.grad`` through ``torch.func.functional_call``),
   one Adam step for all (Adam and the clamp act element-wise, so each restart follows its own
   trajectory); the result equals restart-by-restart optimisation up to the rounding of
   batched kernels. Otherwise (one restart, or a FedAvg / aggregate replay, whose client code
   is autograd) one restart after the other.
3. Each restart's final cosine distance, and the choice of the smallest.

Labels (without ``Capability.LABELS``):

* B = 1: iDLG's rule (:func:`leakbench.attacks.idlg.idlg_label`).
* B > 1: needs a bias on the output layer. ∇b = (1/B) Σ_m (softmax(z_m) − e_{y_m}), so
  ∇b_c > 0 for every class absent from the batch, and the negative entries are classes present
  in it. The labels are the classes with negative entries, most negative first, then the most
  negative class repeated until there are B labels (a class that occurs several times in the
  batch has a larger |∇b_c|, so it is the best guess for the duplicates). Without a bias the
  trial fails with :class:`TrialFailure`.

Hyperparameters:

* ``iterations`` (2000): Adam steps per restart, drawn from the trial budget. The paper uses
  up to 24 000 on GPU; 2000 keeps a LeNet-sized trial to seconds on a CPU.
* ``lr`` (0.1), ``tv_weight`` α (1e-4), ``restarts`` (1).
* ``batch_restarts`` (true): restarts in one vectorised pass (step 2); false runs them one
  after the other (the reference the batched result is tested against).

Client protocols (the paper's Sec. 5, "multiple local steps"):

* fedsgd: as above.
* fedavg (needs ``Capability.LOCAL_HYPERPARAMETERS``): the dummy gradient is replaced by the
  simulated local training of the dummies, Δ'(x') = θ_E(x') − θ_0 with the granted local steps or
  epochs, local batch size and learning rate (:meth:`leakbench.client.FedAvg.simulate`: the
  client's own code, kept differentiable), and the cosine distance compares Δ' with the shared
  Δ. Dummy slot i plays the client's i-th sample in its first epoch's order; later epochs'
  reshuffles are secret, so with several epochs of mini-batches the simulation is an
  approximation.
* aggregate of K clients: the granted batch size is K·B; with the hyperparameters the dummies
  are split into K clients of B and their simulated updates summed; without them (FedSGD
  clients only) the gradient of all K·B dummies is matched, exact up to the factor K that the
  cosine ignores.

Labels are inferred from the update read as a gradient
(:func:`leakbench.client.fedsgd_equivalent`, which undoes a FedAvg delta's sign).

The model is used in the mode the client trained it in; the attack never changes it.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F
from torch.optim.adam import adam

from leakbench.attacks._gradient_matching import (
    flat,
    gaussian_dummy,
    granted_batch_size,
    replayed_protocol,
    seeded_generator,
    simulated_update,
    tuned_convolutions,
)
from leakbench.attacks.idlg import idlg_label, output_layer_gradients
from leakbench.client import EVERY_PROTOCOL, ClientProtocol, FedAvg, fedsgd_equivalent
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction

# Fractions of the planned iterations at which the learning rate drops by LR_DECAY.
LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)
LR_DECAY = 0.1
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


def cosine_gradient_distance(dummy: list[Tensor], target: list[Tensor]) -> Tensor:
    """1 − ⟨∇θ', ∇θ⟩ / (‖∇θ'‖ ‖∇θ‖) over all layers concatenated."""
    return flat_cosine_distance(flat(dummy), flat(target))


def flat_cosine_distance(dummy: Tensor, target: Tensor) -> Tensor:
    """:func:`cosine_gradient_distance` of two gradients given as vectors (:func:`flat`)."""
    return 1 - dummy @ target / (dummy.norm() * target.norm())


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute horizontal plus mean absolute vertical neighbour difference."""
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return horizontal + vertical


def bias_gradient_labels(observation: Observation, batch_size: int) -> Tensor:
    """Labels of a batch from the negative entries of the output layer's bias gradient."""
    name, _, bias_grad = output_layer_gradients(observation)
    if bias_grad is None:
        raise TrialFailure(
            f"without granted labels a batch of {batch_size} needs a bias on the output layer "
            f"{name!r} to infer its labels"
        )
    order = torch.argsort(bias_grad.double(), stable=True)
    present = order[: int((bias_grad < 0).sum())]
    if present.numel() == 0:
        raise TrialFailure(f"the bias gradient of {name!r} has no negative entry: no label found")
    duplicates = present[:1].repeat(batch_size - present.numel())
    return torch.cat([present, duplicates])


class SignedAdam:
    """Adam on the sign of the gradient, its learning rate dropping by ``LR_DECAY`` at
    ``LR_MILESTONES`` of ``planned`` steps (as ``MultiStepLR``), for one tensor in place.

    The update is ``torch.optim.adam.adam``, the functional form of ``torch.optim.Adam``,
    called directly: ``Optimizer.step`` asks at every step whether a GPU is there, which with
    Lightning imported (``PYTORCH_NVML_BASED_CUDA_CHECK=1``) loads NVML each time, the largest
    overhead in the profile of a CPU step.
    """

    def __init__(self, variable: Tensor, lr: float, planned: int) -> None:
        self.variable = variable
        self.lr = lr
        self.milestones = sorted(int(planned * f) for f in LR_MILESTONES)
        self.exp_avg = torch.zeros_like(variable)
        self.exp_avg_sq = torch.zeros_like(variable)
        self.count = torch.zeros((), dtype=torch.float32)
        self.steps = 0

    def step(self, grad: Tensor) -> None:
        """One step on ``sign(grad)`` (``grad`` is overwritten)."""
        decays = bisect.bisect_right(self.milestones, self.steps)
        adam(
            [self.variable],
            [grad.sign_()],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [self.count],
            foreach=False,
            amsgrad=False,
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            lr=self.lr * LR_DECAY**decays,
            weight_decay=0.0,
            eps=ADAM_EPS,
            maximize=False,
        )
        self.steps += 1


def _box(observation: Observation, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel bounds of valid model inputs, the images of pixel values 0 and 1."""
    low = observation.to_input_space(torch.zeros(len(observation.mean), 1, 1, dtype=like.dtype))
    high = observation.to_input_space(torch.ones(len(observation.mean), 1, 1, dtype=like.dtype))
    return low.to(like.device), high.to(like.device)


@register_attack("inverting-gradients")
class InvertingGradients(Attack):
    requires = frozenset({Capability.BATCH_SIZE})
    # SoK letter: B, as the SoK gives Inverting Gradients (C under FedAvg: local hyperparameters).
    threat_letter = "B"
    client_protocols = EVERY_PROTOCOL
    protocol_requires = {FedAvg.name: frozenset({Capability.LOCAL_HYPERPARAMETERS})}
    threat_model = (
        "honest-but-curious server observing one FedSGD update; knows the architecture, the "
        "parameters and the batch size; uses labels if granted, else infers them"
    )

    def __init__(
        self,
        iterations: int = 2000,
        lr: float = 0.1,
        tv_weight: float = 1e-4,
        restarts: int = 1,
        batch_restarts: bool = True,
    ) -> None:
        super().__init__(
            iterations=iterations,
            lr=lr,
            tv_weight=tv_weight,
            restarts=restarts,
            batch_restarts=batch_restarts,
        )
        positive_int("iterations", iterations)
        positive_int("restarts", restarts)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not tv_weight >= 0:
            raise ValueError(f"tv_weight must be non-negative, got {tv_weight!r}")
        if not isinstance(batch_restarts, bool):
            raise ValueError(f"batch_restarts must be true or false, got {batch_restarts!r}")
        self.iterations = iterations
        self.lr = float(lr)
        self.tv_weight = float(tv_weight)
        self.restarts = restarts
        self.batch_restarts = batch_restarts

    def reconstruct(self, observation: Observation) -> Reconstruction:
        batch_size = granted_batch_size(observation, "Inverting Gradients")
        target = [g.detach() for g in observation.gradients()]
        protocol = replayed_protocol(observation, "Inverting Gradients")
        labels, label_source = self._labels(fedsgd_equivalent(observation), batch_size)
        labels = labels.to(target[0].device)
        box = _box(observation, target[0])
        generator = seeded_generator(observation)
        planned = self._planned_iterations(observation)
        # A budget of fewer iterations than restarts runs as many restarts as it has iterations.
        restarts = min(self.restarts, observation.budget.budget.max_iterations or self.restarts)
        draws = [
            gaussian_dummy((batch_size, *observation.input_shape), generator, target[0])
            for _ in range(restarts)
        ]
        target_flat = flat(target)
        with tuned_convolutions(observation.model), torch.enable_grad():
            if protocol is None and restarts > 1 and self.batch_restarts:
                candidates = self._optimise_batched(
                    observation, target_flat, torch.stack(draws), labels, box, planned
                )
                steps = [planned] * restarts
            else:
                steps = [
                    self._optimise(observation, protocol, target_flat, x, labels, box, planned)
                    for x in draws
                ]
                candidates = draws
            # Scored one restart at a time on the same path for every mode: what the server
            # can compute, the cosine distance without TV.
            losses = [
                flat_cosine_distance(
                    flat(simulated_update(observation, protocol, images, labels)), target_flat
                ).item()
                for images in candidates
            ]
        candidates = [images.detach() for images in candidates]
        finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
        if not finite:
            raise TrialFailure(f"every restart ended with a non-finite loss: {losses}")
        chosen = min(finite, key=lambda i: losses[i])
        info: dict[str, Any] = {
            "restart_losses": losses,
            "restart_iterations": steps,
            "chosen_restart": chosen,
            "restarts_batched": protocol is None and restarts > 1 and self.batch_restarts,
            "label_source": label_source,
        }
        return Reconstruction(images=candidates[chosen], labels=labels, info=info)

    def _labels(self, observation: Observation, batch_size: int) -> tuple[Tensor, str]:
        if observation.labels is not None:
            return observation.labels.clone(), "granted"
        if batch_size == 1:
            return torch.tensor([idlg_label(observation)]), "idlg"
        return bias_gradient_labels(observation, batch_size), "bias-gradient"

    def _planned_iterations(self, observation: Observation) -> int:
        """Every restart's schedule length: an equal share of an iteration budget."""
        max_iterations = observation.budget.budget.max_iterations
        if max_iterations is None:
            return self.iterations
        return max(1, min(self.iterations, max_iterations // self.restarts))

    def _optimise(
        self,
        observation: Observation,
        protocol: ClientProtocol | None,
        target: Tensor,
        images: Tensor,
        labels: Tensor,
        box: tuple[Tensor, Tensor],
        planned: int,
    ) -> int:
        """Run one restart in place on ``images``; returns the iterations it drew."""
        low, high = box
        with torch.no_grad():
            images.clamp_(low, high)
        optimizer = SignedAdam(images, self.lr, planned)
        done = 0
        for _ in observation.budget.iterations(planned):
            update = simulated_update(observation, protocol, images, labels)
            loss = flat_cosine_distance(flat(update), target)
            if self.tv_weight > 0:
                loss = loss + self.tv_weight * total_variation(images)
            (grad,) = torch.autograd.grad(loss, [images])
            with torch.no_grad():
                optimizer.step(grad)
                images.clamp_(low, high)
            done += 1
        return done

    def _optimise_batched(
        self,
        observation: Observation,
        target: Tensor,
        images: Tensor,
        labels: Tensor,
        box: tuple[Tensor, Tensor],
        planned: int,
    ) -> list[Tensor]:
        """Every restart at once (FedSGD): ``images`` (R, B, C, H, W) optimised in place, each
        restart's gradient from one vectorised pass (``torch.func.vmap`` over
        ``functional_call``); the same algorithm as :meth:`_optimise` restart by restart
        (Adam and the clamp act element-wise), equal up to the rounding of batched kernels.
        Each step draws one iteration per restart from the budget."""
        model = observation.model
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        # BatchNorm in training mode updates running statistics in place: each restart gets
        # its own copy, as the sequential path's updates never reach its loss either.
        buffers = {name: b.detach() for name, b in model.named_buffers()}
        restarts = images.shape[0]
        tv_weight = self.tv_weight

        def objective(x: Tensor, own_buffers: dict[str, Tensor]) -> Tensor:
            def task_loss(p: dict[str, Tensor]) -> Tensor:
                return F.cross_entropy(functional_call(model, (p, own_buffers), (x,)), labels)

            update = torch.func.grad(task_loss)(parameters)
            loss = flat_cosine_distance(flat(list(update.values())), target)
            return loss + tv_weight * total_variation(x) if tv_weight > 0 else loss

        step = torch.func.vmap(torch.func.grad(objective))
        low, high = box
        images = images.detach()
        images.clamp_(low, high)
        optimizer = SignedAdam(images, self.lr, planned)
        for _ in range(planned):
            for _ in range(restarts):
                observation.budget.step()
            copies = {name: b.expand(restarts, *b.shape).clone() for name, b in buffers.items()}
            optimizer.step(step(images, copies))
            images.clamp_(low, high)
        return list(images.unbind(0))
