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
    isolated_plugins: bool = False  # True: plug-ins are never imported here (attacks)
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
        """The component ``name``. A plug-in of a kind whose code never runs in the harness
        (attacks) comes back as a :class:`Plugin` reference, unimported; other plug-ins are
        imported when first asked for, and only then."""
        self._load()
        if name in self._items:
            return self._items[name]
        ep = self._plugins.get(name)
        if ep is None:
            valid = ", ".join(self.names())
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None
        if self.isolated_plugins:
            return Plugin.of(ep)  # type: ignore[return-value]
        return self._load_plugin(ep)

    def names(self) -> list[str]:
        self._load()
        return sorted(set(self._items) | set(self._plugins))

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items or name in self._plugins

    def _load(self) -> None:
        """Import the built-in modules (plug-ins are named by their entry points, unloaded)."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.builtin_package)
        for module in pkgutil.iter_modules(package.__path__, prefix=f"{self.builtin_package}."):
            if not module.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(module.name)

    @property
    def _plugins(self) -> dict[str, Any]:
        """The plug-ins' entry points by name, read from the installed metadata each time (a
        distribution installed since the last look is found)."""
        return {ep.name: ep for ep in plugin_entry_points(self) if ep.name not in self._items}

    def _load_plugin(self, ep: Any) -> T:
        loaded: Any = ep.load()
        if not isinstance(loaded, ModuleType) and ep.name not in self._items:
            self.register(ep.name)(loaded)
        if ep.name not in self._items:
            raise UnknownNameError(
                f"the entry point {ep.name} = {ep.value} registers no {self.kind} named "
                f"{ep.name!r}: a module entry point must register under the entry point's name"
            )
        return self._items[ep.name]


@dataclass(frozen=True)
class Plugin:
    """An attack from an installed distribution's ``leakbench.attacks`` entry point, known by
    its metadata only: its code runs where attacks run (:mod:`leakbench.protocol.jobs`), never
    in the harness, which learns what it needs from the plug-in's answer there."""

    name: str
    value: str  # ``module`` or ``module:object``
    distribution: str | None
    version: str | None

    @classmethod
    def of(cls, ep: Any) -> Plugin:
        dist = getattr(ep, "dist", None)
        return cls(
            ep.name,
            ep.value,
            dist.metadata["Name"] if dist is not None else None,
            dist.version if dist is not None else None,
        )

    @property
    def module(self) -> str:
        return self.value.split(":")[0].strip()

    def source_folder(self) -> str | None:
        """Where its top-level package lives, found without importing it."""
        import importlib.util

        try:
            spec = importlib.util.find_spec(self.module.split(".")[0])
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.submodule_search_locations:
            return str(list(spec.submodule_search_locations)[0])
        return spec.origin  # a top-level module: its file


DATAMODULES: Registry[Any] = Registry("dataset", "leakbench.datamodules", "leakbench.datamodules")
MODELS: Registry[Any] = Registry("model", "leakbench.models", "leakbench.models")
ATTACKS: Registry[Any] = Registry(
    "attack", "leakbench.attacks", "leakbench.attacks", isolated_plugins=True
)
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


def attack_facts(attack: Any) -> dict[str, Any]:
    """What the harness needs to know of an attack (class or instance) before any trial."""
    protocols = sorted(getattr(attack, "client_protocols", ()) or ())
    return {
        "requires": sorted(getattr(c, "value", c) for c in attack.requires),
        "threat_model": attack.threat_model,
        "max_batch_size": attack.max_batch_size,
        "client_protocols": protocols,
        # The SoK letter it declares, and the one it assumes under each client protocol it
        # supports (leakbench.capabilities).
        "threat_letter": getattr(attack, "threat_letter", None),
        "threat_letters": {p: attack.sok_threat_model([p]).letter for p in protocols},
    }


def build_index() -> dict[str, Any]:
    """The built-in components of every registry, read from the real registries (imports them
    all; plug-ins are left out: they are found through their entry points)."""
    index: dict[str, Any] = {}
    for kind, registry in REGISTRIES.items():
        registry._load()
        builtin = {
            name: obj
            for name, obj in registry._items.items()
            if getattr(obj, "__module__", "").startswith("leakbench.")
        }
        if kind == "attack":
            index[kind] = {name: attack_facts(obj) for name, obj in builtin.items()}
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
    """What ``leakbench list`` shows of one registry: names, and each attack's facts (a
    plug-in's as its own code answered them where attacks run)."""

    names: list[str]
    attack_facts: dict[str, dict[str, Any]]


def read_index() -> dict[str, Any]:
    return json.loads(INDEX_PATH.read_text())


def plugin_entry_points(registry: Registry[Any]) -> list[Any]:
    """The registry's plug-in entry points, read from package metadata without loading them."""
    return list(entry_points(group=registry.entry_point_group))


def known_names(registry: Registry[Any]) -> set[str]:
    """Every name the registry answers to, without importing a component: the index, what is
    already registered in this process, and the names of the plug-ins' entry points (an entry
    point's name is its component's name)."""
    indexed = read_index().get(registry.kind, [])
    return set(indexed) | set(registry._items) | {ep.name for ep in plugin_entry_points(registry)}


def check_name(registry: Registry[Any], name: str) -> None:
    """Refuse an unknown name as :meth:`Registry.get` would, importing nothing."""
    if name not in known_names(registry):
        valid = ", ".join(sorted(known_names(registry)))
        raise UnknownNameError(f"unknown {registry.kind} {name!r}; valid names: {valid}")


def listing(
    registry: Registry[Any], describe: Callable[[str], dict[str, Any]] | None = None
) -> Listing:
    """The index's components, those registered in this process and the plug-ins (by name;
    an attack plug-in's facts through ``describe``, which runs it where attacks run)."""
    indexed = read_index().get(registry.kind, [])
    facts = dict(indexed) if isinstance(indexed, dict) else {}
    plugins = {ep.name for ep in plugin_entry_points(registry)}
    names = set(indexed) | set(registry._items) | plugins
    if registry is ATTACKS:
        for name, attack in registry._items.items():
            facts.setdefault(name, attack_facts(attack))
        for name in sorted(plugins - set(facts)):
            if describe is not None:
                facts[name] = describe(name)
    return Listing(sorted(names), facts)
