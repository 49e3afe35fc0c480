"""``noise-aware``: maximum a posteriori inversion of an update perturbed by noise of known scale.

Defenses it adapts to: additive noise with optional clipping of the whole update
(:mod:`leakbench.defenses.noise`) and DP-SGD's per-sample clipping plus Gaussian noise
(:mod:`leakbench.defenses.dp_sgd`). Threat model: an honest-but-curious server that knows the
architecture, the parameters, the batch size and the mechanism with its public parameters (the
noise scale, the clipping bound, the noise multiplier: Kerckhoffs; the noise draw stays the
client's), and observes one noisy update. Labels are used if granted, otherwise read from the
output bias gradient where its signs survived the noise, else learned jointly.

Model of the observation (the Bayesian view of Balunović, Dimitrov, Jovanović, Vechev, "Bayesian
Framework for Gradient Leakage", ICLR 2022: the optimal attack maximises the likelihood of the
shared update under the known defense plus a prior on the input):

* ``mechanism: update`` — U = clip_C(u(x)) + s · n with u the client protocol's update,
  clip_C(u) = u · min(1, C/‖u‖₂) over the whole update (no clipping without ``clip_norm``), and
  n i.i.d. standard Gaussian (``distribution: gaussian``, std s = ``noise_std``) or standard
  Laplace (``laplace``, scale s);
* ``mechanism: dp-sgd`` — U = (1/B) (Σ_b clip_C(g_b(x_b)) + σC n), n ~ N(0, I), with g_b the
  per-sample gradient, C = ``max_grad_norm`` and σ = ``noise_multiplier``; the noise has std
  s = σC/B per entry. FedSGD only (DP-SGD defines its own update), or an aggregate of K such
  clients with K granted (then U sums K of them and s = √K σC/B).

The attack minimises over dummies x' (and the labels, where unknown) the negative log-posterior

    L(x') = (1/n) Σ_i ρ((U'_i(x') − U_i) / s) + α · TV(x'),

with U' the simulated mechanism without its noise (the clipping included, differentiable), n
the number of shared entries, ρ(t) = t²/2 for Gaussian noise and |t| for Laplace noise, and the
anisotropic total variation as the image prior, with Inverting Gradients' optimiser
(:mod:`leakbench.attacks._defense_aware`). Dividing by n keeps the prior's weight meaningful:
the lower the signal-to-noise ratio, the more the prior decides. A generic attack's cosine
distance weighs the noise like signal and models no clipping.

Closed-form start ("denoising", our addition, for a first ``nn.Linear`` with a bias fed the
input, at one sample): the first layer's gradient is the rank-one [∇W | ∇b] = δ [xᵀ, 1] (any
clipping only rescales δ), observed with i.i.d. noise. The maximum-likelihood rank-one fit under
Gaussian noise is the leading singular pair (Eckart–Young), so x = v_{1:d} / v_{d+1} for the
leading right singular vector v, which uses every row and column instead of Phong et al.'s
ratio, whose denominator ∇b carries the noise too. ``info`` records the leading singular value
against the noise's edge s(√h + √(d+1)) (below it no rank-one signal is detectable).

Steps, as :meth:`NoiseAware.reconstruct` runs them:

1. the noise scale s per entry and the simulator U' of the mechanism;
2. the closed-form start where it applies;
3. the MAP matching, ``restarts`` runs sharing the trial budget, the one with the smallest final
   negative log-likelihood returned.

Hyperparameters: ``mechanism`` and its parameters (above); the schedule ``iterations`` (2000;
Inverting Gradients' published budget is 24 000), ``lr`` (0.1), ``tv_weight`` α (1e-4),
``restarts`` (1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from leakbench.attacks._defense_aware import (
    DefenseAwareAttack,
    Distance,
    MatchingSchedule,
    Simulator,
    first_layer_update,
    match,
    protocol_simulator,
)
from leakbench.client import Aggregate, FedSGD
from leakbench.interfaces import TrialFailure
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction

MECHANISMS = ("update", "dp-sgd")
DISTRIBUTIONS = ("gaussian", "laplace")


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def clipped(update: list[Tensor], bound: float) -> list[Tensor]:
    """u · min(1, C/‖u‖₂) over all tensors together, differentiably."""
    norm = torch.sqrt(sum((g**2).sum() for g in update))
    factor = torch.clamp(bound / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
    return [g * factor for g in update]


def negative_log_likelihood(scale: float, distribution: str) -> Distance:
    """(1/n) Σ ρ((U' − U) / s): ρ(t) = t²/2 (Gaussian) or |t| (Laplace)."""

    def distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        entries = sum(t.numel() for t in target)
        residuals = [(d - t) / scale for d, t in zip(dummy, target, strict=True)]
        if distribution == "gaussian":
            total = sum((r**2).sum() for r in residuals) / 2
        else:
            total = sum(r.abs().sum() for r in residuals)
        return total / entries

    return distance


def rank_one_start(observation: Observation, noise_std: float) -> tuple[Tensor | None, dict]:
    """The leading singular pair of [∇W | ∇b] of a first ``nn.Linear`` with a bias, read as
    δ [xᵀ, 1]; (None, reason) where it does not apply."""
    if observation.batch_size != 1:
        return None, {"closed_form": "not applicable: more than one sample"}
    first = first_layer_update(observation)
    if first is None:
        return None, {"closed_form": "not applicable: no first nn.Linear with a bias on the input"}
    weight, bias = first
    matrix = torch.cat([weight, bias[:, None]], dim=1)
    _, singular, right = torch.linalg.svd(matrix, full_matrices=False)
    leading = right[0]
    rows, columns = matrix.shape
    edge = noise_std * (math.sqrt(rows) + math.sqrt(columns))
    info = {"leading_singular_value": float(singular[0]), "noise_edge": edge}
    if leading[-1].abs() < 1e-12 * leading.abs().max():
        return None, {**info, "closed_form": "skipped: the bias coordinate vanishes"}
    image = (leading[:-1] / leading[-1]).reshape(1, *observation.input_shape)
    return image, {**info, "closed_form": "rank-one fit"}


def per_sample_clipped_mean(observation: Observation, bound: float) -> Simulator:
    """(1/B) Σ_b clip_C(∇θ ℓ(x_b, y_b)), differentiable w.r.t. the dummies."""
    parameters = list(observation.model.parameters())

    def simulate(images: Tensor, targets: Tensor) -> list[Tensor]:
        total: list[Tensor] | None = None
        for b in range(images.shape[0]):
            loss = F.cross_entropy(observation.model(images[b : b + 1]), targets[b : b + 1])
            grads = list(torch.autograd.grad(loss, parameters, create_graph=True))
            grads = clipped(grads, bound)
            total = grads if total is None else [t + g for t, g in zip(total, grads, strict=True)]
        assert total is not None
        return [t / images.shape[0] for t in total]

    return simulate


def dp_clients(observation: Observation) -> int:
    """How many DP-SGD clients the update sums (1 under FedSGD)."""
    spec = observation.client_protocol
    if spec["name"] == FedSGD.name:
        return 1
    if spec["name"] == Aggregate.name and spec.get("inner", {}).get("name") == FedSGD.name:
        if "clients" not in spec:
            raise TrialFailure(
                "noise-aware needs the number of aggregated clients "
                f"({Capability.LOCAL_HYPERPARAMETERS.value}) to model DP-SGD's summed noise"
            )
        return int(spec["clients"])
    raise TrialFailure(f"DP-SGD's update is FedSGD's (or a sum of them), not {spec}")


@register_attack("noise-aware")
class NoiseAware(DefenseAwareAttack):
    adapts_to = frozenset({"noise", "dp-sgd"})
    threat_model = (
        "honest-but-curious server observing one noisy update; knows the architecture, the "
        "parameters, the batch size and the noise mechanism's public parameters"
    )

    def __init__(
        self,
        mechanism: str = "update",
        noise_std: float | None = None,
        distribution: str = "gaussian",
        clip_norm: float | None = None,
        max_grad_norm: float | None = None,
        noise_multiplier: float | None = None,
        iterations: int = 2000,
        lr: float = 0.1,
        tv_weight: float = 1e-4,
        restarts: int = 1,
    ) -> None:
        self.schedule = MatchingSchedule(iterations, lr, tv_weight, restarts)
        super().__init__(
            mechanism=mechanism,
            noise_std=noise_std,
            distribution=distribution,
            clip_norm=clip_norm,
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            **self.schedule.hparams(),
        )
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; valid: {', '.join(MECHANISMS)}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown noise distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
            )
        if mechanism == "update":
            if max_grad_norm is not None or noise_multiplier is not None:
                raise ValueError(
                    "max_grad_norm and noise_multiplier describe mechanism dp-sgd; the update "
                    "mechanism takes noise_std and clip_norm"
                )
            self.noise_std = _positive("noise_std", noise_std, allow_zero=True)
            self.clip_norm = None if clip_norm is None else _positive("clip_norm", clip_norm)
        else:
            if noise_std is not None or clip_norm is not None or distribution != "gaussian":
                raise ValueError(
                    "mechanism dp-sgd takes max_grad_norm and noise_multiplier (Gaussian noise of "
                    "std noise_multiplier · max_grad_norm / B); noise_std, clip_norm and "
                    "distribution describe mechanism update"
                )
            self.max_grad_norm = _positive("max_grad_norm", max_grad_norm)
            self.noise_multiplier = _positive("noise_multiplier", noise_multiplier, True)
        self.mechanism = mechanism
        self.distribution = distribution

    def _mechanism(self, observation: Observation, batch_size: int) -> tuple[float, Simulator]:
        """Step 1: the noise's scale per shared entry and the noiseless mechanism U'."""
        if self.mechanism == "update":
            simulate = protocol_simulator(observation, "noise-aware")
            if self.clip_norm is None:
                return self.noise_std, simulate
            bound = self.clip_norm
            return self.noise_std, lambda images, targets: clipped(simulate(images, targets), bound)
        clients = dp_clients(observation)
        per_client = batch_size // clients
        scale = math.sqrt(clients) * self.noise_multiplier * self.max_grad_norm / per_client
        mean = per_sample_clipped_mean(observation, self.max_grad_norm)

        def simulate_clients(images: Tensor, targets: Tensor) -> list[Tensor]:
            parts = [
                mean(
                    images[k * per_client : (k + 1) * per_client],
                    targets[k * per_client : (k + 1) * per_client],
                )
                for k in range(clients)
            ]
            return [sum(tensors) for tensors in zip(*parts, strict=True)]

        return scale, simulate_clients

    def reconstruct(self, observation: Observation) -> Reconstruction:
        batch_size = observation.batch_size or 0
        # 1. The noise scale and the mechanism without its noise.
        scale, simulate = self._mechanism(observation, batch_size)
        if scale == 0:
            raise TrialFailure("noise scale 0: no noise to model (use a generic attack)")
        # 2. The closed-form start.
        start, info = rank_one_start(observation, scale)
        # 3. MAP matching.
        return match(
            observation,
            "noise-aware",
            negative_log_likelihood(scale, self.distribution),
            self.schedule,
            simulate=simulate,
            start=start,
            info={"noise_std": scale, **info},
        )
