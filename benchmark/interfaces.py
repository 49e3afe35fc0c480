"""Base classes every attack and defense implements.

An attack module subclasses :class:`Attack`, declares what it needs, and registers itself::

    @register_attack("my-attack")
    class MyAttack(Attack):
        requires = frozenset({Capability.LABELS})
        threat_model = "honest-but-curious server; labels known"
        threat_letter = "B"  # the SoK's letter (leakbench.capabilities)

        def reconstruct(self, observation: Observation) -> Reconstruction: ...

Constructor keyword arguments are the attack's hyperparameters; they are recorded with every
trial, and an isolated trial rebuilds the attack from them (``type(attack)(**attack.hparams)``)
in a fresh worker process.

A defense subclasses :class:`Defense`. It is stateless: :meth:`Defense.apply` sees the client's
model, its batch and the trial's generator in one call, and returns what the client trained on
and what it shares. Most defenses only override :meth:`Defense.defend_batch` or
:meth:`Defense.defend_update`; a defense that changes how the update is computed (per-sample
clipping, say) overrides ``apply``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leakbench.threat_model import (
    Capability,
    ClientContext,
    Observation,
    Reconstruction,
    ServerContext,
    ThreatModel,
    implied_threat_model,
)


def positive_int(name: str, value: int) -> int:
    """Validate an integer hyperparameter that must be at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class UnsupportedModelError(ValueError):
    """The attack cannot run on this victim (checked before any trial runs)."""


class TrialFailure(RuntimeError):
    """An attack gives up on one trial for a stated reason (degenerate numerics, ...)."""


class Attack(ABC):
    """A gradient-inversion attack."""

    registered_name: ClassVar[str]
    requires: ClassVar[frozenset[Capability]] = frozenset()
    threat_model: ClassVar[str] = "honest-but-curious server observing one FedSGD update"
    max_batch_size: ClassVar[int | None] = None  # e.g. 1 for single-sample attacks
    # Client protocols (``leakbench.client``) whose update the attack can read; a run under
    # another one is refused before any trial.
    client_protocols: ClassVar[frozenset[str]] = frozenset({"fedsgd"})
    # Capabilities needed on top of ``requires`` when the run's protocol includes the key.
    protocol_requires: ClassVar[Mapping[str, frozenset[Capability]]] = {}
    # The defenses an adaptive attack is built against (it models them, knowing their
    # configuration); empty for a generic attack. Defense tracks run an adaptive attack only on
    # the defenses that name it (``Defense.adaptive_attacks``).
    adapts_to: ClassVar[frozenset[str]] = frozenset()
    # The letter of the SoK's threat model (Carletti et al., USENIX Security 2025; see
    # ``leakbench.capabilities``) that the attack's paper assumes; None: the weakest letter its
    # requirements imply. Either way, requirements that need more raise the letter (Inverting
    # Gradients is B, and C under FedAvg, where it needs the local hyperparameters).
    threat_letter: ClassVar[str | None] = None

    def __init__(self, **hparams: Any) -> None:
        self.hparams = hparams

    @classmethod
    def sok_threat_model(cls, protocols: Iterable[str] = ("fedsgd",)) -> ThreatModel:
        """The SoK threat model the attack assumes under the client protocols ``protocols``
        (a run's ``ClientProtocol.names()``): its letter, raised by what it requires there."""
        needed = set(cls.requires)
        for name in protocols:
            needed |= cls.protocol_requires.get(name, frozenset())
        return implied_threat_model(needed, cls.threat_letter)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` naming the layer this attack cannot handle."""

    def client_hook(
        self, model: nn.Module, images: Tensor, context: ClientContext
    ) -> tuple[Tensor, Any]:
        """Runs on the client, only for attacks whose class requires ``Capability.CLIENT_CODE``
        on a run that grants it (checked once, from the class, before any trial).

        ``images`` are the client's private batch in model-input space. Returns the batch the
        client trains on instead and a state that reaches the server in
        ``Observation.client_state`` and is recorded with the trial: it must carry only what the
        attack's threat model says travels to the server.
        """
        return images, None

    def server_model(self, victim: Mapping[str, Any], context: ServerContext) -> dict[str, Any]:
        """Runs on the server before the round, only for attacks whose class requires
        ``Capability.SERVER_MODEL`` on a run that grants it (checked once, from the class,
        before any trial): the server sends the model this returns instead of the victim, and
        the client trains what it received.

        Plain data in and out. ``victim``: the run's victim, ``{"name", "options",
        "input_shape", "num_classes", "state"}`` (``state``: every tensor of its state dict).
        Returns ``{"name": a registered zoo model, "options": its JSON options, "state": {key:
        tensor}}``; the harness builds that model from the zoo for the run's input shape and
        class count, loads ``state`` into it strictly, and the client trains it. The attacker
        then observes that model, like any other.
        """
        raise NotImplementedError(
            f"{type(self).__name__} requires {Capability.SERVER_MODEL.value} but does not "
            "implement server_model"
        )

    @abstractmethod
    def reconstruct(self, observation: Observation) -> Reconstruction:
        """Rebuild the private batch from what the server observed."""


UpdateFn = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]


@dataclass
class ClientShare:
    """What one client did in a trial: the batch it trained on and the update it shares."""

    images: Tensor
    labels: Tensor
    update: dict[str, Tensor]
    # What the defense reports about this round (a DP accountant's epsilon, the fraction of
    # entries kept, ...): JSON data, recorded with the trial as ``defense_report``.
    info: dict[str, Any] = field(default_factory=dict)


class Defense:
    """A client-side defense; the identity unless a step is overridden. Stateless: everything
    a step needs arrives as an argument, so calls never depend on one another."""

    registered_name: ClassVar[str]
    # The client protocols (``leakbench.client``) whose round this defense can run. A defense
    # that computes its own update instead of calling ``compute_update`` cannot take FedAvg's
    # local steps and must leave "fedavg" out; runs are refused before any trial.
    client_protocols: ClassVar[frozenset[str]] = frozenset({"fedsgd", "fedavg", "aggregate"})

    def __init__(self, **hparams: Any) -> None:
        self.hparams = hparams

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError naming what of ``model`` this defense cannot handle (checked once,
        before any trial)."""

    @classmethod
    def options_for_training(
        cls, options: Mapping[str, Any], *, batch_size: int, dataset_size: int, epochs: int
    ) -> dict[str, Any]:
        """The options that make this defense what it claims over a whole training run of
        ``epochs`` passes over ``dataset_size`` samples in batches of ``batch_size`` (DP-SGD:
        its privacy accounting); most defenses need no change."""
        return dict(options)

    def accounting(self) -> dict[str, Any]:
        """What the defense guarantees under its options (DP-SGD: ε, δ, σ, q, T), as JSON
        data: a trained checkpoint's card states it."""
        return {}

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        """The registered attacks the literature uses against this defense, each with the
        options that tell it the defense's configuration (Kerckhoffs: the configuration is
        public, the client's randomness is not). Defense tracks run them next to the generic
        attacks."""
        return {}

    def apply(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        compute_update: UpdateFn,
    ) -> ClientShare:
        """The client's round under this defense; ``compute_update`` is the client protocol
        (e.g. the FedSGD gradient of the mean loss)."""
        images, labels = self.defend_batch(model, images, labels, generator)
        update = compute_update(model, images, labels)
        update = self.defend_update(model, images, labels, update, generator)
        return ClientShare(images=images, labels=labels, update=update)

    def defend_batch(
        self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The batch the client trains on instead of its private one."""
        return images, labels

    def defend_update(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        update: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """The update the client shares, given the one it computed on ``images``."""
        return dict(update)
