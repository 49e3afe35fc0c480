"""Torch-free parts of the threat model: what a run grants an attack, and a trial's budget.

They live apart from :mod:`leakbench.threat_model` (which needs torch for the Observation) so
that the configuration and the command line can read and validate them without importing
torch; ``leakbench.threat_model`` re-exports them.
"""

from __future__ import annotations

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


class RequirementsNotGranted(ValueError):
    """An attack needs a capability that the run does not grant."""


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
