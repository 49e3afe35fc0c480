"""The configuration of a run: a YAML file, command-line overrides, and strict validation.

A run is a grid of cells, one per (attack, batch size); every cell runs ``trials`` trials against
the same victim, dataset, defense and threat model. Unknown keys are errors, never ignored.
With no file at all the defaults below are the quickstart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from leakbench.threat_model import Budget, Capability


class ConfigError(ValueError):
    """A configuration problem, reported as one line to the user."""


@dataclass
class RunConfig:
    dataset: str = "lfw-subset"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    model: str = "fcn"
    # Quickstart victim: FCN d-256-K with biases and sigmoid activations, DLG's activation; with
    # ReLU, L-BFGS drives iDLG's dummy into dead units. Dropped when another model is chosen.
    model_options: dict[str, Any] = field(
        default_factory=lambda: {"widths": [256], "activation_name": "sigmoid"}
    )
    model_seed: int = 0
    client_mode: str = "eval"  # victim mode on the client: "eval" or "train" (BatchNorm, dropout)
    attacks: list[str] = field(default_factory=lambda: ["bias", "idlg"])
    # Quickstart settings; options of attacks left out of a run are dropped unless given
    # explicitly (then they are an error, to catch typos).
    attack_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"idlg": {"iterations": 50}}
    )
    defense: str = "none"
    defense_options: dict[str, Any] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    trials: int = 4
    seed: int = 0
    grants: list[str] = field(default_factory=lambda: ["batch_size"])
    budget: dict[str, Any] = field(
        default_factory=lambda: {"max_iterations": None, "max_seconds": 60.0}
    )
    dtype: str = "float32"
    accelerator: str = "auto"  # Lightning accelerator: "cpu", "gpu", "auto", ...
    devices: int | str = "auto"  # Lightning devices; trials are sharded over them exactly
    # Where attacks run: "process" (a fresh worker per trial, isolated from the ground truth)
    # or "in-process" (debugging, overhead measurements; isolates nothing, recorded per trial).
    isolation: str = "process"
    threads: int | None = None  # intra-op threads per process; None: the cores / processes
    # Leaderboard verification: {seed, max_shift, flip, brightness} of a secret change of every
    # private sample (leakbench.protocol.private_transform); null for ordinary runs.
    private_transform: dict[str, Any] | None = None
    success_psnr: float = 30.0
    covariates: list[str] | None = None  # analyses recorded per trial; None = all registered
    output_dir: str = "runs"
    run_name: str | None = None
    logger: str = "wandb"  # "wandb" (+ CSV), "csv" or "none"
    wandb_project: str = "leakbench"
    # Set by `leakbench sweep`: every run of a grid in one W&B group, a job type per track.
    wandb_group: str | None = None
    wandb_job_type: str | None = None
    # Set by track files (leaderboards/tracks/*.yaml): name, kind, ranking metric, free keys.
    track: dict[str, Any] | None = None

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        defaults = cls()
        if "model" in values and "model_options" not in values and values["model"] != "fcn":
            values = {**values, "model_options": {}}
        if "attack_options" not in values and "attacks" in values:
            kept = {k: v for k, v in defaults.attack_options.items() if k in values["attacks"]}
            values = {**values, "attack_options": kept}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded)}")
            values.update(loaded)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values, source=str(path) if path else "command line")

    def validate(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, got {self.trials}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        if not self.attacks:
            raise ConfigError("attacks must name at least one attack")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.client_mode not in ("eval", "train"):
            raise ConfigError(f"client_mode must be 'eval' or 'train', got {self.client_mode!r}")
        if self.isolation not in ("process", "in-process"):
            raise ConfigError(
                f"isolation must be 'process' or 'in-process', got {self.isolation!r}"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ConfigError(f"threads must be a positive integer or null, got {self.threads!r}")
        if self.logger not in ("wandb", "csv", "none"):
            raise ConfigError(f"logger must be 'wandb', 'csv' or 'none', got {self.logger!r}")
        valid_grants = {c.value for c in Capability}
        bad = sorted(set(self.grants) - valid_grants)
        if bad:
            raise ConfigError(f"unknown grant(s) {bad}; valid: {', '.join(sorted(valid_grants))}")
        budget_keys = {f.name for f in fields(Budget)}
        if set(self.budget) - budget_keys:
            raise ConfigError(
                f"unknown budget key(s) {sorted(set(self.budget) - budget_keys)}; "
                f"valid: {', '.join(sorted(budget_keys))}"
            )
        unused = sorted(set(self.attack_options) - set(self.attacks))
        if unused:
            raise ConfigError(f"attack_options given for attacks not in the run: {unused}")

    def processes(self) -> int:
        """The number of processes the run's trials are sharded over (1 unless ``devices`` is
        a number above 1)."""
        return self.devices if isinstance(self.devices, int) and self.devices > 1 else 1

    @property
    def granted(self) -> frozenset[Capability]:
        return frozenset(Capability(g) for g in self.grants)

    @property
    def trial_budget(self) -> Budget:
        return Budget(**self.budget)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
