"""Torch-free parts of the threat model: what a run grants an attack, the SoK's threat-model
letters, and a trial's budget.

They live apart from :mod:`leakbench.threat_model` (which needs torch for the Observation) so
that the configuration and the command line can read and validate them without importing
torch; ``leakbench.threat_model`` re-exports them.

**Threat-model letters.** Carletti, Foggia, Mazzocca, Parrella and Vento, "SoK: Gradient
Inversion Attacks in Federated Learning" (USENIX Security 2025), name eight adversaries by what
they know and can do (their Table of threat models):

====  ==================================  =====================================================
 A    eavesdropper                        the model updates
 B    informed eavesdropper               A + basic knowledge
 C    parameter-aware eavesdropper        B + training details
 D    data-enhanced eavesdropper          C + surrogate data
 E    statistics-informed eavesdropper    D + the client data distribution
 F    active manipulator                  C + active manipulation
 G    data-enhanced manipulator           D + active manipulation
 H    active client manipulator           G + client selection
====  ==================================  =====================================================

Every attack and every track is labelled with one letter. Letters are ordered by what they
know: X *admits* Y when Y's knowledge is a subset of X's (E admits A to E; G admits A to D, F
and G; E and F are incomparable). A track states the strongest adversary it admits
(``track.threat_model``); an attack whose letter the track does not admit is refused before any
trial.

How leakbench's capabilities map onto the SoK's columns (:data:`CAPABILITY_KNOWLEDGE`): every
attack receives the model the server sent and the shared update (A). The batch size is part of
what every adversary sees: a FedAvg client reports its sample count with its update, so that
the server can weigh it (McMahan et al. 2017). The labels are basic knowledge (B; the SoK
gives Inverting Gradients, which assumes them, a B). The client protocol's local
hyperparameters are the training details (C). Surrogate data (D) is the dataset's other split.
BatchNorm statistics of the client's batch describe the client data distribution (E). A model
the server crafts, and code it ships to the client, are active manipulation (F). No capability
grants client selection yet (H).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Capability(str, Enum):
    """Knowledge or power beyond (model, shared update) that an attack may need."""

    LABELS = "labels"  # the private labels of the batch
    BATCH_SIZE = "batch_size"  # the number of samples in the batch
    CLIENT_CODE = "client_code"  # the server ships code that runs on the client (fishing)
    # the client protocol's local hyperparameters: FedAvg's local steps or epochs, local batch
    # size and learning rate, and how many clients an aggregate sums
    LOCAL_HYPERPARAMETERS = "local_hyperparameters"
    # samples of the task's distribution that are not the client's: the dataset's other split
    # (the server's hook ``Attack.server_model`` receives them)
    SURROGATE_DATA = "surrogate_data"
    # the server sends a model of its own making (a zoo model and its state) instead of the
    # victim, and the client trains what it received (``Attack.server_model``)
    SERVER_MODEL = "server_model"
    # per BatchNorm layer, the mean and (biased) variance of its input over the client's batch,
    # through the model the client received: what train-mode BatchNorm normalises the batch
    # with, and what a FedAvg client reveals when it shares its updated running statistics
    BATCHNORM_STATISTICS = "batchnorm_statistics"


class RequirementsNotGranted(ValueError):
    """An attack needs a capability that the run does not grant."""


class Knowledge(str, Enum):
    """The columns of the SoK's table of threat models: what an adversary knows or can do."""

    UPDATES = "model updates"
    BASIC = "basic knowledge"
    TRAINING = "training details"
    SURROGATE = "surrogate data"
    DISTRIBUTION = "client data distribution"
    MANIPULATION = "active manipulation"
    CLIENT_SELECTION = "client selection"


@dataclass(frozen=True)
class ThreatModel:
    """One of the SoK's threat models: its letter, its name and what it knows."""

    letter: str
    name: str
    knowledge: frozenset[Knowledge]

    def admits(self, other: ThreatModel) -> bool:
        """Whether an adversary of ``other`` knows nothing this one does not."""
        return other.knowledge <= self.knowledge

    def describe(self) -> str:
        return f"{self.letter} ({self.name})"


def _threat_models() -> dict[str, ThreatModel]:
    k = Knowledge
    eavesdropper = {k.UPDATES}
    informed = eavesdropper | {k.BASIC}
    parameter_aware = informed | {k.TRAINING}
    data_enhanced = parameter_aware | {k.SURROGATE}
    rows = [
        ("A", "eavesdropper", eavesdropper),
        ("B", "informed eavesdropper", informed),
        ("C", "parameter-aware eavesdropper", parameter_aware),
        ("D", "data-enhanced eavesdropper", data_enhanced),
        ("E", "statistics-informed eavesdropper", data_enhanced | {k.DISTRIBUTION}),
        ("F", "active manipulator", parameter_aware | {k.MANIPULATION}),
        ("G", "data-enhanced manipulator", data_enhanced | {k.MANIPULATION}),
        ("H", "active client manipulator", data_enhanced | {k.MANIPULATION, k.CLIENT_SELECTION}),
    ]
    return {letter: ThreatModel(letter, name, frozenset(known)) for letter, name, known in rows}


THREAT_MODELS: dict[str, ThreatModel] = _threat_models()

# What granting a capability tells the attacker, in the SoK's columns (see the module docstring).
CAPABILITY_KNOWLEDGE: dict[Capability, Knowledge] = {
    Capability.BATCH_SIZE: Knowledge.UPDATES,
    Capability.LABELS: Knowledge.BASIC,
    Capability.LOCAL_HYPERPARAMETERS: Knowledge.TRAINING,
    Capability.SURROGATE_DATA: Knowledge.SURROGATE,
    Capability.BATCHNORM_STATISTICS: Knowledge.DISTRIBUTION,
    Capability.SERVER_MODEL: Knowledge.MANIPULATION,
    Capability.CLIENT_CODE: Knowledge.MANIPULATION,
}


def threat_model_of(letter: str) -> ThreatModel:
    """The SoK threat model of ``letter``; anything else is refused in one line."""
    if letter not in THREAT_MODELS:
        raise ValueError(
            f"threat model {letter!r}: expected one of the SoK's letters "
            f"{', '.join(THREAT_MODELS)} (Carletti et al., USENIX Security 2025)"
        )
    return THREAT_MODELS[letter]


def least_threat_model(knowledge: Iterable[Knowledge]) -> ThreatModel:
    """The weakest threat model that knows all of ``knowledge`` (unique where one exists)."""
    needed = frozenset(knowledge) | {Knowledge.UPDATES}
    covering = [m for m in THREAT_MODELS.values() if needed <= m.knowledge]
    least = [m for m in covering if all(m.knowledge <= other.knowledge for other in covering)]
    if not least:
        names = ", ".join(sorted(k.value for k in needed))
        raise ValueError(f"no SoK threat model holds all of: {names}")
    return least[0]


def implied_threat_model(
    capabilities: Iterable[Capability], declared: str | None = None
) -> ThreatModel:
    """The threat model of an attack that needs ``capabilities`` and, if given, assumes at
    least ``declared`` (the letter the SoK gives its paper)."""
    knowledge = {CAPABILITY_KNOWLEDGE[c] for c in capabilities}
    if declared is not None:
        knowledge |= threat_model_of(declared).knowledge
    return least_threat_model(knowledge)


def admitted_letters(letter: str) -> list[str]:
    """The letters a track of threat model ``letter`` admits, in order."""
    track = threat_model_of(letter)
    return [other for other, model in THREAT_MODELS.items() if track.admits(model)]


def grants_beyond(letter: str, grants: Iterable[Capability]) -> list[Capability]:
    """The grants that tell an attacker more than threat model ``letter`` knows."""
    known = threat_model_of(letter).knowledge
    return sorted(
        (c for c in grants if CAPABILITY_KNOWLEDGE[c] not in known), key=lambda c: c.value
    )


@dataclass(frozen=True)
class Budget:
    """Compute budget of one trial; ``None`` means unlimited on that axis.

    ``max_iterations`` decides a trial's result: it counts work, not time, so the same trial
    gives the same record on a quiet or a loaded machine. ``max_seconds`` is a hard wall-clock
    limit enforced by the harness: a trial that runs past it is recorded as ``timeout``, never
    stopped early with a partial answer.

    Args:
        max_iterations: Iterations one trial may spend (restarts share them); none = unlimited.
        max_seconds: Wall-clock seconds after which a trial is recorded as ``timeout``.
    """

    max_iterations: int | None = None
    max_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_iterations": self.max_iterations, "max_seconds": self.max_seconds}
