"""``gradinversion``: GradInversion (Yin et al., CVPR 2021).

Paper: H. Yin, A. Mallya, A. Vahdat, J. M. Alvarez, J. Kautz, P. Molchanov, "See through
Gradients: Image Batch Recovery via GradInversion", CVPR 2021.

Threat model: SoK letter E, statistics-informed eavesdropper (Carletti et al., USENIX Security
2025): an honest-but-curious server that knows the architecture, the parameters and the batch
size (``Capability.BATCH_SIZE``) and, for every BatchNorm layer, the mean and variance of its
input over the client's batch (``Capability.BATCHNORM_STATISTICS``). Which statistics that is,
precisely: the per-channel mean and biased variance of each BatchNorm layer's input when the
model the client received runs on the batch behind the update (all K·B samples of an
aggregate), in the client's mode. They are what train-mode BatchNorm normalises the batch
with, and what a FedAvg client reveals when it shares its updated running statistics
(r' = (1 − m) r + m μ_batch, with the momentum m known). GradInversion's own prior is a
pretrained model's running statistics (DeepInversion's); on a victim at its random
initialisation those are 0 and 1 and say nothing, and on a trained victim every attacker
already has them in the model, so the capability grants the batch's own statistics, as
Huang et al. (NeurIPS 2021, "Evaluating Gradient Inversion Attacks and Defenses in Federated
Learning") read GradInversion's assumption. Labels are restored from the update unless granted.

Math. Labels (Sec. 3.1): behind a ReLU and pooling the output layer's input h_n is
non-negative, and its weight gradient is ∇W = (1/B) Σ_n (softmax(z_n) − e_{y_n}) h_nᵀ. Row k
of a class absent from the batch is a sum of non-negative terms; row k of a present class
holds −(1 − p) h_n for its sample, so its minimum over the features is negative. With B
distinct labels the B classes of most negative row minimum are exactly the labels:

    ŷ = argsort_k( min_j ∇W_{k,j} )[:B].

Repeated labels (fewer classes with a negative row minimum than B: B > K, or a collision) are
our extension, not the paper's: the count of class k is n_k ≈ B (p̄_k − ∇b_k) (since
∇b_k = p̄_k − n_k/B), where p̄ is the model's mean softmax on N(0, 1) inputs in the client's
mode, standing in for the batch's (after Geng et al. 2021, "Towards General Deep Leakage in
Federated Learning"); every class with a negative row minimum keeps at least one slot, and the
counts are scaled to B and rounded by largest remainder. Without an output bias the most
negative class is repeated.

Reconstruction (Sec. 3.2-3.3): a group of G dummy batches x̂_g (from different seeds),
each optimised for

    α_G Σ_l ‖∇θ_l ℓ(x̂_g, ŷ) − ∇θ_l‖₂ + α_TV R_TV(x̂_g) + α_ℓ2 ‖x̂_g‖₂
      + α_BN Σ_l (‖μ_l(x̂_g) − μ_l‖₂ + ‖σ²_l(x̂_g) − σ²_l‖₂) + α_group ‖x̂_g − E(x̂)‖₂,

gradient matching per layer l, total variation, an ℓ2 prior, the BatchNorm prior (μ_l, σ²_l:
the granted statistics; μ_l(x̂), σ²_l(x̂): those of the dummy batch), and group consistency:
E(x̂) is the group's consensus, the mean of its members after aligning their slots. The paper
aligns images by registration (RANSAC-flow); here slots are aligned by a one-to-one matching
on pixel distance within each restored label (a sample's slot is fixed only up to samples of
the same label), which moves no pixel.

Steps, as the code runs them:

1. Labels: granted, or restored from the output layer's gradient (above).
2. G dummy batches x̂_g ~ N(0, 1), drawn from the attacker seed, clamped to the box of valid
   inputs; forward hooks on every BatchNorm layer record the dummy batch's statistics.
3. Adam (``lr``, cosine-annealed to zero over the planned steps) on the loss above, member by
   member (train-mode BatchNorm sees each member's batch alone, as the client's did). The group
   term starts after ``group_start`` of the planned steps; the consensus is refreshed every
   ``group_every`` steps. After every step each member is clamped to the box.
4. The answer: the consensus of the aligned members (``output="consensus"``) or the member of
   smallest gradient-matching loss (``output="best"``: a quantity the server computes, never
   chosen with private data); the labels of step 1.

Iterations: one step of one member is one iteration of the trial budget (G per step); the
schedule is planned to fit an iteration budget. Defaults follow the paper's ImageNet setting
where it states them (Adam, lr 0.1, α_TV 1e-4, α_ℓ2 1e-6); its 20 000 steps need a GPU: the
default here is 2000.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from leakbench.attacks._gradient_matching import (
    gaussian_dummy,
    granted_batch_size,
    seeded_generator,
)
from leakbench.attacks.idlg import output_layer_gradients
from leakbench.attacks.inverting_gradients import _box, total_variation
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction, RequirementsNotGranted

OUTPUTS = ("consensus", "best")
# Dummy inputs whose mean softmax stands in for the batch's, for counting repeated labels.
PRIOR_SAMPLES = 64


def row_minima_labels(weight_grad: Tensor, batch_size: int) -> Tensor:
    """GradInversion's rule: the ``batch_size`` classes of most negative row minimum."""
    minima = weight_grad.to(torch.float64).min(dim=1).values
    return torch.argsort(minima, stable=True)[:batch_size]


def counted_labels(
    present: Tensor, bias_grad: Tensor, mean_softmax: Tensor, batch_size: int
) -> Tensor:
    """Our extension for repeated labels: n_k ≈ B (p̄_k − ∇b_k) for every class, at least one
    for each class in ``present``, scaled to sum to B and rounded by largest remainder."""
    estimate = (batch_size * (mean_softmax - bias_grad)).to(torch.float64).clamp(min=0)
    estimate[present] = estimate[present].clamp(min=1)
    share = estimate * batch_size / estimate.sum()
    counts = share.floor().long()
    order = torch.argsort(counts - share, stable=True)  # largest remainder first
    counts[order[: batch_size - int(counts.sum())]] += 1
    for k in present[counts[present] == 0]:  # a present class keeps one slot
        counts[int(torch.argmax(counts))] -= 1
        counts[k] = 1
    return torch.arange(len(counts), device=counts.device).repeat_interleave(counts)


def restore_labels(observation: Observation, batch_size: int) -> tuple[Tensor, str]:
    """Step 1 (see the module docstring): the labels and how they were found."""
    if observation.labels is not None:
        return observation.labels.clone(), "granted"
    name, weight_grad, bias_grad = output_layer_gradients(observation)
    minima = weight_grad.to(torch.float64).min(dim=1).values
    present = torch.nonzero(minima < 0).flatten()
    if present.numel() == 0:
        raise TrialFailure(f"no row of {name!r}'s weight gradient has a negative entry")
    if present.numel() >= batch_size:
        return row_minima_labels(weight_grad, batch_size), "row minima"
    present = present[torch.argsort(minima[present], stable=True)]
    if bias_grad is None:
        repeats = present[:1].repeat(batch_size - present.numel())
        return torch.cat([present, repeats]), "row minima, most negative repeated"
    generator = seeded_generator(observation)
    probe = torch.randn(
        (PRIOR_SAMPLES, *observation.input_shape), generator=generator, dtype=weight_grad.dtype
    ).to(weight_grad.device)
    # In the client's mode (train-mode BatchNorm normalises the probe by its own statistics),
    # on a copy: no running statistic of the observed model moves.
    with torch.no_grad():
        mean_softmax = torch.softmax(copy.deepcopy(observation.model)(probe), dim=1).mean(0)
    labels = counted_labels(present, bias_grad.detach(), mean_softmax, batch_size)
    return labels, "row minima, counts from the bias gradient"


class BatchNormProbe:
    """Forward hooks that keep, per BatchNorm layer, the mean and biased variance of its input
    in the last forward pass (differentiable)."""

    def __init__(self, model: nn.Module) -> None:
        self.statistics: dict[str, tuple[Tensor, Tensor]] = {}
        self.layers = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        modules = dict(model.named_modules())
        self.handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in self.layers
        ]

    def _hook(self, name: str):
        def record(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            features = inputs[0].transpose(0, 1).flatten(1)
            self.statistics[name] = (features.mean(1), features.var(1, unbiased=False))

        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def align_slots(members: list[Tensor], labels: Tensor) -> list[Tensor]:
    """Every member's slots reordered to agree with the first member's, by a one-to-one
    matching on pixel distance within each label."""
    reference = members[0]
    aligned = [reference]
    for member in members[1:]:
        order = torch.arange(len(labels))
        for label in labels.unique():
            slots = torch.nonzero(labels == label).flatten()
            cost = torch.cdist(reference[slots].flatten(1), member[slots].flatten(1))
            rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
            order[slots[torch.as_tensor(rows)]] = slots[torch.as_tensor(cols)]
        aligned.append(member[order.to(member.device)])
    return aligned


@register_attack("gradinversion")
class GradInversion(Attack):
    requires = frozenset({Capability.BATCH_SIZE, Capability.BATCHNORM_STATISTICS})
    # SoK letter: E, as the SoK gives GradInversion (BatchNorm statistics of the client's data).
    threat_letter = "E"
    client_protocols = frozenset({"fedsgd"})
    threat_model = (
        "honest-but-curious server observing one FedSGD update; knows the architecture, the "
        "parameters, the batch size and the BatchNorm statistics of the client's batch; "
        "restores the labels from the output layer unless granted"
    )

    def __init__(
        self,
        iterations: int = 2000,
        lr: float = 0.1,
        group: int = 4,
        gradient_weight: float = 1.0,
        tv_weight: float = 1e-4,
        l2_weight: float = 1e-6,
        bn_weight: float = 1e-2,
        group_weight: float = 1e-2,
        group_start: float = 0.5,
        group_every: int = 100,
        output: str = "consensus",
    ) -> None:
        super().__init__(
            iterations=iterations,
            lr=lr,
            group=group,
            gradient_weight=gradient_weight,
            tv_weight=tv_weight,
            l2_weight=l2_weight,
            bn_weight=bn_weight,
            group_weight=group_weight,
            group_start=group_start,
            group_every=group_every,
            output=output,
        )
        positive_int("iterations", iterations)
        positive_int("group", group)
        positive_int("group_every", group_every)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        weights = {
            "gradient_weight": gradient_weight,
            "tv_weight": tv_weight,
            "l2_weight": l2_weight,
            "bn_weight": bn_weight,
            "group_weight": group_weight,
        }
        for key, value in weights.items():
            if not value >= 0:
                raise ValueError(f"{key} must be non-negative, got {value!r}")
        if not 0 <= group_start <= 1:
            raise ValueError(f"group_start must be in [0, 1], got {group_start!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.iterations = iterations
        self.lr = float(lr)
        self.group = group
        self.weights = {key: float(value) for key, value in weights.items()}
        self.group_start = float(group_start)
        self.group_every = group_every
        self.output = output

    def reconstruct(self, observation: Observation) -> Reconstruction:
        batch_size = granted_batch_size(observation, "GradInversion")
        if observation.batchnorm_statistics is None:
            raise RequirementsNotGranted(
                "GradInversion needs the batch's BatchNorm statistics "
                f"({Capability.BATCHNORM_STATISTICS.value})"
            )
        target = [g.detach() for g in observation.gradients()]
        labels, label_source = restore_labels(observation, batch_size)
        labels = labels.to(target[0].device)
        low, high = _box(observation, target[0])
        # Step 2: the group's dummies.
        generator = seeded_generator(observation)
        members = [
            gaussian_dummy((batch_size, *observation.input_shape), generator, target[0])
            for _ in range(self.group)
        ]
        with torch.no_grad():
            for member in members:
                member.copy_(torch.maximum(torch.minimum(member, high), low))
        probe = BatchNormProbe(observation.model)
        missing = sorted(set(probe.layers) - set(observation.batchnorm_statistics))
        if missing:
            probe.close()
            raise TrialFailure(f"no BatchNorm statistics were granted for layers {missing}")
        try:
            steps, losses = self._optimise(observation, target, members, labels, (low, high), probe)
        finally:
            probe.close()
        finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
        if not finite:
            raise TrialFailure(f"every member ended with a non-finite loss: {losses}")
        # Step 4: the answer.
        aligned = align_slots([m.detach() for m in members], labels)
        if self.output == "consensus":
            images = torch.stack([aligned[i] for i in finite]).mean(0)
        else:
            images = aligned[min(finite, key=lambda i: losses[i])]
        info: dict[str, Any] = {
            "label_source": label_source,
            "steps": steps,
            "member_gradient_losses": losses,
            "output": self.output,
        }
        return Reconstruction(images=images, labels=labels, info=info)

    def _loss(
        self,
        observation: Observation,
        target: list[Tensor],
        images: Tensor,
        labels: Tensor,
        probe: BatchNormProbe,
    ) -> tuple[Tensor, Tensor]:
        """The member's loss (without the group term) and its gradient-matching part."""
        parameters = list(observation.model.parameters())
        loss = nn.functional.cross_entropy(observation.model(images), labels)
        dummy = torch.autograd.grad(loss, parameters, create_graph=True)
        matching = torch.stack([(d - t).norm() for d, t in zip(dummy, target, strict=True)]).sum()
        granted = observation.batchnorm_statistics or {}
        prior = images.new_zeros(())
        for name, (mean, var) in probe.statistics.items():
            if name in granted:
                prior = prior + (mean - granted[name]["mean"]).norm()
                prior = prior + (var - granted[name]["var"]).norm()
        w = self.weights
        total = (
            w["gradient_weight"] * matching
            + w["tv_weight"] * total_variation(images)
            + w["l2_weight"] * images.norm()
            + w["bn_weight"] * prior
        )
        return total, matching

    def _optimise(
        self,
        observation: Observation,
        target: list[Tensor],
        members: list[Tensor],
        labels: Tensor,
        box: tuple[Tensor, Tensor],
        probe: BatchNormProbe,
    ) -> tuple[int, list[float]]:
        """Step 3: every member's Adam run, in lockstep; returns the steps taken and each
        member's final gradient-matching loss."""
        low, high = box
        budget = observation.budget
        planned = self.iterations
        if budget.budget.max_iterations is not None:
            left = budget.budget.max_iterations - budget.used_iterations
            planned = max(1, min(planned, left // self.group))
        optimizers = [torch.optim.Adam([member], lr=self.lr) for member in members]
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, planned) for o in optimizers]
        group_from = int(self.group_start * planned)
        consensus: Tensor | None = None
        steps = 0
        with torch.enable_grad():
            for step in range(planned):
                if budget.budget.max_iterations is not None and (
                    budget.used_iterations + self.group > budget.budget.max_iterations
                ):
                    break
                if (
                    self.group > 1
                    and step >= group_from
                    and (step - group_from) % self.group_every == 0
                ):
                    aligned = align_slots([m.detach() for m in members], labels)
                    consensus = torch.stack(aligned).mean(0)
                for member, optimizer, scheduler in zip(
                    members, optimizers, schedulers, strict=True
                ):
                    budget.step()
                    loss, _ = self._loss(observation, target, member, labels, probe)
                    if consensus is not None and self.weights["group_weight"] > 0:
                        partner = align_slots([member.detach(), consensus], labels)[1]
                        loss = loss + self.weights["group_weight"] * (member - partner).norm()
                    (grad,) = torch.autograd.grad(loss, [member])
                    member.grad = grad
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        member.copy_(torch.maximum(torch.minimum(member, high), low))
                    member.grad = None
                steps += 1
            losses = []
            for member in members:
                _, matching = self._loss(observation, target, member, labels, probe)
                losses.append(float(matching.detach()))
        return steps, losses
