"""The trial protocol: what one trial is, as plain code that every harness calls.

``run_trial(victim, attack, defense, setting, batch)`` takes a private batch through the client,
the defense and the isolated attack to a scored trial record. Lightning's evaluator decides which
trials run where; the studies and verification call the same function.

The names below load with the submodule that defines them, on first use: a reader of records
(``leakbench.protocol.records``, the leaderboard's checks) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leakbench.protocol.attack import PreparedAttack, prepare_attack
    from leakbench.protocol.isolation import ISOLATION_MODES, default_threads
    from leakbench.protocol.private_transform import PrivateTransform
    from leakbench.protocol.records import MEASURED_FIELDS, attack_seed, trial_seed
    from leakbench.protocol.trial import TrialOutcome, TrialSetting, run_trial
    from leakbench.protocol.victim import Victim

_SUBMODULE = {
    "ISOLATION_MODES": "isolation",
    "MEASURED_FIELDS": "records",
    "PreparedAttack": "attack",
    "PrivateTransform": "private_transform",
    "TrialOutcome": "trial",
    "TrialSetting": "trial",
    "Victim": "victim",
    "attack_seed": "records",
    "default_threads": "isolation",
    "prepare_attack": "attack",
    "run_trial": "trial",
    "trial_seed": "records",
}

__all__ = [
    "ISOLATION_MODES",
    "MEASURED_FIELDS",
    "PreparedAttack",
    "PrivateTransform",
    "TrialOutcome",
    "TrialSetting",
    "Victim",
    "attack_seed",
    "default_threads",
    "prepare_attack",
    "run_trial",
    "trial_seed",
]


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULE])
