"""The trial protocol: what one trial is, as plain code that every harness calls.

``run_trial(victim, attack, defense, setting, batch)`` takes a private batch through the client,
the defense and the isolated attack to a scored trial record. Lightning's evaluator decides which
trials run where; the studies and verification call the same function.

The names below load on first use (PEP 562): the attack sandbox imports
``leakbench.protocol.zygote`` and ``jobs`` without the scoring machinery, and a reader of
records (``leakbench.protocol.records``: the leaderboard's checks) imports no torch.
"""

from leakbench.lazy import lazy_exports

_EXPORTS = {
    "PreparedAttack": "leakbench.protocol.attack",
    "attack_seed": "leakbench.protocol.records",
    "prepare_attack": "leakbench.protocol.attack",
    "trial_seed": "leakbench.protocol.records",
    "ISOLATION_MODES": "leakbench.protocol.isolation",
    "Placement": "leakbench.protocol.isolation",
    "default_threads": "leakbench.cores",
    "PrivateTransform": "leakbench.protocol.private_transform",
    "MEASURED_FIELDS": "leakbench.protocol.records",
    "TrialOutcome": "leakbench.protocol.trial",
    "TrialSetting": "leakbench.protocol.trial",
    "run_trial": "leakbench.protocol.trial",
    "Victim": "leakbench.protocol.victim",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
