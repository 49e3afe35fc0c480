"""The victim a trial attacks, as a specification that rebuilds it from scratch.

Every trial builds a fresh model from its :class:`Victim` (architecture, options, initial seed,
and optionally a saved state), on the client and again in the attack's worker, so nothing an
attack or a defense does to a model object survives its trial.

A run names the victim's state as text (:func:`resolve_victim_state`): ``random`` (the run's
model seed), ``random(<seed>)``, or a checkpoint's sha256 (full, or a unique prefix of at least
8 hex digits) in the checkpoint directory (:mod:`leakbench.models.checkpoint`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.client import build_victim
from leakbench.models.checkpoint import MIN_PREFIX, check_state_matches, load_checkpoint

_RANDOM = re.compile(r"random(?:\((\d+)\))?")
_SHA256 = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")


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
    checkpoint: str | None = None  # the sha256 of the checkpoint ``state`` was loaded from

    @property
    def state_text(self) -> str:
        """The state as :func:`resolve_victim_state` reads it: a sha256 or ``random(<seed>)``;
        ``trained`` for a state that comes from no checkpoint (:meth:`of`)."""
        if self.checkpoint is not None:
            return self.checkpoint
        return f"random({self.seed})" if self.state is None else "trained"

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
            source = f"checkpoint {self.checkpoint}" if self.checkpoint else "the victim's state"
            check_state_matches(model, self.state, source)
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
            "checkpoint": self.checkpoint,
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
            checkpoint=spec.get("checkpoint"),
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


def resolve_victim_state(
    text: str,
    *,
    model: str,
    model_options: Mapping[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    dtype: torch.dtype = torch.float32,
    checkpoint_dir: str | Path,
    seed: int = 0,
) -> Victim:
    """The victim a run's ``model_state`` names, checked against the run before any trial.

    ``random`` is the seeded initialisation ``random(seed)`` (``seed``: the run's model seed);
    ``random(<n>)`` the initialisation drawn from ``n``; a sha256 or unique prefix (at least
    8 hex digits) a checkpoint of ``checkpoint_dir``, whose hash is verified and whose card must
    name the run's model, model options, input shape and class count, and whose weights must
    fit the model built from them.
    """
    spec = text.strip() if isinstance(text, str) else ""
    random = _RANDOM.fullmatch(spec)
    if random is not None:
        drawn = seed if random.group(1) is None else int(random.group(1))
        return Victim(model, tuple(input_shape), num_classes, dict(model_options), drawn, dtype)
    if not _SHA256.fullmatch(spec.lower()):
        raise ValueError(
            f"model_state {text!r} is not a victim state: expected random, random(<seed>) or a "
            f"checkpoint sha256 ({MIN_PREFIX} to 64 hex digits)"
        )
    checkpoint = load_checkpoint(spec, checkpoint_dir)
    card = checkpoint.card
    run = {
        "model": model,
        "model_options": _as_json(model_options),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
    }
    differences = [
        f"{key} {card.get(key)!r} (run: {value!r})"
        for key, value in run.items()
        if _as_json(card.get(key)) != value
    ]
    if differences:
        raise ValueError(
            f"model_state {checkpoint.sha256[:16]} was trained for another victim: its card has "
            + "; ".join(differences)
        )
    victim = Victim(
        model,
        tuple(input_shape),
        num_classes,
        dict(model_options),
        int(card.get("seed", 0)),
        dtype,
        checkpoint.state,
        checkpoint.sha256,
    )
    victim.build()  # weights of another architecture are refused here, before any trial
    return victim


def _as_json(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists), the form a checkpoint card holds."""
    return json.loads(json.dumps(value))
