"""An attack as the protocol runs it: checked once against the run's grants, rebuilt per trial.

:func:`prepare_attack` learns what an attack requires, the client protocols it supports, its
threat model and batch-size limit, and whether it can handle the victim, when the run is built,
and refuses it there if the run does not grant what it needs under the run's client protocol,
or runs a protocol it does not support. Leakbench's own attacks (and classes registered in the
caller's own process) are read from their class. A plug-in's code never runs in the harness:
it answers these questions itself, as plain data, where its attack jobs run (the sandbox, or a
worker process; :mod:`leakbench.protocol.jobs`).

The result is frozen: an attack that edits its own ``requires`` later (to receive the private
batch in ``client_hook``, say) changes nothing, because the protocol only looks at what was
checked. Every trial then builds a fresh instance from the recorded hyperparameters, so nothing
an attack keeps on ``self`` crosses trials. The prepared attack also names the code that ran:
its distribution, version and a hash of its files (:func:`attack_code`), which entries record.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import leakbench
from leakbench.capabilities import (
    Capability,
    RequirementsNotGranted,
    admitted_letters,
    implied_threat_model,
    threat_model_of,
)
from leakbench.client import ClientProtocol, FedSGD
from leakbench.config import ConfigError
from leakbench.interfaces import Attack, UnsupportedModelError
from leakbench.protocol.isolation import Placement, run_attack_job
from leakbench.protocol.sandbox import SANDBOX_UID, SandboxView, bwrap_path, sandbox_unavailable
from leakbench.protocol.victim import Victim
from leakbench.registry import ATTACKS, Plugin, attack_facts

# Files of a distribution that differ between two installs of the same wheel.
INSTALL_ONLY_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
# How long answering ``describe`` may take (importing a plug-in, building it, checking a model).
DESCRIBE_SECONDS = 120.0


@dataclass(frozen=True)
class PreparedAttack:
    """An attack, its hyperparameters as rebuilt and its facts, checked against the run."""

    name: str
    target: Mapping[str, Any]  # where its code is: {"module", "qualname"} or {"entry_point"}
    hparams: dict[str, Any]
    requires: frozenset[Capability]
    runs_client_code: bool  # requires client code, and the run grants it: checked once, here
    client_protocol: ClientProtocol = FedSGD()  # the protocol it was checked against
    # The largest batch it handles, as its hyperparameters set it (R-GAP's allow_combination
    # lifts its single-sample limit): read once, here. Larger cells are skipped with the reason.
    max_batch_size: int | None = None
    threat_model: str = ""
    # The SoK letter it assumes under the run's client protocol (leakbench.capabilities).
    threat_letter: str = "A"
    # The code that ran: {"distribution", "version", "files_sha256"} (attack_code).
    code: Mapping[str, Any] = field(default_factory=dict)
    # The class, only where the harness may import it: leakbench's own attacks and classes the
    # caller registered in its own process. None for a plug-in.
    cls: type[Attack] | None = field(default=None, compare=False)

    def instance(self) -> Attack:
        """A fresh attack object with the recorded hyperparameters (not for a plug-in)."""
        if self.cls is None:
            raise RuntimeError(f"attack {self.name!r} is a plug-in: its code never runs here")
        return self.cls(**self.hparams)


class UnsupportedClientProtocol(ValueError):
    """An attack is asked to run under a client protocol it does not declare."""


def protocol_requirements(
    name: str,
    supported: frozenset[str],
    requires: frozenset[Capability],
    protocol_requires: Mapping[str, frozenset[Capability]],
    client_protocol: ClientProtocol,
) -> frozenset[Capability]:
    """What the attack needs under ``client_protocol``, refusing a protocol it does not support."""
    unsupported = sorted(client_protocol.names() - supported)
    if unsupported:
        raise UnsupportedClientProtocol(
            f"attack {name!r} does not support the client protocol {unsupported[0]!r} "
            f"(it supports: {', '.join(sorted(supported))})"
        )
    extra = [protocol_requires.get(n, frozenset()) for n in client_protocol.names()]
    return frozenset(requires).union(*extra)


def prepare_attack(
    name: str,
    options: Mapping[str, Any],
    granted: frozenset[Capability],
    client_protocol: ClientProtocol | None = None,
    *,
    victim: Victim | None = None,
    placement: Placement | None = None,
    admitted: str | None = None,
) -> PreparedAttack:
    """Build the attack ``name`` once (bad options are refused here), check that the SoK
    threat model it assumes is one the track ``admitted`` (a letter) admits, its grants, that it
    supports the run's client protocol (FedSGD unless given) and, with ``victim``, that it can
    handle that victim. A plug-in answers in a job where ``placement`` (the run's) says."""
    protocol = client_protocol or FedSGD()
    entry = ATTACKS.get(name)
    if isinstance(entry, Plugin) and placement is not None and placement.isolation == "in-process":
        entry = ATTACKS._load_plugin(ATTACKS._plugins[name])  # debugging: the user's choice
    if isinstance(entry, Plugin):
        facts = describe_plugin(entry, options, victim, placement or Placement("process"))
        cls, target = None, {"entry_point": {"name": name, "value": entry.value}}
    else:
        facts = _class_facts(name, entry, options, victim)
        cls, target = entry, {"module": entry.__module__, "qualname": entry.__qualname__}
    requires = protocol_requirements(
        name,
        frozenset(facts["client_protocols"]),
        frozenset(Capability(c) for c in facts["requires"]),
        {k: frozenset(Capability(c) for c in v) for k, v in facts["protocol_requires"].items()},
        protocol,
    )
    try:
        assumed = implied_threat_model(requires, facts.get("threat_letter"))
    except ValueError as exc:
        raise ConfigError(f"attack {name!r}: {exc}") from None
    if admitted is not None and not threat_model_of(admitted).admits(assumed):
        raise ConfigError(
            f"attack {name!r} assumes threat model {assumed.describe()}, which the track "
            f"(threat model {threat_model_of(admitted).describe()}, admits "
            f"{', '.join(admitted_letters(admitted))}) does not admit"
        )
    missing = sorted(c.value for c in requires - granted)
    if missing:
        raise RequirementsNotGranted(
            f"attack {name!r} requires {', '.join(missing)}, which this run does not grant "
            f"(grants: {', '.join(sorted(c.value for c in granted)) or 'nothing'}); "
            "add them to 'grants'"
        )
    if facts.get("model_error"):
        raise UnsupportedModelError(facts["model_error"])
    return PreparedAttack(
        name=name,
        target=target,
        hparams=dict(facts["hparams"]),
        requires=requires,
        runs_client_code=Capability.CLIENT_CODE in requires,
        client_protocol=protocol,
        max_batch_size=facts["max_batch_size"],
        threat_model=facts["threat_model"],
        threat_letter=assumed.letter,
        code=attack_code(entry if cls is None else cls),
        cls=cls,
    )


def _class_facts(
    name: str, cls: type[Attack], options: Mapping[str, Any], victim: Victim | None
) -> dict[str, Any]:
    try:
        attack = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for attack {name!r}: {exc}") from None
    model_error = None
    if victim is not None:
        try:
            attack.check_model(victim.build())
        except UnsupportedModelError as exc:
            model_error = str(exc)
    return {
        **attack_facts(attack),
        "hparams": dict(attack.hparams),
        "protocol_requires": {
            k: sorted(c.value for c in v) for k, v in dict(cls.protocol_requires).items()
        },
        "model_error": model_error,
    }


def describe_plugin(
    plugin: Plugin, options: Mapping[str, Any], victim: Victim | None, placement: Placement
) -> dict[str, Any]:
    """A plug-in's own answer about itself, from a job where its attack jobs run."""
    message = {
        "kind": "describe",
        "target": {"entry_point": {"name": plugin.name, "value": plugin.value}},
        "options": dict(options),
        "victim": None if victim is None else victim.spec(),
    }
    reply = run_attack_job(plugin.name, message, placement, DESCRIBE_SECONDS)
    if "error" in reply:
        raise ConfigError(f"attack {plugin.name!r} could not describe itself: {reply['error']}")
    facts = reply["result"]
    if "options_error" in facts:
        raise ConfigError(f"bad options for attack {plugin.name!r}: {facts['options_error']}")
    try:
        for key in ("requires", "client_protocols"):
            facts[key] = [Capability(c).value if key == "requires" else str(c) for c in facts[key]]
        if facts["max_batch_size"] is not None:
            facts["max_batch_size"] = int(facts["max_batch_size"])
        facts["threat_model"] = str(facts["threat_model"])
        if facts.get("threat_letter") is not None:
            facts["threat_letter"] = threat_model_of(str(facts["threat_letter"])).letter
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"attack {plugin.name!r} described itself wrongly: {exc}") from None
    return facts


def choose_placement(
    isolation: str, threads: int, attacks: Sequence[str], forbidden: Sequence[Path]
) -> tuple[Placement, str]:
    """Where the jobs of ``attacks`` run, and what to record about it: the sandbox where the
    machine can make one (``isolation: sandbox``), showing nothing of ``forbidden`` and the
    attacks' own code; worker processes where it cannot (the fact says why)."""
    if isolation != "sandbox":
        return Placement(isolation, threads), f"not used (isolation: {isolation})"
    reason = sandbox_unavailable()
    if reason is not None:
        return Placement("process", threads), (
            f"unavailable ({reason}); attacks ran in worker processes (isolation: process), "
            "which isolate the harness's objects but are not a sandbox"
        )
    sources = [s for name in attacks for s in attack_sources(name)]
    view = SandboxView.build(forbidden=forbidden, sources=sources)
    return Placement("sandbox", threads, view), (
        f"bubblewrap ({bwrap_path()}): own user (uid {SANDBOX_UID}), PID, mount, network and "
        "IPC namespaces; read-only Python environment and attack code, nothing of the harness"
    )


def attack_sources(name: str) -> list[str]:
    """The folders (or module files) of attack ``name``'s own code outside leakbench, found
    without importing a plug-in: what its sandbox must show."""
    entry = ATTACKS.get(name)
    source = entry.source_folder() if isinstance(entry, Plugin) else _own_source(entry)
    return [source] if source else []


def plugin_facts(name: str) -> dict[str, Any]:
    """What plug-in ``name`` says of itself with its default options (``leakbench list``), asked
    in the sandbox where there is one, else in a worker process."""
    from leakbench.models.training import default_checkpoint_dir

    forbidden = [Path.cwd(), default_checkpoint_dir()]
    placement, _ = choose_placement("sandbox", 1, [name], [p.resolve() for p in forbidden])
    plugin = ATTACKS.get(name)
    assert isinstance(plugin, Plugin)
    return describe_plugin(plugin, {}, None, placement)


def _own_source(cls: type) -> str | None:
    """Where a class from outside leakbench lives: its top-level package's folder, or the file
    of a top-level module (the sandbox shows that, read-only, and its parent on sys.path)."""
    parts = cls.__module__.split(".")
    file = inspect.getsourcefile(cls)
    if parts[0] in ("leakbench", "__main__") or file is None:
        return None
    path = Path(file).resolve()
    return str(path.parents[len(parts) - 2] if len(parts) > 1 else path)


def attack_code(attack: type | Plugin) -> dict[str, Any]:
    """The code an attack ran: its distribution, version and a SHA-256 over its files.

    A plug-in's files are those its distribution installed (without the records of the install
    itself, which differ between two installs of one wheel); a leakbench attack's file is its
    module; a class from no distribution, its source file."""
    if isinstance(attack, Plugin):
        dist = metadata.distribution(attack.distribution) if attack.distribution else None
        files = [] if dist is None else list(dist.files or [])
        paths = [
            (str(f), Path(str(dist.locate_file(f))))
            for f in files
            if f.name not in INSTALL_ONLY_FILES and "__pycache__" not in f.parts
            and not f.name.endswith(".pyc")
        ] if dist is not None else []  # fmt: skip
        return {
            "distribution": attack.distribution,
            "version": attack.version,
            "files_sha256": _files_sha256(paths),
        }
    file = inspect.getsourcefile(attack)
    own = attack.__module__.startswith("leakbench.")
    return {
        "distribution": "leakbench" if own else None,
        "version": leakbench.__version__ if own else None,
        "files_sha256": _files_sha256([(Path(file).name, Path(file))] if file else []),
    }


def _files_sha256(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"-")
    return digest.hexdigest()
