"""The victim a trial attacks, as a specification that rebuilds it from scratch.

Every trial builds a fresh model from its :class:`Victim` (architecture, options, initial seed,
and optionally a saved state), on the client and again in the attack's worker, so nothing an
attack or a defense does to a model object survives its trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.client import build_victim


@dataclass(frozen=True)
class Victim:
    """A registered zoo model, its options, its initialisation seed and, if trained, its state."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: torch.dtype = torch.float32
    state: Mapping[str, Tensor] | None = None  # None: the seeded random initialisation

    def build(self) -> nn.Module:
        """A fresh model in this state; a state of another architecture is refused by name."""
        model = build_victim(
            self.name,
            self.input_shape,
            self.num_classes,
            seed=self.seed,
            dtype=self.dtype,
            **dict(self.options),
        )
        if self.state is not None:
            model.load_state_dict(dict(self.state), strict=True)
        return model

    def spec(self) -> dict[str, Any]:
        """Plain data (tensors, strings, numbers) that :meth:`from_spec` turns back into it."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "options": dict(self.options),
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "state": None if self.state is None else dict(self.state),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Victim:
        return cls(
            name=spec["name"],
            input_shape=tuple(spec["input_shape"]),
            num_classes=int(spec["num_classes"]),
            options=dict(spec["options"]),
            seed=int(spec["seed"]),
            dtype=getattr(torch, spec["dtype"]),
            state=spec["state"],
        )

    @classmethod
    def of(cls, victim: Victim, model: nn.Module) -> Victim:
        """The same architecture in ``model``'s current state (e.g. after training)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(
            victim.name,
            victim.input_shape,
            victim.num_classes,
            victim.options,
            victim.seed,
            victim.dtype,
            state,
        )
