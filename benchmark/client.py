"""The client: what it computes and shares in one round, under a client protocol.

A client protocol is a frozen dataclass with a ``name``, its parameters and :meth:`spec` (what
the trial records). :meth:`ClientProtocol.share` runs the client's round under the run's
defense, always through ``defense.apply(model, images, labels, generator, compute_update)``:
the protocol only decides what ``compute_update`` is.

* ``fedsgd`` (:class:`FedSGD`): the gradient of the mean cross-entropy of the batch,
  ``∇θ (1/B) Σ_b CE(f_θ(x_b), y_b)``.
* ``fedavg`` (:class:`FedAvg`; McMahan, Moore, Ramage, Hampson, Agüera y Arcas, 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data"): plain SGD from
  the received weights θ_0, θ_{t+1} = θ_t − η ∇θ (1/|b_t|) Σ_{i∈b_t} CE(f_θt(x_i), y_i), for
  ``local_steps`` steps or ``local_epochs`` epochs; the client shares Δ = θ_E − θ_0. Local
  batches: epochs of the client's B samples, each epoch a fresh permutation drawn from the
  trial's generator and cut into chunks of ``local_batch_size`` (the last one smaller);
  ``local_steps`` takes the first E chunks of that sequence, ``local_epochs`` every chunk of E
  epochs. A local batch that holds all B samples draws no permutation (order cannot change a
  mean), so one full-batch step draws from the generator exactly what FedSGD does, and
  Δ = −η · (FedSGD's gradient). The defense acts once per round: ``defend_batch`` sees the
  client's data before local training, ``compute_update`` is the whole local training, and
  ``defend_update`` sees Δ.
* ``aggregate`` (:class:`Aggregate`): K clients, each running an inner protocol (fedsgd or
  fedavg) under the defense on its own data; the server sees only the sum of their updates, as
  under secure aggregation (Bonawitz et al., 2017, "Practical Secure Aggregation for
  Privacy-Preserving Machine Learning"). The trial's batch holds K·B samples and client k holds
  samples kB..(k+1)B−1; the clients draw from the trial's generator in turn, client 0 first.
  The server's target is any private sample: scoring compares against all K·B, and the
  attacker's granted batch size is K·B, the number of samples behind the update.

Attacker side: :func:`fedsgd_equivalent` turns an observed update back into (an approximation
of) the FedSGD gradient of every sample behind it, for attacks that treat it as one;
:func:`local_sgd_delta` is FedAvg's local training, differentiable on request, so an attack can
simulate the client's local steps with the same code the client runs.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from leakbench.interfaces import ClientShare, Defense, UpdateFn
from leakbench.threat_model import Observation


def fedsgd_update(
    model: nn.Module, images: Tensor, labels: Tensor, *, differentiable: bool = False
) -> dict[str, Tensor]:
    """Gradient of the mean cross-entropy of the batch w.r.t. every trainable parameter; with
    ``differentiable`` it keeps its graph, so it can be differentiated w.r.t. ``images``."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, [p for _, p in params], create_graph=differentiable)
    return {
        name: g if differentiable else g.detach()
        for (name, _), g in zip(params, grads, strict=True)
    }


def build_victim(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    **options: object,
) -> nn.Module:
    """Build a registered victim with a deterministic initialisation drawn from ``seed``."""
    from leakbench.registry import MODELS

    builder = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(tuple(input_shape), num_classes, **options)
    return model.to(dtype)


def local_batches(
    samples: int,
    batch_size: int | None,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Index tensors of FedAvg's local batches, in the order they are trained on.

    Epochs of ``samples`` indices, each cut into chunks of ``batch_size`` (``None``: all of
    them; the last chunk may be smaller): the first ``steps`` chunks, or every chunk of
    ``epochs`` epochs. Each epoch is a fresh permutation drawn from ``generator``; without one,
    or when one chunk holds every sample, the order is 0..samples−1 and nothing is drawn.
    """
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps ({steps!r}) and epochs ({epochs!r})")
    size = samples if batch_size is None else min(batch_size, samples)
    batches: list[Tensor] = []
    epoch = 0
    while (steps is None or len(batches) < steps) and (epochs is None or epoch < epochs):
        shuffled = generator is not None and size < samples
        order = torch.randperm(samples, generator=generator) if shuffled else torch.arange(samples)
        batches.extend(order.split(size))
        epoch += 1
    return batches if steps is None else batches[:steps]


def local_sgd_delta(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    batches: Sequence[Tensor],
    lr: float,
    *,
    differentiable: bool = False,
) -> dict[str, Tensor]:
    """FedAvg's local training: plain SGD on the mean cross-entropy of each local batch in turn,
    from the model's weights θ_0; returns Δ = θ_E − θ_0 for every trainable parameter.

    ``model`` is left unchanged (its buffers too: batch-norm statistics move on copies).
    ``labels`` are class indices or class probabilities. With ``differentiable`` the steps keep
    their graph (``create_graph``), so Δ can be differentiated with respect to ``images``.
    """
    start = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    weights = {name: w.clone().requires_grad_() for name, w in start.items()}
    with torch.enable_grad():
        for batch in batches:
            logits = functional_call(model, {**buffers, **weights}, (images[batch],))
            loss = F.cross_entropy(logits, labels[batch])
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=differentiable)
            weights = {
                name: w - lr * g if differentiable else (w - lr * g).detach().requires_grad_()
                for (name, w), g in zip(weights.items(), grads, strict=True)
            }
    delta = {name: weights[name] - start[name] for name in start}
    return delta if differentiable else {name: d.detach() for name, d in delta.items()}


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"client_protocol {key} = {value!r}: expected a positive integer")
    return value


class ClientProtocol(ABC):
    """How one round's shared update comes about (see the module docstring)."""

    name: ClassVar[str]

    def spec(self) -> dict[str, Any]:
        """Plain data naming the protocol and every parameter: recorded with each trial."""
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def names(self) -> frozenset[str]:
        """The protocols this one runs (an aggregate runs its inner one too)."""
        return frozenset({self.name})

    def samples_per_trial(self, batch_size: int) -> int:
        """Samples a trial draws for clients of ``batch_size`` samples each."""
        return batch_size

    @abstractmethod
    def share(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        defense: Defense,
        generator: torch.Generator,
    ) -> ClientShare:
        """The round under ``defense``: what the client(s) trained on and what the server sees."""

    @abstractmethod
    def simulate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The attacker's replay of the round on candidate ``images`` (no defense), differentiable
        w.r.t. them. Local batches come in index order: the client's shuffles are secret, and
        slot order is arbitrary for dummies, so this is exact up to the reshuffles of later
        epochs."""


@dataclass(frozen=True)
class FedSGD(ClientProtocol):
    """One gradient of the mean cross-entropy of the client's batch."""

    name: ClassVar[str] = "fedsgd"

    def share(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        defense: Defense,
        generator: torch.Generator,
    ) -> ClientShare:
        return defense.apply(model, images, labels, generator, fedsgd_update)

    def simulate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return fedsgd_update(model, images, labels, differentiable=True)


@dataclass(frozen=True)
class FedAvg(ClientProtocol):
    """Local SGD from the received weights; shares the weight delta Δ = θ_E − θ_0."""

    name: ClassVar[str] = "fedavg"
    lr: float
    local_steps: int | None = None
    local_epochs: int | None = None
    local_batch_size: int | None = None  # None: the client's whole batch

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError(
                f"client_protocol fedavg local_steps = {self.local_steps!r}, local_epochs = "
                f"{self.local_epochs!r}: expected exactly one of them"
            )
        for key in ("local_steps", "local_epochs", "local_batch_size"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise ValueError(f"client_protocol lr = {self.lr!r}: expected a positive number")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"client_protocol lr = {self.lr!r}: expected a positive number")

    def batches(self, samples: int, generator: torch.Generator | None) -> list[Tensor]:
        """The local batches of a client holding ``samples`` samples (see :func:`local_batches`)."""
        return local_batches(
            samples,
            self.local_batch_size,
            steps=self.local_steps,
            epochs=self.local_epochs,
            generator=generator,
        )

    def step_count(self, samples: int | None) -> int | None:
        """Local SGD steps of a client holding ``samples``; None where that count is unknown."""
        if self.local_steps is not None:
            return self.local_steps
        if self.local_batch_size is None:
            return self.local_epochs
        if samples is None:
            return None
        return self.local_epochs * math.ceil(samples / min(self.local_batch_size, samples))

    def update_fn(self, generator: torch.Generator) -> UpdateFn:
        """``compute_update`` for ``defense.apply``: the whole local training of one client."""

        def local_training(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
            return local_sgd_delta(
                model, images, labels, self.batches(int(labels.shape[0]), generator), self.lr
            )

        return local_training

    def share(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        defense: Defense,
        generator: torch.Generator,
    ) -> ClientShare:
        return defense.apply(model, images, labels, generator, self.update_fn(generator))

    def simulate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        batches = self.batches(int(labels.shape[0]), None)
        return local_sgd_delta(model, images, labels, batches, self.lr, differentiable=True)


@dataclass(frozen=True)
class Aggregate(ClientProtocol):
    """K clients under an inner protocol; the server sees only the sum of their updates."""

    name: ClassVar[str] = "aggregate"
    clients: int
    inner: FedSGD | FedAvg = field(default_factory=FedSGD)

    def __post_init__(self) -> None:
        _positive_int("clients", self.clients)
        if not isinstance(self.inner, FedSGD | FedAvg):
            raise ValueError(
                f"client_protocol aggregate inner = {self.inner!r}: expected fedsgd or fedavg"
            )

    def samples_per_trial(self, batch_size: int) -> int:
        return self.clients * batch_size

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "clients": self.clients, "inner": self.inner.spec()}

    def names(self) -> frozenset[str]:
        return frozenset({self.name}) | self.inner.names()

    def share(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        defense: Defense,
        generator: torch.Generator,
    ) -> ClientShare:
        shares = [
            self.inner.share(model, x, y, defense, generator)
            for x, y in self._split(images, labels)
        ]
        total = _sum([share.update for share in shares])
        return ClientShare(
            images=torch.cat([share.images for share in shares]),
            labels=torch.cat([share.labels for share in shares]),
            update=total,
            info={"clients": [share.info for share in shares]},
        )

    def simulate(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return _sum([self.inner.simulate(model, x, y) for x, y in self._split(images, labels)])

    def _split(self, images: Tensor, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Client k's samples: kB..(k+1)B−1 of the K·B."""
        samples = int(labels.shape[0])
        if samples % self.clients:
            raise ValueError(
                f"client_protocol aggregate clients = {self.clients}: a batch of {samples} "
                "samples does not split into that many equal clients"
            )
        per_client = samples // self.clients
        return list(zip(images.split(per_client), labels.split(per_client), strict=True))


def _sum(updates: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Σ_k update_k, added in client order (secure aggregation reveals only this)."""
    total = dict(updates[0])
    for update in updates[1:]:
        total = {name: total[name] + update[name] for name in total}
    return total


CLIENT_PROTOCOLS: dict[str, type[ClientProtocol]] = {
    cls.name: cls for cls in (FedSGD, FedAvg, Aggregate)
}
# For attacks that read any protocol's update (through :func:`fedsgd_equivalent`, say).
EVERY_PROTOCOL: frozenset[str] = frozenset(CLIENT_PROTOCOLS)


def protocol_from_spec(spec: Mapping[str, Any] | str) -> ClientProtocol:
    """A client protocol from its spec (``{"name": "fedavg", "local_steps": 5, "lr": 0.1}``,
    ``{"name": "aggregate", "clients": 4, "inner": {"name": "fedsgd"}}``) or from a bare name."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"client_protocol = {spec!r}: expected a name or a mapping with 'name'")
    options = dict(spec)
    name = options.pop("name", None)
    if name not in CLIENT_PROTOCOLS:
        raise ValueError(
            f"client_protocol name = {name!r}: expected one of {', '.join(CLIENT_PROTOCOLS)}"
        )
    cls = CLIENT_PROTOCOLS[name]
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(known))
    if unknown:
        expected = f"one of {', '.join(known)}" if known else "no options"
        raise ValueError(f"client_protocol {name} option {unknown[0]!r}: expected {expected}")
    required = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in options]
    if missing:
        raise ValueError(f"client_protocol {name} {missing[0]} = None: expected a value")
    if cls is Aggregate:
        options["inner"] = protocol_from_spec(options.get("inner", FedSGD.name))
    return cls(**options)


def fedsgd_equivalent(observation: Observation) -> Observation:
    """The observation with its update rescaled towards the FedSGD gradient of the mean
    cross-entropy of every sample behind it, for attacks that treat the update as one.

    * fedsgd: unchanged.
    * fedavg: Δ = −η Σ_t ∇θ_t, so −Δ / (η E) is the mean of the E local gradients, each taken at
      a different θ_t: exactly the FedSGD gradient for one full-batch step, an approximation
      otherwise. Without the local hyperparameters only the sign is undone (−Δ), which keeps
      ratios and cosines between gradient entries but not their scale.
    * aggregate: Σ_k of K clients' means over B samples each is K times the mean over all K·B,
      so the sum is divided by K (known with the local hyperparameters), after undoing the
      inner protocol as above.
    """
    factor = _gradient_factor(observation.client_protocol, observation.batch_size)
    if factor == 1.0:
        return observation
    update = {name: g * factor for name, g in observation.update.items()}
    return dataclasses.replace(observation, update=update)


def _gradient_factor(spec: Mapping[str, Any], samples: int | None) -> float:
    """What to multiply an update of protocol ``spec`` (full or names-only) by."""
    if spec["name"] == FedSGD.name:
        return 1.0
    if spec["name"] == Aggregate.name:
        if "clients" not in spec:
            return _gradient_factor(spec["inner"], None)
        clients = int(spec["clients"])
        per_client = None if samples is None else samples // clients
        return _gradient_factor(spec["inner"], per_client) / clients
    if "lr" not in spec:  # fedavg, its hyperparameters not granted
        return -1.0
    steps = protocol_from_spec(spec).step_count(samples)  # type: ignore[union-attr]
    return -1.0 / (float(spec["lr"]) * steps) if steps else -1.0 / float(spec["lr"])
