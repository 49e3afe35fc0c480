"""Registries: one per kind of component, filled by decorators and by entry points.

Built-in components register themselves when their module is imported; every module of the
built-in packages (``leakbench.attacks``, ``leakbench.models``, ...) is imported the first time a
registry is read. A third-party package registers its own components without editing leakbench
by declaring an entry point in its ``pyproject.toml``::

    [project.entry-points."leakbench.attacks"]
    my_attack = "my_package.my_attack"            # a module whose import registers it
    other = "my_package.attacks:OtherAttack"      # or an object, registered under "other"
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Generic, TypeVar

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
