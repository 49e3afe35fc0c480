"""Base classes every attack and defense implements.

An attack module subclasses :class:`Attack`, declares what it needs, and registers itself::

    @register_attack("my-attack")
    class MyAttack(Attack):
        requires = frozenset({Capability.LABELS})
        threat_model = "honest-but-curious server; labels known"

        def reconstruct(self, observation: Observation) -> Reconstruction: ...

Constructor keyword arguments are the attack's hyperparameters; they are recorded with every
trial. A defense subclasses :class:`Defense` and overrides the transforms it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leakbench.threat_model import Capability, Observation, Reconstruction


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

    def __init__(self, **hparams: Any) -> None:
        self.hparams = hparams

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` naming the layer this attack cannot handle."""

    def client_hook(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Any]:
        """Runs on the client, only for attacks that require ``Capability.CLIENT_CODE``.

        Returns the (possibly modified) batch the client trains on and a state that reaches the
        server in ``Observation.client_state``.
        """
        return images, None

    @abstractmethod
    def reconstruct(self, observation: Observation) -> Reconstruction:
        """Rebuild the private batch from what the server observed."""


class Defense:
    """A client-side defense; the identity unless a transform is overridden."""

    registered_name: ClassVar[str]

    def __init__(self, **hparams: Any) -> None:
        self.hparams = hparams

    def transform_batch(
        self, images: Tensor, labels: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        return images, labels

    def transform_model(self, model: nn.Module) -> nn.Module:
        return model

    def transform_update(
        self, update: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        return dict(update)
