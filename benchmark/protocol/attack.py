"""An attack as the protocol runs it: checked once against the run's grants, rebuilt per trial.

:func:`prepare_attack` reads what an attack requires, and the client protocols it supports, from
its *class* when the run is built and refuses it there if the run does not grant what it needs
under the run's client protocol, or runs a protocol it does not support. The result is frozen:
an attack that edits its own ``requires`` later (to receive the private batch in
``client_hook``, say) changes nothing, because the protocol only looks at what was checked.
Every trial then builds a fresh instance from the recorded hyperparameters, so nothing an
attack keeps on ``self`` crosses trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leakbench.client import ClientProtocol, FedSGD
from leakbench.config import ConfigError
from leakbench.interfaces import Attack
from leakbench.registry import ATTACKS
from leakbench.threat_model import Capability, RequirementsNotGranted


@dataclass(frozen=True)
class PreparedAttack:
    """An attack class with its hyperparameters, checked against the run's grants."""

    name: str
    cls: type[Attack]
    hparams: dict[str, Any]
    requires: frozenset[Capability]
    runs_client_code: bool  # requires client code, and the run grants it: checked once, here
    client_protocol: ClientProtocol = FedSGD()  # the protocol it was checked against
    # The largest batch it handles, as its hyperparameters set it (R-GAP's allow_combination
    # lifts its single-sample limit): read once, here. Larger cells are skipped with the reason.
    max_batch_size: int | None = None

    def instance(self) -> Attack:
        """A fresh attack object with the recorded hyperparameters."""
        return self.cls(**self.hparams)


class UnsupportedClientProtocol(ValueError):
    """An attack is asked to run under a client protocol it does not declare."""


def protocol_requirements(
    name: str, cls: type[Attack], client_protocol: ClientProtocol
) -> frozenset[Capability]:
    """What the attack needs under ``client_protocol``, refusing a protocol it does not support."""
    supported = frozenset(cls.client_protocols)
    unsupported = sorted(client_protocol.names() - supported)
    if unsupported:
        raise UnsupportedClientProtocol(
            f"attack {name!r} does not support the client protocol {unsupported[0]!r} "
            f"(it supports: {', '.join(sorted(supported))})"
        )
    extra = [cls.protocol_requires.get(n, frozenset()) for n in client_protocol.names()]
    return frozenset(cls.requires).union(*extra)


def prepare_attack(
    name: str,
    options: dict[str, Any],
    granted: frozenset[Capability],
    client_protocol: ClientProtocol | None = None,
) -> PreparedAttack:
    """Build the attack ``name`` once (bad options are refused here) and check its grants and
    that it supports the run's client protocol (FedSGD unless given)."""
    cls = ATTACKS.get(name)
    requires = protocol_requirements(name, cls, client_protocol or FedSGD())
    try:
        attack = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for attack {name!r}: {exc}") from None
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
        client_protocol=client_protocol or FedSGD(),
        max_batch_size=attack.max_batch_size,
    )
