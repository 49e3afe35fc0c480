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
(successive draws of the same generator) share the trial budget: a restart plans
min(iterations, remaining budget iterations / restarts left) so that its schedule completes
within an iteration budget. The answer is the restart with the smallest final cosine gradient
distance (without TV), a quantity the server can compute: never chosen with private data.

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

import math
from typing import Any

import torch
from torch import Tensor

from leakbench.attacks._gradient_matching import (
    gaussian_dummy,
    granted_batch_size,
    replayed_protocol,
    seeded_generator,
    simulated_update,
)
from leakbench.attacks.idlg import idlg_label, output_layer_gradients
from leakbench.client import EVERY_PROTOCOL, ClientProtocol, FedAvg, fedsgd_equivalent
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction

# Fractions of the planned iterations at which the learning rate drops by LR_DECAY.
LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)
LR_DECAY = 0.1


def cosine_gradient_distance(dummy: list[Tensor], target: list[Tensor]) -> Tensor:
    """1 − ⟨∇θ', ∇θ⟩ / (‖∇θ'‖ ‖∇θ‖) over all layers concatenated."""
    dot = torch.stack([(d * t).sum() for d, t in zip(dummy, target, strict=True)]).sum()
    dummy_norm = torch.stack([(d**2).sum() for d in dummy]).sum().sqrt()
    target_norm = torch.stack([(t**2).sum() for t in target]).sum().sqrt()
    return 1 - dot / (dummy_norm * target_norm)


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
        self, iterations: int = 2000, lr: float = 0.1, tv_weight: float = 1e-4, restarts: int = 1
    ) -> None:
        super().__init__(iterations=iterations, lr=lr, tv_weight=tv_weight, restarts=restarts)
        positive_int("iterations", iterations)
        positive_int("restarts", restarts)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not tv_weight >= 0:
            raise ValueError(f"tv_weight must be non-negative, got {tv_weight!r}")
        self.iterations = iterations
        self.lr = float(lr)
        self.tv_weight = float(tv_weight)
        self.restarts = restarts

    def reconstruct(self, observation: Observation) -> Reconstruction:
        batch_size = granted_batch_size(observation, "Inverting Gradients")
        target = [g.detach() for g in observation.gradients()]
        protocol = replayed_protocol(observation, "Inverting Gradients")
        labels, label_source = self._labels(fedsgd_equivalent(observation), batch_size)
        labels = labels.to(target[0].device)
        low, high = _box(observation, target[0])
        generator = seeded_generator(observation)
        candidates: list[Tensor] = []
        losses: list[float] = []
        steps: list[int] = []
        for restart in range(self.restarts):
            if restart > 0 and observation.budget.exhausted:
                break
            images = gaussian_dummy((batch_size, *observation.input_shape), generator, target[0])
            with torch.enable_grad():
                done = self._optimise(
                    observation, protocol, target, images, labels, (low, high), restart
                )
                loss = cosine_gradient_distance(
                    simulated_update(observation, protocol, images, labels), target
                ).item()
            candidates.append(images.detach())
            losses.append(loss)
            steps.append(done)
        finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
        if not finite:
            raise TrialFailure(f"every restart ended with a non-finite loss: {losses}")
        chosen = min(finite, key=lambda i: losses[i])
        info: dict[str, Any] = {
            "restart_losses": losses,
            "restart_iterations": steps,
            "chosen_restart": chosen,
            "label_source": label_source,
        }
        return Reconstruction(images=candidates[chosen], labels=labels, info=info)

    def _labels(self, observation: Observation, batch_size: int) -> tuple[Tensor, str]:
        if observation.labels is not None:
            return observation.labels.clone(), "granted"
        if batch_size == 1:
            return torch.tensor([idlg_label(observation)]), "idlg"
        return bias_gradient_labels(observation, batch_size), "bias-gradient"

    def _planned_iterations(self, observation: Observation, restart: int) -> int:
        """This restart's schedule length: its share of what is left of an iteration budget."""
        max_iterations = observation.budget.budget.max_iterations
        if max_iterations is None:
            return self.iterations
        left = max_iterations - observation.budget.used_iterations
        return max(1, min(self.iterations, left // (self.restarts - restart)))

    def _optimise(
        self,
        observation: Observation,
        protocol: ClientProtocol | None,
        target: list[Tensor],
        images: Tensor,
        labels: Tensor,
        box: tuple[Tensor, Tensor],
        restart: int,
    ) -> int:
        """Run one restart in place on ``images``; returns the iterations it drew."""
        low, high = box
        planned = self._planned_iterations(observation, restart)
        with torch.no_grad():
            images.copy_(torch.maximum(torch.minimum(images, high), low))
        optimizer = torch.optim.Adam([images], lr=self.lr)
        milestones = [int(planned * f) for f in LR_MILESTONES]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=LR_DECAY)
        done = 0
        for _ in observation.budget.iterations(planned):
            update = simulated_update(observation, protocol, images, labels)
            loss = cosine_gradient_distance(update, target)
            if self.tv_weight > 0:
                loss = loss + self.tv_weight * total_variation(images)
            (grad,) = torch.autograd.grad(loss, [images])
            images.grad = grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                images.copy_(torch.maximum(torch.minimum(images, high), low))
            done += 1
        images.grad = None
        return done
