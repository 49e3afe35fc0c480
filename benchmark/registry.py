"""Registries: one per kind of component, filled by decorators and by entry points.

Built-in components register themselves when their module is imported; every module of the
built-in packages (``leakbench.attacks``, ``leakbench.models``, ...) is imported the first time a
registry is read. A third-party package registers its own components without editing leakbench
by declaring an entry point in its ``pyproject.toml``::

    [project.entry-points."leakbench.attacks"]
    my_attack = "my_package.my_attack"            # a module whose import registers it
    other = "my_package.attacks:OtherAttack"      # or an object, registered under "other"

The names and facts the command line needs before it runs anything (every registered name; each
attack's requirements, threat model and batch-size limit) are also kept in a generated index,
``registry_index.json``, so that ``leakbench list`` and the refusal of a misspelt name import no
torch. ``leakbench index`` regenerates it; a test fails while it is stale.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

INDEX_PATH = Path(__file__).with_name("registry_index.json")
INDEX_COMMAND = "leakbench index"

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that no component of that kind is registered under."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Registry(Generic[T]):
    """Name -> component mapping for one kind (``attack``, ``model``, ...)."""

    kind: str
    builtin_package: str
    entry_point_group: str
    _items: dict[str, T] = field(default_factory=dict)
    _loaded: bool = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ATTACKS.register("dlg")``."""

        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} name {name!r} is already registered by {existing!r}")
            self._items[name] = obj
            if isinstance(obj, type):
                obj.registered_name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names())
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        for name in self.names():
            yield name, self._items[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.builtin_package)
        for module in pkgutil.iter_modules(package.__path__, prefix=f"{self.builtin_package}."):
            if not module.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(module.name)
        for ep in entry_points(group=self.entry_point_group):
            loaded: Any = ep.load()
            if not isinstance(loaded, ModuleType) and ep.name not in self._items:
                self.register(ep.name)(loaded)


DATAMODULES: Registry[Any] = Registry("dataset", "leakbench.datamodules", "leakbench.datamodules")
MODELS: Registry[Any] = Registry("model", "leakbench.models", "leakbench.models")
ATTACKS: Registry[Any] = Registry("attack", "leakbench.attacks", "leakbench.attacks")
DEFENSES: Registry[Any] = Registry("defense", "leakbench.defenses", "leakbench.defenses")
COVARIATES: Registry[Any] = Registry("covariate", "leakbench.analysis", "leakbench.covariates")

register_datamodule = DATAMODULES.register
register_model = MODELS.register
register_attack = ATTACKS.register
register_defense = DEFENSES.register
register_covariate = COVARIATES.register


REGISTRIES: dict[str, Registry[Any]] = {
    r.kind: r for r in (DATAMODULES, MODELS, ATTACKS, DEFENSES, COVARIATES)
}


def _attack_facts(attack: Any) -> dict[str, Any]:
    protocols = sorted(getattr(attack, "client_protocols", ()) or ())
    return {
        "requires": sorted(getattr(c, "value", c) for c in attack.requires),
        "threat_model": attack.threat_model,
        "max_batch_size": attack.max_batch_size,
        "client_protocols": protocols,
        # The SoK letter (leakbench.capabilities) under each client protocol it supports.
        "threat_letters": {p: attack.sok_threat_model([p]).letter for p in protocols},
    }


def build_index() -> dict[str, Any]:
    """The built-in components of every registry, read from the real registries (imports them
    all; plug-ins are left out: they are found through their entry points)."""
    index: dict[str, Any] = {}
    for kind, registry in REGISTRIES.items():
        builtin = {
            name: obj
            for name, obj in registry.items()
            if getattr(obj, "__module__", "").startswith("leakbench.")
        }
        if kind == "attack":
            index[kind] = {name: _attack_facts(obj) for name, obj in builtin.items()}
        else:
            index[kind] = sorted(builtin)
    return index


def index_text(index: dict[str, Any]) -> str:
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def write_index(path: Path = INDEX_PATH) -> Path:
    """Regenerate the index file (``leakbench index``)."""
    path.write_text(index_text(build_index()))
    return path


@dataclass(frozen=True)
class Listing:
    """What ``leakbench list`` shows of one registry: names, and each attack's facts."""

    names: list[str]
    attack_facts: dict[str, dict[str, Any]]


def read_index() -> dict[str, Any]:
    return json.loads(INDEX_PATH.read_text())


def plugin_entry_points(registry: Registry[Any]) -> list[Any]:
    """The registry's plug-in entry points, read from package metadata without loading them."""
    return list(entry_points(group=registry.entry_point_group))


def known_names(registry: Registry[Any]) -> set[str]:
    """Every name the registry answers to, without importing a component: the index, what is
    already registered in this process, and the names of object entry points."""
    indexed = read_index().get(registry.kind, [])
    return (
        set(indexed)
        | set(registry._items)
        | {ep.name for ep in plugin_entry_points(registry) if ":" in ep.value}
    )


def check_name(registry: Registry[Any], name: str) -> None:
    """Refuse an unknown name as :meth:`Registry.get` would, importing nothing when it can.

    A module entry point registers names that only its import reveals; then (and only then)
    the registry is loaded to decide.
    """
    if name in known_names(registry):
        return
    if any(":" not in ep.value for ep in plugin_entry_points(registry)):
        registry.get(name)
        return
    valid = ", ".join(sorted(known_names(registry)))
    raise UnknownNameError(f"unknown {registry.kind} {name!r}; valid names: {valid}")


def listing(registry: Registry[Any]) -> Listing:
    """The index's components plus those registered in this process and the plug-ins (which
    are loaded: they are few)."""
    indexed = read_index().get(registry.kind, [])
    facts = dict(indexed) if isinstance(indexed, dict) else {}
    for ep in plugin_entry_points(registry):
        loaded = ep.load()
        if not isinstance(loaded, ModuleType) and ep.name not in registry._items:
            registry.register(ep.name)(loaded)
    names = set(indexed) | set(registry._items)
    if registry is ATTACKS:
        for name, attack in registry._items.items():
            facts.setdefault(name, _attack_facts(attack))
    return Listing(sorted(names), facts)
