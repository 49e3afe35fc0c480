"""The optimisation shared by the defense-aware gradient-matching attacks.

Each adaptive attack (``soteria-skip``, ``mask-aware``, ``quantization-aware``,
``noise-aware``) replaces the generic distance between a dummy's update and the shared one by
one that models what the known defense did to the client's update: the entries it removed, the
quantiser it applied, the noise it added. The optimiser around that distance is Inverting
Gradients' (Geiping et al., NeurIPS 2020): dummies x' ~ N(0, 1) from the attacker's seed (or an
attack's own closed-form start for the first restart), Adam on the signed gradient
sign(∂L/∂x'), the learning rate divided by 10 at 3/8, 5/8 and 7/8 of the planned iterations,
x' clamped to the box of valid inputs after every step, and

    L(x', y') = D(U(x', y'), U) + α · TV(x'),

where U is the shared update, U(x', y') the update the dummies would produce under the client
protocol (and, for an attack that models it, the defense's deterministic part), D the attack's
distance and TV the anisotropic total variation. ``restarts`` runs share the trial's iteration
budget; the answer is the restart with the smallest final D, which the server can compute.

Labels: granted ones are used; otherwise iDLG's rule at B = 1 and the negative entries of the
output bias gradient at B > 1 (:mod:`leakbench.attacks.inverting_gradients`). When the defended
update no longer carries them (no negative entry left), label logits y' are optimised jointly
with the images as in DLG, and the labels are argmax_c y'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from leakbench.attacks.bias import first_linear_layer
from leakbench.attacks.idlg import idlg_label
from leakbench.attacks.inverting_gradients import (
    LR_DECAY,
    LR_MILESTONES,
    bias_gradient_labels,
    total_variation,
)
from leakbench.client import EVERY_PROTOCOL, ClientProtocol, FedAvg, fedsgd_equivalent
from leakbench.interfaces import Attack, TrialFailure, UnsupportedModelError, positive_int
from leakbench.threat_model import Capability, Observation, Reconstruction

# D(dummy update, shared update), both in ``model.parameters()`` order.
Distance = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
# The update dummies (images, soft or hard targets) would produce, in parameter order.
Simulator = Callable[[Tensor, Tensor], list[Tensor]]


class DefenseAwareAttack(Attack):
    """What the defense-aware attacks share with Inverting Gradients, whose optimiser they run:
    its threat model (the SoK's letter B; the local hyperparameters under FedAvg, where the
    client's steps are replayed) and every client protocol it replays."""

    requires = frozenset({Capability.BATCH_SIZE})
    threat_letter = "B"
    client_protocols = EVERY_PROTOCOL
    protocol_requires = {FedAvg.name: frozenset({Capability.LOCAL_HYPERPARAMETERS})}


@dataclass(frozen=True)
class MatchingSchedule:
    """The optimiser's hyperparameters (Inverting Gradients' defaults but the iterations)."""

    iterations: int = 2000
    lr: float = 0.1
    tv_weight: float = 1e-4
    restarts: int = 1

    def __post_init__(self) -> None:
        positive_int("iterations", self.iterations)
        positive_int("restarts", self.restarts)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.tv_weight, int | float) and self.tv_weight >= 0):
            raise ValueError(f"tv_weight must be a number >= 0, got {self.tv_weight!r}")

    def hparams(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "lr": self.lr,
            "tv_weight": self.tv_weight,
            "restarts": self.restarts,
        }


def known_labels(observation: Observation, batch_size: int) -> tuple[Tensor | None, str]:
    """Granted labels, or the ones the update's output layer reveals; (None, reason) when the
    defended update does not reveal them (the attack then learns them)."""
    if observation.labels is not None:
        return observation.labels.clone(), "granted"
    readable = fedsgd_equivalent(observation)
    try:
        if batch_size == 1:
            return torch.tensor([idlg_label(readable)]), "idlg"
        return bias_gradient_labels(readable, batch_size), "bias-gradient"
    except TrialFailure as exc:
        return None, f"learned jointly ({exc})"


def first_layer_update(observation: Observation) -> tuple[Tensor, Tensor] | None:
    """(∇W, ∇b) in float64 of a first ``nn.Linear`` with a bias fed the flattened input, read
    as a gradient (:func:`leakbench.client.fedsgd_equivalent`); None for other victims."""
    try:
        name, layer = first_linear_layer(observation.model)
    except UnsupportedModelError:
        return None
    if layer.in_features != math.prod(observation.input_shape):
        return None
    readable = fedsgd_equivalent(observation)
    prefix = f"{name}." if name else ""
    return readable.update[f"{prefix}weight"].double(), readable.update[f"{prefix}bias"].double()


def box(observation: Observation, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel bounds of valid model inputs: the images of pixel values 0 and 1."""
    channels = len(observation.mean)
    low = observation.to_input_space(torch.zeros(channels, 1, 1, dtype=like.dtype))
    high = observation.to_input_space(torch.ones(channels, 1, 1, dtype=like.dtype))
    return low.to(like.device), high.to(like.device)


def protocol_simulator(observation: Observation, attack: str) -> Simulator:
    """The client protocol's update of the dummies, without any defense."""
    protocol: ClientProtocol | None = replayed_protocol(observation, attack)

    def simulate(images: Tensor, targets: Tensor) -> list[Tensor]:
        return simulated_update(observation, protocol, images, targets)

    return simulate


def match(
    observation: Observation,
    attack: str,
    distance: Distance,
    schedule: MatchingSchedule,
    *,
    simulate: Simulator | None = None,
    start: Tensor | None = None,
    info: dict[str, Any] | None = None,
) -> Reconstruction:
    """Minimise D(U(x', y'), U) + α TV(x') (see the module docstring); ``start`` (model-input
    space, the batch's shape) replaces the first restart's random draw."""
    batch_size = granted_batch_size(observation, attack)
    target = [g.detach() for g in observation.gradients()]
    like = target[0]
    simulate = simulate or protocol_simulator(observation, attack)
    labels, label_source = known_labels(observation, batch_size)
    low, high = box(observation, like)
    generator = seeded_generator(observation)
    shape = (batch_size, *observation.input_shape)
    if start is not None and tuple(start.shape) != shape:
        raise ValueError(f"start has shape {tuple(start.shape)}, expected {shape}")
    results: list[tuple[float, Tensor, Tensor, int]] = []
    for restart in range(schedule.restarts):
        if restart > 0 and observation.budget.exhausted:
            break
        images = gaussian_dummy(shape, generator, like)
        logits = (
            None
            if labels is not None
            else torch.randn((batch_size, observation.num_classes), generator=generator)
            .to(like)
            .requires_grad_()
        )
        if restart == 0 and start is not None:
            with torch.no_grad():
                images.copy_(start.to(like))
        done = _optimise(
            observation,
            schedule,
            restart,
            distance,
            simulate,
            target,
            images,
            labels,
            logits,
            (low, high),
        )
        targets = labels.to(like.device) if labels is not None else logits.detach().softmax(-1)
        with torch.enable_grad():
            final = float(distance(simulate(images, targets), target).detach())
        answer = labels if labels is not None else logits.detach().argmax(-1)
        results.append((final, images.detach(), answer, done))
    finite = [r for r in results if math.isfinite(r[0])]
    if not finite:
        raise TrialFailure(
            f"every restart ended with a non-finite distance: {[r[0] for r in results]}"
        )
    chosen = min(
        range(len(results)), key=lambda i: (not math.isfinite(results[i][0]), results[i][0])
    )
    final, images, answer, _ = results[chosen]
    details = {
        "restart_distances": [r[0] for r in results],
        "restart_iterations": [r[3] for r in results],
        "chosen_restart": chosen,
        "label_source": label_source,
        "closed_form_start": start is not None,
        **(info or {}),
    }
    return Reconstruction(images=images, labels=answer.cpu(), info=details)


def _planned(observation: Observation, schedule: MatchingSchedule, restart: int) -> int:
    """A restart's share of what is left of an iteration budget (its schedule completes)."""
    limit = observation.budget.budget.max_iterations
    if limit is None:
        return schedule.iterations
    left = limit - observation.budget.used_iterations
    return max(1, min(schedule.iterations, left // (schedule.restarts - restart)))


def _optimise(
    observation: Observation,
    schedule: MatchingSchedule,
    restart: int,
    distance: Distance,
    simulate: Simulator,
    target: list[Tensor],
    images: Tensor,
    labels: Tensor | None,
    logits: Tensor | None,
    bounds: tuple[Tensor, Tensor],
) -> int:
    """One restart, in place on ``images`` (and ``logits``); returns the iterations drawn."""
    low, high = bounds
    planned = _planned(observation, schedule, restart)
    variables = [images] if logits is None else [images, logits]
    with torch.no_grad():
        images.copy_(torch.maximum(torch.minimum(images, high), low))
    optimizer = torch.optim.Adam(variables, lr=schedule.lr)
    milestones = [int(planned * f) for f in LR_MILESTONES]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=LR_DECAY)
    done = 0
    for _ in observation.budget.iterations(planned):
        with torch.enable_grad():
            targets = labels.to(images.device) if logits is None else logits.softmax(-1)
            loss = distance(simulate(images, targets), target)
            if schedule.tv_weight > 0:
                loss = loss + schedule.tv_weight * total_variation(images)
            grads = torch.autograd.grad(loss, variables)
        for variable, grad in zip(variables, grads, strict=True):
            variable.grad = grad.sign()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            images.copy_(torch.maximum(torch.minimum(images, high), low))
        done += 1
    for variable in variables:
        variable.grad = None
    return done


def masked_cosine(masks: Sequence[Tensor]) -> Distance:
    """1 − cosine between the updates restricted to the entries where ``masks`` are True."""
    # Whole tensors in or out need no masking (cheaper than indexing every iteration).
    kept = [None if bool(m.all()) else m.to(torch.bool) for m in masks]
    used = [bool(m.any()) for m in masks]
    if not any(used):
        raise TrialFailure("the defended update keeps no entry to match")

    def distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        pairs = [
            (d if m is None else d * m, t)
            for d, t, m, u in zip(dummy, target, kept, used, strict=True)
            if u
        ]
        dot = torch.stack([(d * t).sum() for d, t in pairs]).sum()
        dummy_norm = torch.stack([(d**2).sum() for d, _ in pairs]).sum().sqrt()
        target_norm = torch.stack([(t**2).sum() for _, t in pairs]).sum().sqrt()
        return 1 - dot / (dummy_norm * target_norm).clamp_min(torch.finfo(dot.dtype).tiny)

    return distance
