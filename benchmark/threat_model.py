"""The line between what the server sees and what the client holds.

The evaluator keeps the private batch. An attack receives an :class:`Observation`: a copy of the
server's model, the update the client shared (after any defense), and only the metadata the run
grants. Everything in an Observation is a copy; nothing reachable from it is, or aliases, a
tensor of the private batch (``tests/test_observation_isolation.py`` walks the object graph to
prove it).

The loss behind every shared update is the mean softmax cross-entropy over the client's batch;
the client protocol (:mod:`leakbench.client`, named in ``Observation.client_protocol``) says what
is shared: its gradient (FedSGD, ``update[name] = d/dθ (1/B) Σ_b CE(f_θ(x_b), y_b)``), the weight
delta after local SGD steps (FedAvg), or the sum of K clients' updates (aggregate).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# Torch-free, so the command line can read them without torch; re-exported from here.
# New capabilities and Budget fields go in leakbench/capabilities.py.
from leakbench.capabilities import (
    THREAT_MODELS,
    Budget,
    Capability,
    RequirementsNotGranted,
    ThreatModel,
    implied_threat_model,
    threat_model_of,
)

__all__ = [
    "THREAT_MODELS",
    "BatchNormStatistics",
    "Budget",
    "BudgetMeter",
    "Capability",
    "ClientContext",
    "Observation",
    "Reconstruction",
    "RequirementsNotGranted",
    "ServerContext",
    "ThreatModel",
    "batchnorm_statistics",
    "implied_threat_model",
    "make_observation",
    "protocol_view",
    "threat_model_of",
]

# Per BatchNorm layer (by module name): {"mean": (C,), "var": (C,)} of its input over a batch.
BatchNormStatistics = dict[str, dict[str, Tensor]]


class BudgetMeter:
    """Counts the iterations an attack spends and stops it at the iteration budget.

    Iterative attacks draw their iterations from :meth:`iterations` (or call :meth:`step`), which
    stop yielding when the iteration budget is spent; restarts share one meter. Time is measured
    and recorded, but it never changes what the attack computes (see :class:`Budget`).
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.used_iterations = 0
        self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def exhausted(self) -> bool:
        limit = self.budget.max_iterations
        return limit is not None and self.used_iterations >= limit

    def step(self) -> bool:
        """Claim one iteration; False (and nothing claimed) once the budget is spent."""
        if self.exhausted:
            return False
        self.used_iterations += 1
        return True

    def iterations(self, requested: int) -> Iterator[int]:
        """Yield up to ``requested`` iteration indices, fewer if the budget runs out."""
        for i in range(requested):
            if not self.step():
                return
            yield i

    def usage(self) -> dict[str, Any]:
        return {"iterations": self.used_iterations, "seconds": self.elapsed}


@dataclass(frozen=True)
class ClientContext:
    """What an attack's client code (``Attack.client_hook``) knows besides the model and the
    batch: public facts of the run, the trial's budget, and a seed for its own randomness."""

    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalisation: pixels = x * std + mean
    std: tuple[float, ...]
    budget: Budget
    seed: int
    # Diagnostics the client code may add (solver statuses, times): recorded with the trial
    # under ``client_report``, never sent to the server.
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerContext:
    """What an attack's server code (``Attack.server_model``) knows when it makes the model the
    server sends: public facts of the run, the trial's budget, a seed for its own randomness and,
    with ``Capability.SURROGATE_DATA``, the surrogate samples (model inputs and labels)."""

    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    budget: Budget
    seed: int
    surrogate_images: Tensor | None = None
    surrogate_labels: Tensor | None = None


def batchnorm_statistics(model: nn.Module, images: Tensor) -> BatchNormStatistics:
    """The mean and biased variance, per channel, of every BatchNorm layer's input when
    ``model`` (in its current mode) runs on ``images``: the statistics train-mode BatchNorm
    normalises that batch with (``Capability.BATCHNORM_STATISTICS``). ``model`` is left as it
    was: the forward pass runs on a copy, so no running statistic moves."""
    probe = copy.deepcopy(model)
    statistics: BatchNormStatistics = {}
    handles = []
    for name, module in probe.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def record(_module: nn.Module, inputs: tuple[Tensor, ...], _out: Any, key=name):
                features = inputs[0].detach().transpose(0, 1).flatten(1)
                statistics[key] = {
                    "mean": features.mean(1).clone(),
                    "var": features.var(1, unbiased=False).clone(),
                }

            handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        probe(images.detach())
    for handle in handles:
        handle.remove()
    return statistics


@dataclass(frozen=True)
class Observation:
    """Everything the attacker sees in one trial."""

    model: nn.Module  # the server's copy of the victim, in the state the client trained
    update: Mapping[str, Tensor]  # parameter name -> shared gradient (after defenses)
    input_shape: tuple[int, ...]  # (C, H, W) of one sample
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalisation of the model input
    std: tuple[float, ...]
    budget: BudgetMeter
    # For the attack's own randomness (dummy init, restarts). The same for every trial of a
    # cell, so it says nothing about which trial, or which samples, the attack is looking at.
    seed: int
    batch_size: int | None = None  # granted only with Capability.BATCH_SIZE
    labels: Tensor | None = None  # granted only with Capability.LABELS
    client_state: Any = None  # what the attack's own client_hook left (Capability.CLIENT_CODE)
    # The client protocol behind the update (``leakbench.client``): its full spec with
    # Capability.LOCAL_HYPERPARAMETERS, otherwise only its name (and its inner protocol's).
    client_protocol: dict[str, Any] = field(default_factory=lambda: {"name": "fedsgd"})
    # With Capability.BATCHNORM_STATISTICS: per BatchNorm layer of the model, the mean and
    # biased variance of its input over the batch behind the update (``batchnorm_statistics``).
    batchnorm_statistics: BatchNormStatistics | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.update.values())).dtype

    def gradients(self) -> list[Tensor]:
        """The shared update in ``model.parameters()`` order; refuses an incomplete update."""
        names = [name for name, _ in self.model.named_parameters()]
        missing = [n for n in names if n not in self.update]
        if missing:
            raise ValueError(f"the shared update lacks gradients for parameters: {missing}")
        return [self.update[n] for n in names]

    def to_image_space(self, images: Tensor) -> Tensor:
        """De-normalise model inputs to the [0, 1] pixel scale (not clamped)."""
        return images * self._stats(self.std, images) + self._stats(self.mean, images)

    def to_input_space(self, pixels: Tensor) -> Tensor:
        """Normalise [0, 1] pixels into model inputs."""
        return (pixels - self._stats(self.mean, pixels)) / self._stats(self.std, pixels)

    @staticmethod
    def _stats(values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


@dataclass
class Reconstruction:
    """An attack's answer. ``images`` live in the model-input (normalised) space."""

    images: Tensor  # (N, C, H, W)
    labels: Tensor | None = None  # (N,) inferred labels, if the attack infers them
    batch_size: int | None = None  # inferred batch size, if the attack infers it
    info: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable diagnostics


def make_observation(
    model: nn.Module,
    update: Mapping[str, Tensor],
    *,
    granted: frozenset[Capability],
    labels: Tensor,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    budget: Budget,
    seed: int,
    client_state: Any = None,
    client_protocol: Mapping[str, Any] | None = None,
    images: Tensor | None = None,
) -> Observation:
    """An attacker's view built directly from a model and an update, copying both: for testing
    an attack on its own. Trials never use it: the protocol sends the attacker a serialised
    Observation (:mod:`leakbench.protocol.isolation`). ``images`` (the batch behind the update)
    are needed only to grant ``Capability.BATCHNORM_STATISTICS``; they are not kept."""
    statistics = None
    if Capability.BATCHNORM_STATISTICS in granted:
        if images is None:
            raise ValueError("granting batchnorm_statistics needs the batch: pass images=")
        statistics = batchnorm_statistics(model, images)
    server_model = copy.deepcopy(model)
    server_model.zero_grad(set_to_none=True)
    return Observation(
        model=server_model,
        update={name: g.detach().clone() for name, g in update.items()},
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        budget=BudgetMeter(budget),
        seed=seed,
        batch_size=int(labels.shape[0]) if Capability.BATCH_SIZE in granted else None,
        labels=labels.detach().clone() if Capability.LABELS in granted else None,
        client_state=copy.deepcopy(client_state),
        client_protocol=protocol_view(client_protocol or {"name": "fedsgd"}, granted),
        batchnorm_statistics=statistics,
    )


def protocol_view(spec: Mapping[str, Any], granted: frozenset[Capability]) -> dict[str, Any]:
    """What the attacker learns of the client protocol ``spec``: all of it with
    ``Capability.LOCAL_HYPERPARAMETERS``, otherwise only the names (``aggregate`` of ``fedavg``)."""
    if Capability.LOCAL_HYPERPARAMETERS in granted:
        return copy.deepcopy(dict(spec))
    view: dict[str, Any] = {"name": spec["name"]}
    if "inner" in spec:
        view["inner"] = protocol_view(spec["inner"], granted)
    return view
