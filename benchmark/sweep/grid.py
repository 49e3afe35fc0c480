"""The grid file and its expansion into runs: the axis registry (``axis``), one ``PlannedRun`` per
combination of axis values (``load_grid``), and the checks made before anything is launched
(``check_grid``). The format of a grid file is in the package's overview (``leakbench.sweep``)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leakbench.config import ConfigError, RunConfig

GRID_KEYS = ("name", "base", "set", "axes", "output_dir", "resources")
# Keys the sweep decides for every run; a grid may not set them.
SWEEP_OWNED_KEYS = ("output_dir", "run_name", "wandb_group", "wandb_job_type")
RESOURCE_KEYS = (
    "partition",
    "time_min",
    "cpus_per_task",
    "gpus_per_node",
    "mem_gb",
    "array_parallelism",
    "account",
    "qos",
    "constraint",
    "setup",
    "signal_delay_s",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")

# Axes are registered in the order their labels appear in a run's folder name.


@dataclass(frozen=True)
class Choice:
    """One value of one axis: the label it adds to a run's name and how it changes the config."""

    label: str
    apply: Callable[[dict[str, Any]], dict[str, Any]]
    base: Path | None = None  # the tracks axis: the file this run starts from


@dataclass(frozen=True)
class GridContext:
    path: Path  # the grid file, for messages and for paths relative to it


@dataclass(frozen=True)
class Axis:
    choice: Callable[[Any, GridContext], Choice]  # one value of the axis → a Choice
    # An axis may accept a word for "every value" (tracks: all); None: a list is required.
    every: Callable[[GridContext], list[Any]] | None = None


AXES: dict[str, Axis] = {}


def axis(
    name: str, every: Callable[[GridContext], list[Any]] | None = None
) -> Callable[[Callable[[Any, GridContext], Choice]], Callable[[Any, GridContext], Choice]]:
    """Decorator: register the function that turns one value of axis ``name`` into a Choice."""

    def register(
        choice: Callable[[Any, GridContext], Choice],
    ) -> Callable[[Any, GridContext], Choice]:
        if name in AXES:
            raise ValueError(f"sweep axis {name!r} is already registered")
        AXES[name] = Axis(choice, every)
        return choice

    return register


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]


def _component(value: Any, kind: str, registry: Any, extra: Sequence[str] = ()) -> dict[str, Any]:
    """A component value: a registered name, or {name, options, label, *extra}."""
    entry = {"name": value} if isinstance(value, str) else value
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"a {kind} is a name or a mapping with a 'name', got {value!r}")
    allowed = ("name", "options", "label", *extra)
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {kind} {entry['name']!r}; "
            f"valid: {', '.join(allowed)}"
        )
    try:
        registry.get(entry["name"])
    except KeyError as exc:  # the registry's message names the valid ones
        raise ConfigError(str(exc)) from None
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"options of {kind} {entry['name']!r} must be a mapping")
    label = entry.get("label")
    if label is None:
        label = entry["name"] + (f"-{_digest(options)}" if options else "")
    return {**entry, "options": options, "label": str(label)}


def _tracks_dir() -> Path:
    from leakbench.leaderboard import TRACKS

    return Path(TRACKS)


def _every_track(context: GridContext) -> list[Any]:
    return sorted(p.stem for p in _tracks_dir().glob("*.yaml"))


@axis("tracks", every=_every_track)
def _tracks(value: Any, context: GridContext) -> Choice:
    if not isinstance(value, str):
        raise ConfigError(f"a track is a track name or a file, got {value!r}")
    path = _resolve_base(value, context)
    loaded = _read_mapping(path)
    label = (loaded.get("track") or {}).get("name") or path.stem
    return Choice(str(label), lambda c: c, base=path)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return value


@axis("datasets")
def _datasets(value: Any, context: GridContext) -> Choice:
    from leakbench.registry import DATAMODULES

    entry = _component(value, "dataset", DATAMODULES, extra=("split",))
    changes = {"dataset": entry["name"], "dataset_options": entry["options"]}
    if "split" in entry:
        changes["split"] = entry["split"]
    return Choice(entry["label"], lambda c: {**c, **changes})


@axis("models")
def _models(value: Any, context: GridContext) -> Choice:
    from leakbench.registry import MODELS

    entry = _component(value, "model", MODELS, extra=("seed", "client_mode"))
    changes: dict[str, Any] = {"model": entry["name"], "model_options": entry["options"]}
    label = entry["label"]
    if "seed" in entry:  # the victim's state: its seeded initialisation
        changes["model_seed"] = entry["seed"]
        label += f"-init{entry['seed']}" if "label" not in entry else ""
    if "client_mode" in entry:
        changes["client_mode"] = entry["client_mode"]
        label += f"-{entry['client_mode']}" if "label" not in entry else ""
    return Choice(label, lambda c: {**c, **changes})


@axis("model_seeds")
def _model_seeds(value: Any, context: GridContext) -> Choice:
    seed = _integer(value, "a model seed")
    return Choice(f"init{seed}", lambda c: {**c, "model_seed": seed})


@axis("defenses")
def _defenses(value: Any, context: GridContext) -> Choice:
    from leakbench.registry import DEFENSES

    entry = _component(value, "defense", DEFENSES)
    return Choice(
        entry["label"],
        lambda c: {**c, "defense": entry["name"], "defense_options": entry["options"]},
    )


@axis("attacks")
def _attacks(value: Any, context: GridContext) -> Choice:
    from leakbench.registry import ATTACKS

    entries = [
        _component(v, "attack", ATTACKS) for v in (value if isinstance(value, list) else [value])
    ]
    names = [e["name"] for e in entries]

    def apply(config: dict[str, Any]) -> dict[str, Any]:
        # Options the base gave for these attacks stay; those of attacks left out are dropped.
        kept = {k: v for k, v in (config.get("attack_options") or {}).items() if k in names}
        kept.update({e["name"]: e["options"] for e in entries if e["options"]})
        return {**config, "attacks": names, "attack_options": kept}

    return Choice("+".join(e["label"] for e in entries), apply)


@axis("batch_sizes")
def _batch_sizes(value: Any, context: GridContext) -> Choice:
    sizes = [_integer(v, "a batch size") for v in (value if isinstance(value, list) else [value])]
    return Choice("b" + "-".join(map(str, sizes)), lambda c: {**c, "batch_sizes": sizes})


@axis("seeds")
def _seeds(value: Any, context: GridContext) -> Choice:
    seed = _integer(value, "a seed")
    return Choice(f"seed{seed}", lambda c: {**c, "seed": seed})


def _resolve_base(value: str, context: GridContext) -> Path:
    """A base file: absolute, next to the grid file, under the working directory, or a track."""
    candidates = [Path(value), context.path.parent / value, _tracks_dir() / f"{value}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = ", ".join(_every_track(context))
    raise ConfigError(f"no config or track file {value!r}; known tracks: {known}")


def _read_mapping(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


@dataclass
class PlannedRun:
    """One run of a grid: its folder name, its full configuration, the axis labels it came from."""

    name: str
    config: RunConfig
    labels: dict[str, str]

    @property
    def path(self) -> Path:
        return Path(self.config.output_dir) / self.name


@dataclass
class Grid:
    name: str
    path: Path
    output_dir: Path
    runs: list[PlannedRun]
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def submitit_folder(self) -> Path:
        return self.output_dir / ".submitit"


def load_grid(path: str | Path, check: bool = True) -> Grid:
    """Read and expand a grid file; with ``check``, every run is also prepared (registries,
    options, grants, victims, batch sizes) so that nothing is launched from a bad grid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    raw = _read_mapping(path)
    context = GridContext(path)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(GRID_KEYS)}"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: 'name' must be a word of letters, digits, '.', '_' or '-'")
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: 'set' must be a mapping of config keys")
    owned = sorted(set(settings) & set(SWEEP_OWNED_KEYS))
    if owned:
        raise ConfigError(f"{path}: set: {', '.join(owned)} are decided by the sweep")
    resources = raw.get("resources") or {}
    bad = sorted(set(resources) - set(RESOURCE_KEYS)) if isinstance(resources, dict) else ["?"]
    if bad:
        raise ConfigError(
            f"{path}: unknown resource(s) {', '.join(map(repr, bad))}; "
            f"valid: {', '.join(RESOURCE_KEYS)}"
        )
    output_dir = Path(raw.get("output_dir") or Path("runs") / "sweeps" / name).resolve()

    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: 'axes' must map axis names to lists of values")
    unknown = [key for key in axes if key not in AXES]
    if unknown:
        raise ConfigError(
            f"{path}: unknown axis {unknown[0]!r}; valid axes: {', '.join(sorted(AXES))}"
        )
    choices: list[list[tuple[str, Choice]]] = []
    # In the registry's order, not the file's: reordering a grid file renames no run folder.
    for key in (key for key in AXES if key in axes):
        values = axes[key]
        if values == "all" and AXES[key].every is not None:
            values = AXES[key].every(context)  # type: ignore[misc]
        if not isinstance(values, list) or not values:
            hint = " (or 'all')" if AXES[key].every is not None else ""
            raise ConfigError(f"{path}: axes.{key} must be a non-empty list{hint}")
        parsed = []
        for i, value in enumerate(values):
            try:
                parsed.append((key, AXES[key].choice(value, context)))
            except ConfigError as exc:
                raise ConfigError(f"{path}: axes.{key}[{i}]: {exc}") from None
        choices.append(parsed)
    if "tracks" in axes and raw.get("base") is not None:
        raise ConfigError(f"{path}: give a base or a tracks axis, not both")
    base = _resolve_base(raw["base"], context) if raw.get("base") is not None else None

    runs: list[PlannedRun] = []
    for combination in itertools.product(*choices):
        start = next((c.base for _, c in combination if c.base is not None), base)
        values: dict[str, Any] = _read_mapping(start) if start is not None else {}
        values.update(settings)
        for _, choice in combination:
            values = choice.apply(values)
        labels = {key: choice.label for key, choice in combination}
        run_name = "__".join(labels.values()) or (start.stem if start else name)
        run_name = re.sub(r"[^A-Za-z0-9._+=-]", "-", run_name)
        track = values.get("track") or {}
        values.update(
            output_dir=str(output_dir),
            run_name=run_name,
            wandb_group=name,
            wandb_job_type=track.get("name") or (start.stem if start else name),
        )
        try:
            config = RunConfig.from_mapping(values, source=f"{path} (run {run_name})")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
        except TypeError as exc:
            raise ConfigError(f"{path} (run {run_name}): {exc}") from None
        runs.append(PlannedRun(run_name, config, labels))
    duplicates = sorted({r.name for r in runs if sum(s.name == r.name for s in runs) > 1})
    if duplicates:
        raise ConfigError(
            f"{path}: several runs would share the folder name(s) {', '.join(duplicates)}; "
            "give the values distinct labels"
        )
    grid = Grid(name, path, output_dir, runs, dict(resources))
    if check:
        check_grid(grid)
    return grid


def check_grid(grid: Grid) -> None:
    """Refuse, in one line, any run that would be refused when it starts: a bad component or
    option, a missing grant, a victim an attack cannot handle, or a run folder that holds a run
    of another configuration (a changed grid is refused, not merged)."""
    from leakbench.runner import prepare, protocol_differences, saved_config

    for run in grid.runs:
        try:
            prepare(run.config)
        except (ValueError, KeyError, TypeError, FileNotFoundError, NotImplementedError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ConfigError(f"{grid.path} (run {run.name}): {message}") from None
    changed = []
    for run in grid.runs:
        if (run.path / "config.yaml").is_file():
            differing = protocol_differences(saved_config(run.path), run.config)
            if differing:
                changed.append(f"{run.name} ({', '.join(differing)})")
    if changed:
        raise ConfigError(
            f"{grid.path}: run folder(s) in {grid.output_dir} hold runs of another "
            f"configuration: {'; '.join(changed)}; refused, not merged (rename the grid, set "
            "its output_dir, or move the old folders away)"
        )


def expected_trials(config: RunConfig) -> int:
    """Trials a complete run records: every (attack, batch size) cell the attack can handle."""
    from leakbench.registry import ATTACKS, listing

    # The index's facts of the built-in attacks: counting trials imports no attack (no torch).
    facts = listing(ATTACKS).attack_facts
    cells = 0
    for name in config.attacks:
        limit = facts[name]["max_batch_size"] if name in facts else ATTACKS.get(name).max_batch_size
        cells += sum(limit is None or b <= limit for b in config.batch_sizes)
    return cells * config.trials
