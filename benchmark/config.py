"""The configuration of a run: one typed dataclass, read from YAML files and command lines.

A run is a grid of cells, one per (attack, batch size); every cell runs ``trials`` trials against
the same victim, dataset, defense and threat model. :class:`RunConfig`'s fields are the single
source of truth: each is a config-file key and a ``leakbench run --key value`` option, typed and
documented once (the ``Args:`` section below is the option's help text), and validated by
jsonargparse from its type. Unknown keys are errors, never ignored. With no file at all the
defaults below are the quickstart.

This module imports no torch, so the command line can validate a run before loading it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import pickle
import re
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from leakbench.capabilities import Budget, Capability


class ConfigError(ValueError):
    """A configuration problem, reported as one line to the user."""


# Numbers typed on a command line arrive as text; in a file (or a mapping) a quoted "10" is a
# mistake worth naming, so the strict reading is the default and the CLI relaxes it.
_TEXT_NUMBERS = ContextVar("leakbench_text_numbers", default=False)


@contextmanager
def command_line_numbers() -> Iterator[None]:
    """Within this block, :class:`Count` values may be given as text (``--trials 10``)."""
    token = _TEXT_NUMBERS.set(True)
    try:
        yield
    finally:
        _TEXT_NUMBERS.reset(token)


class Count(int):
    """A positive whole number: 2.5, 0, true and (in a file) the string "10" are refused."""


def _read_count(value: Any) -> Count:
    if _TEXT_NUMBERS.get() and isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value  # a plain int, so saved configs and YAML dumps hold no subclass


def _register_types() -> None:
    from jsonargparse.typing import register_type

    register_type(Count, serializer=int, deserializer=_read_count)


# The capabilities a run may grant, read from the enum so that a new capability is a valid
# grant with no other edit.
GrantName = Literal[tuple(c.value for c in Capability)]  # type: ignore[valid-type]


@dataclass
class RunConfig:
    """One benchmark run: every (attack, batch size) cell, ``trials`` trials each.

    Args:
        dataset: Registered dataset (``leakbench list``).
        dataset_options: Keyword options of the dataset's datamodule.
        split: Split the private trial batches are drawn from.
        model: Registered victim model (``leakbench list``).
        model_options: Keyword options of the model builder. The quickstart's FCN d-256-K with
            sigmoid activations (DLG's; with ReLU, L-BFGS drives iDLG's dummy into dead units)
            is dropped when another model is chosen.
        model_seed: Seed of the victim's random initialisation.
        model_state: The victim's state: random (the initialisation of model_seed), random(N)
            (that of seed N), or the sha256 (or a unique prefix of 8 or more hex digits) of a
            checkpoint written by ``leakbench train``, checked against its card and hash.
        checkpoint_dir: Folder of the checkpoints; null: $LEAKBENCH_CHECKPOINTS or ./checkpoints.
        client_mode: Victim mode on the client: eval, or train (BatchNorm statistics, dropout).
        attacks: Registered attacks, one cell per attack and batch size.
        attack_options: Per attack, its keyword options. Quickstart options of attacks left out
            of a run are dropped unless given explicitly (then they are an error, to catch typos).
        defense: Registered defense the client applies before sharing its update.
        defense_options: Keyword options of the defense.
        client_protocol: How the client computes what it shares: fedsgd (the gradient of one
            batch), {name: fedavg, lr: 0.01, local_steps: 5, local_batch_size: 2} (the weight
            delta after local SGD steps; or local_epochs), or {name: aggregate, clients: 4,
            inner: fedsgd} (the sum of K clients' updates, as under secure aggregation; a
            trial then draws K times the batch size). The grant local_hyperparameters shows
            the attacker its parameters.
        batch_sizes: Client batch sizes, one cell per attack and batch size.
        trials: Trials (private batches) per cell.
        seed: Seed of the trial draw; the same seed gives the same records.
        grants: Capabilities granted to the attacks beyond the model and the shared update.
        budget: Compute budget of one trial.
        dtype: Floating-point type of the victim and the update.
        accelerator: Lightning accelerator: cpu, gpu, auto, ...
        devices: Lightning devices: a number of processes, auto, or a list of GPU indices; the
            trials are sharded over them exactly.
        isolation: Where attack code runs: sandbox (bubblewrap namespaces, nothing of the
            harness visible; the default, with a fallback to process, said once, where the
            machine cannot make one), process (a fresh worker process per job: isolated from
            the harness's objects, not a sandbox) or in-process (debugging; isolates nothing).
        threads: Intra-op threads per process; null: OMP_NUM_THREADS where set, else the cores
            this process may use (its affinity and cgroup quota) divided by the processes.
        private_transform: Leaderboard verification's secret change of every private sample
            ({seed, crop_scale, crop_ratio, rotation, flip, brightness, contrast, colour, blur,
            noise}: leakbench.protocol.private_transform); null for ordinary runs.
        success_psnr: PSNR (dB) at or above which a reconstructed sample counts as a success.
        privacy_metrics: Also score identifiability (IIP: is a reconstruction's nearest image
            in the split its own ground truth) and task leakage (does the dataset's reference
            classifier, trained once and cached in checkpoint_dir, give the true label).
        covariates: Analyses recorded per trial; null: every registered covariate.
        output_dir: Folder that receives the run folder.
        run_name: Name of the run folder; null: a timestamp.
        logger: wandb (offline unless configured, plus CSV), csv or none.
        wandb_project: W&B project of the run.
        wandb_group: W&B group (set by ``leakbench sweep``: every run of a grid in one group).
        wandb_job_type: W&B job type (set by ``leakbench sweep``: one per track).
        track: Set by track files (leaderboards/tracks/*.yaml): name, kind, ranking metric.
    """

    dataset: str = "lfw-subset"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    model: str = "fcn"
    model_options: dict[str, Any] = field(
        default_factory=lambda: {"widths": [256], "activation_name": "sigmoid"}
    )
    model_seed: int = 0
    model_state: str = "random"
    checkpoint_dir: str | None = None
    client_mode: Literal["eval", "train"] = "eval"
    attacks: list[str] = field(default_factory=lambda: ["bias", "idlg"])
    attack_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"idlg": {"iterations": 50}}
    )
    defense: str = "none"
    defense_options: dict[str, Any] = field(default_factory=dict)
    client_protocol: str | dict[str, Any] = "fedsgd"
    batch_sizes: list[Count] = field(default_factory=lambda: [1, 4])
    trials: Count = 4  # type: ignore[assignment]
    seed: int = 0
    grants: list[GrantName] = field(default_factory=lambda: ["batch_size"])
    budget: Budget = field(default_factory=lambda: Budget(max_iterations=None, max_seconds=60.0))
    dtype: Literal["float32", "float64"] = "float32"
    accelerator: str = "auto"
    devices: Count | Literal["auto"] | list[int] = "auto"
    isolation: Literal["sandbox", "process", "in-process"] = "sandbox"
    threads: Count | None = None
    private_transform: dict[str, Any] | None = None
    success_psnr: float = 30.0
    privacy_metrics: bool = True
    covariates: list[str] | None = None
    output_dir: str = "runs"
    run_name: str | None = None
    logger: Literal["wandb", "csv", "none"] = "wandb"
    wandb_project: str = "leakbench"
    wandb_group: str | None = None
    wandb_job_type: str | None = None
    track: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.budget, dict):
            self.budget = Budget(**self.budget)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """A validated configuration from the keys given (the others keep their defaults)."""
        defaults = cls()
        if "model" in values and "model_options" not in values and values["model"] != "fcn":
            values = {**values, "model_options": {}}
        if "attack_options" not in values and "attacks" in values:
            attacks = values["attacks"] if isinstance(values["attacks"], list) else []
            kept = {k: v for k, v in defaults.attack_options.items() if k in attacks}
            values = {**values, "attack_options": kept}
        return _validated_once(cls, values, source)

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
        """A file's configuration (or the quickstart's), with ``overrides`` on top."""
        values = read_yaml(path) if path is not None else {}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values, source=str(path) if path else "command line")

    def check(self) -> None:
        """What no single field's type can say."""
        if not self.attacks:
            raise ConfigError("attacks: got [], expected at least one attack")
        if not self.batch_sizes:
            raise ConfigError("batch_sizes: got [], expected at least one batch size, e.g. [1]")
        check_budget(self.budget)
        if self.run_name is not None and (
            self.run_name in ("", ".", "..") or "/" in self.run_name or "\0" in self.run_name
        ):
            raise ConfigError(
                f"run_name: got {self.run_name!r}, expected the name of one folder (no '/')"
            )
        unused = sorted(set(self.attack_options) - set(self.attacks))
        if unused:
            raise ConfigError(f"attack_options given for attacks not in the run: {unused}")

    def check_names(self) -> None:
        """Refuse an unregistered dataset, model, defense, attack or covariate, importing no
        component where the registry index can answer."""
        from leakbench.registry import (
            ATTACKS,
            COVARIATES,
            DATAMODULES,
            DEFENSES,
            MODELS,
            check_name,
        )

        check_name(DATAMODULES, self.dataset)
        check_name(MODELS, self.model)
        check_name(DEFENSES, self.defense)
        for attack in self.attacks:
            check_name(ATTACKS, attack)
        for covariate in self.covariates or ():
            check_name(COVARIATES, covariate)

    def processes(self) -> int:
        """The number of processes the run's trials are sharded over (1 unless ``devices`` is
        a number above 1)."""
        return self.devices if isinstance(self.devices, int) and self.devices > 1 else 1

    @property
    def granted(self) -> frozenset[Capability]:
        return frozenset(Capability(g) for g in self.grants)

    @property
    def trial_budget(self) -> Budget:
        return self.budget

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        # Plain ints and lists in saved files, never the Count subclass.
        values["batch_sizes"] = [int(b) for b in self.batch_sizes]
        values["trials"] = int(self.trials)
        values["threads"] = None if self.threads is None else int(self.threads)
        return values


def check_budget(budget: Budget) -> None:
    """Refuse a budget no trial can keep: seconds and iterations are positive, or null."""
    seconds, iterations = budget.max_seconds, budget.max_iterations
    if seconds is not None and not (0 < seconds < float("inf")):
        raise ConfigError(
            f"budget.max_seconds: got {seconds!r}, expected a positive number of seconds or null "
            "(no limit)"
        )
    if iterations is not None and iterations < 1:
        raise ConfigError(
            f"budget.max_iterations: got {iterations!r}, expected a positive integer or null "
            "(each attack's own count)"
        )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's mapping of keys; a missing file or bad YAML is one line naming file and
    line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8 "
            "text, expected a YAML file"
        ) from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses: no line
            where = f", offset {exc.position}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path} must hold a mapping of config keys, got a {type(loaded).__name__}"
        )
    return loaded


@functools.cache
def parser_for(cls: type) -> Any:
    """A jsonargparse parser of a dataclass's fields (types and help from the class)."""
    from jsonargparse import ArgumentParser

    _register_types()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True)
    return parser


def _top_level_items(text: str) -> list[str]:
    """``"a, dict[b, c], d"`` -> ``["a", "dict[b, c]", "d"]``: split on commas outside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [*items, current.strip()] if current.strip() else items


def _type_name(text: str) -> str:
    """A type as jsonargparse prints it, as a user reads it: ``<class 'int'>`` -> ``int``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("typing.", "")
    return "null" if text == "NoneType" else text


def one_line(error: BaseException) -> str:
    """jsonargparse's multi-line message as one line: ``key: expected ..., got ...``."""
    text = str(error).strip()
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if not match:
        return re.sub(r"\s*\n\s*", "; ", text)
    key, body = match.groups()
    own = re.search(r"Not of type \w+: (expected .*?)(?:\n|$)", body)
    if own:  # our own types say what they expected and what they got
        return f"{key}: {own.group(1)}"
    union = re.search(r"Subtypes: \[(.*)\]\n.*Given value: (.*)$", body, re.S)
    if union:
        kinds = " or ".join(_type_name(t) for t in _top_level_items(union.group(1)))
        return f"{key}: expected {kinds}, got {union.group(2).strip()}"
    single = re.search(r"Expected a (.*?)\. Got value: (.*)$", body, re.S)
    if single:
        expected = single.group(1).replace("<class '", "").replace("'>", "")
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", expected)
        expected = f"one of {literal.group(1)}" if literal else f"a {expected}"
        return f"{key}: expected {expected}, got {single.group(2).strip()}"
    return f"{key}: " + re.sub(r"\s*\n\s*", "; ", body.strip())


def _holds_any(annotation: Any) -> bool:
    return annotation is Any or any(_holds_any(a) for a in typing.get_args(annotation))


@functools.cache
def _free_form_fields(cls: type) -> frozenset[str]:
    """The fields of a dataclass whose type holds ``Any`` somewhere (``dict[str, Any]``, ...)."""
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in fields(cls) if _holds_any(hints[f.name]))


def validated(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """An instance of the dataclass ``cls`` from ``values``, every key and type checked."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    values = {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
        for k, v in values.items()
    }
    try:
        # On a copy: jsonargparse edits the mappings it is given.
        namespace = parser_for(cls).parse_object(copy.deepcopy(values))
    except Exception as exc:  # jsonargparse's ArgumentError; one line, naming the key
        raise ConfigError(f"{source}: {one_line(exc)}") from None
    checked = namespace.as_dict()
    # Free-form values (typed with Any: options, the track block) are kept as given: jsonargparse
    # would read every string in them as YAML ("1" -> 1, "a: b" -> {"a": "b"}).
    for key in _free_form_fields(cls) & set(values):
        checked[key] = values[key]
    instance = cls(**{k: checked[k] for k in known})
    if hasattr(instance, "check"):
        instance.check()
    return instance


# Configurations validated in this process, by their pickled inputs: jsonargparse takes about
# 0.1 s a configuration, and a board of entries validates each track several times.
_VALIDATED: dict[bytes, Any] = {}


def _validated_once(cls: type, values: dict[str, Any], source: str) -> Any:
    """:func:`validated`, each distinct input once per process; every caller gets its own copy.
    Refusals are not kept: they raise again."""
    try:
        key = pickle.dumps((cls, values, source, _TEXT_NUMBERS.get()))
    except Exception:  # values that do not pickle are validated each time
        return validated(cls, values, source)
    if key not in _VALIDATED:
        _VALIDATED[key] = validated(cls, values, source)
    return copy.deepcopy(_VALIDATED[key])


def check_output_folder(path: str | Path, key: str = "output_dir") -> None:
    """Refuse, before anything runs, a folder that cannot be created or written: below a
    regular file, on a read-only file system, or with a name or path longer than the file
    system allows. Leaves nothing behind."""
    folder = Path(path).absolute()
    existing = _deepest_existing(path, folder, key)
    if not existing.is_dir():
        raise ConfigError(
            f"{key}: {str(path)!r} cannot be created: {existing} is a regular file, "
            "expected a folder"
        )
    try:
        # A real write (not os.access, which says yes to root on a read-only mount).
        os.rmdir(tempfile.mkdtemp(prefix=".leakbench-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(
            f"{key}: {str(path)!r} is not writable ({exc.strerror} in {existing}), "
            "expected a writable folder"
        ) from None


# What a run writes inside its folder needs room below the path limit (figures/<cell>.png).
_ROOM_INSIDE = 128


def _deepest_existing(given: str | Path, folder: Path, key: str) -> Path:
    """The deepest existing folder on the way to ``folder``, once every name on the way fits
    the file system (``PC_NAME_MAX``) and so does the whole path (``PC_PATH_MAX``)."""
    shown = str(given) if len(str(given)) <= 60 else f"{str(given)[:40]}...{str(given)[-12:]}"
    existing, found = Path(folder.anchor), True
    for part in folder.parts[1:]:
        limit = os.pathconf(existing, "PC_NAME_MAX") if existing.is_dir() else 255
        size = len(os.fsencode(part))
        if size > limit:
            raise ConfigError(
                f"{key}: {shown!r} holds a name of {size} bytes, longer than the file system "
                f"allows; expected at most {limit} bytes per name"
            )
        found = found and (existing / part).exists()
        existing = existing / part if found else existing
    path_max = os.pathconf(existing, "PC_PATH_MAX") if existing.is_dir() else 4096
    size = len(os.fsencode(str(folder)))
    if size + _ROOM_INSIDE > path_max:
        raise ConfigError(
            f"{key}: {shown!r} is a path of {size} bytes, longer than the file system allows "
            f"for a run folder; expected at most {path_max - _ROOM_INSIDE} bytes"
        )
    return existing


# What config.yaml records next to the configuration (facts of the machine and the data).
RECORDED_FACTS = ("environment", "datamodule", "lpips", "task_leakage", "sandbox", "attacks_run")
# Keys that may differ when a run is resumed: they change how it runs, not what it measures.
NOT_PROTOCOL_KEYS = frozenset(
    {
        "logger",
        "wandb_project",
        "wandb_group",
        "wandb_job_type",
        "output_dir",
        "run_name",
        "threads",
        "isolation",
        "devices",
    }
)


def saved_config(run_path: Path) -> RunConfig:
    """The configuration a run folder was started with."""
    from leakbench.results import RunDirectory

    saved = RunDirectory(run_path).read_config() if run_path.is_dir() else None
    if saved is None:
        raise ConfigError(f"cannot resume {run_path}: it holds no config.yaml")
    values = {k: v for k, v in saved.items() if k not in RECORDED_FACTS}
    return RunConfig.from_mapping(values, source=str(run_path / "config.yaml"))


def protocol_differences(saved: RunConfig, config: RunConfig) -> list[str]:
    """The keys on which two configurations differ in what they measure."""
    a, b = saved.to_dict(), config.to_dict()
    return sorted(k for k in a if k not in NOT_PROTOCOL_KEYS and a[k] != b.get(k))
