"""An attack as the protocol runs it: checked once against the run's grants, rebuilt per trial.

:func:`prepare_attack` reads what an attack requires from its *class* when the run is built and
refuses it there if the run does not grant it. The result is frozen: an attack that edits its
own ``requires`` later (to receive the private batch in ``client_hook``, say) changes nothing,
because the protocol only looks at what was checked. Every trial then builds a fresh instance
from the recorded hyperparameters, so nothing an attack keeps on ``self`` crosses trials.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from leakbench.config import ConfigError
from leakbench.interfaces import Attack
from leakbench.registry import ATTACKS
from leakbench.threat_model import Capability, RequirementsNotGranted

# Stream ids that keep the attacker's randomness apart from the trial plan and the client's.
ATTACK_SEED_STREAM = 0x5EED_A77C


@dataclass(frozen=True)
class PreparedAttack:
    """An attack class with its hyperparameters, checked against the run's grants."""

    name: str
    cls: type[Attack]
    hparams: dict[str, Any]
    requires: frozenset[Capability]
    runs_client_code: bool  # requires client code, and the run grants it: checked once, here

    def instance(self) -> Attack:
        """A fresh attack object with the recorded hyperparameters."""
        return self.cls(**self.hparams)

    @property
    def max_batch_size(self) -> int | None:
        return self.cls.max_batch_size


def prepare_attack(
    name: str, options: dict[str, Any], granted: frozenset[Capability]
) -> PreparedAttack:
    """Build the attack ``name`` once (bad options are refused here) and check its grants."""
    cls = ATTACKS.get(name)
    try:
        attack = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for attack {name!r}: {exc}") from None
    requires = frozenset(cls.requires)
    missing = sorted(c.value for c in requires - granted)
    if missing:
        raise RequirementsNotGranted(
            f"attack {name!r} requires {', '.join(missing)}, which this run does not grant "
            f"(grants: {', '.join(sorted(c.value for c in granted)) or 'nothing'}); "
            "add them to 'grants'"
        )
    return PreparedAttack(
        name=name,
        cls=cls,
        hparams=dict(attack.hparams),
        requires=requires,
        runs_client_code=Capability.CLIENT_CODE in requires,
    )


def attack_seed(run_seed: int, cell: str) -> int:
    """The attacker's seed: one per cell, from its own stream.

    It is the same for every trial of a cell, so it cannot be inverted to a trial index (and
    through the public trial plan to the private samples); same run seed, same attack seed.
    """
    key = zlib.crc32(cell.encode())
    return int(np.random.SeedSequence([run_seed, ATTACK_SEED_STREAM, key]).generate_state(1)[0])


def trial_seed(run_seed: int, trial: int) -> int:
    """The client's seed of one trial (defense noise, mixing): never shown to the attacker."""
    return int(np.random.SeedSequence([run_seed, trial]).generate_state(1)[0])
