"""The trial protocol: what one trial is, as plain code that every harness calls.

``run_trial(victim, attack, defense, setting, batch)`` takes a private batch through the client,
the defense and the isolated attack to a scored trial record. Lightning's evaluator decides which
trials run where; the studies and verification call the same function.
"""

from leakbench.protocol.attack import PreparedAttack, attack_seed, prepare_attack, trial_seed
from leakbench.protocol.isolation import ISOLATION_MODES, default_threads
from leakbench.protocol.private_transform import PrivateTransform
from leakbench.protocol.trial import MEASURED_FIELDS, TrialOutcome, TrialSetting, run_trial
from leakbench.protocol.victim import Victim

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
