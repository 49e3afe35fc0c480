"""Defense tracks: privacy against utility, per defense setting, under one fixed protocol.

A defense track is a run configuration (dataset, victim and its trained state, batch size,
grants, budget) plus a list of defense settings and a utility recipe (``track.defenses``,
``track.utility`` in the track file). For every setting the track reports

* privacy: the worst case over every registered attack that can run under the track's grants
  on this victim and batch size: the largest median PSNR and the largest success rate, each with
  the attack that achieved it. Every setting is attacked on the same trained victim (the
  undefended one, trained by the utility recipe's first seed), so the settings differ only in
  what the client shares;
* utility: the test accuracy of a victim trained with the defense active at every step, for the
  recipe's epochs and seeds, next to the undefended victim's.

Steps, as :func:`run_defense_track` runs them:

1. the victim the attacks see is trained (or found in the checkpoint cache) without a defense;
2. the applicable attacks are found: grants, batch-size limit, victim and client protocol;
3. each defense setting is one ordinary run (``leakbench run``'s runner, records and summary)
   with every applicable attack, in a sub-folder of the track's folder;
4. each setting's victims are trained with the defense, one per seed, and tested;
5. the privacy–utility table (JSON, CSV, Markdown) and its scatter plot are written, and logged
   to W&B when the track's logger is W&B.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leakbench.config import ConfigError, RunConfig, read_yaml


@dataclass(frozen=True)
class DefenseSetting:
    """One row of the table: a registered defense with its options, under a readable label."""

    label: str
    defense: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The setting's folder name."""
        return re.sub(r"[^a-z0-9.=-]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class UtilityRecipe:
    """How every setting's victims are trained for the utility column (and, with the first
    seed and no defense, the victim every setting is attacked on)."""

    epochs: int = 5
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "adam"


@dataclass(frozen=True)
class DefenseTrack:
    """A defense track: the run configuration every setting shares, and the settings."""

    base: dict[str, Any]  # RunConfig keys, without defense / defense_options / attacks
    settings: tuple[DefenseSetting, ...]
    utility: UtilityRecipe
    attacks: tuple[str, ...] | None  # None: every registered attack

    @property
    def name(self) -> str:
        return str(self.base["track"]["name"])

    @classmethod
    def load(cls, path: str | Path) -> DefenseTrack:
        """Read a track file whose ``track.kind`` is ``defense``; refuse what does not fit."""
        path = Path(path)
        values = read_yaml(path)
        track = values.get("track") or {}
        if track.get("kind") != "defense":
            raise ConfigError(
                f"{path}: track.kind is {track.get('kind')!r}, expected 'defense' for a defense "
                "track (attack tracks run with `leakbench run --config`)"
            )
        for key in ("defense", "defense_options"):
            if key in values:
                raise ConfigError(
                    f"{path}: {key!r} is set per setting in track.defenses, not at the top level"
                )
        settings = []
        for i, entry in enumerate(track.get("defenses") or []):
            unknown = sorted(set(entry) - {"label", "defense", "options"})
            if unknown or "defense" not in entry:
                raise ConfigError(
                    f"{path}: track.defenses[{i}] = {entry!r}; expected keys defense, options, "
                    "label"
                )
            settings.append(
                DefenseSetting(
                    str(entry.get("label", entry["defense"])),
                    entry["defense"],
                    dict(entry.get("options") or {}),
                )
            )
        if not settings:
            raise ConfigError(f"{path}: track.defenses lists no defense setting")
        slugs = [s.slug for s in settings]
        if len(set(slugs)) != len(slugs):
            raise ConfigError(f"{path}: two defense settings share a label: {slugs}")
        try:
            utility = UtilityRecipe(
                **{
                    k: tuple(v) if k == "seeds" else v
                    for k, v in (track.get("utility") or {}).items()
                }
            )
        except TypeError as exc:
            raise ConfigError(f"{path}: track.utility: {exc}") from None
        attacks = track.get("attacks", "all")
        base = {k: v for k, v in values.items() if k != "attacks"}
        return cls(
            base=base,
            settings=tuple(settings),
            utility=utility,
            attacks=None if attacks == "all" else tuple(attacks),
        )


@dataclass(frozen=True)
class WorstCase:
    """The strongest attack on one defense setting, by each privacy measure."""

    psnr_median: float | None
    psnr_attack: str | None
    success_rate: float | None
    success_attack: str | None
    attacks: tuple[str, ...]  # the attacks that ran


def worst_case(cells: Mapping[str, Mapping[str, Any]]) -> WorstCase:
    """The worst case for the client over the cells (``summary.json``'s ``cells``) of one
    defense setting: the largest median PSNR and the largest success rate, each with its attack.

    A cell without a score (every trial failed before scoring) cannot be the worst case; ties go
    to the attack whose name sorts first, so the table does not depend on the order of cells.
    """
    by_attack = sorted(cells.values(), key=lambda c: c["attack"])

    def strongest(score: Any) -> tuple[float | None, str | None]:
        scored = [(score(c), c["attack"]) for c in by_attack if score(c) is not None]
        if not scored:
            return None, None
        best = max(value for value, _ in scored)
        return best, next(attack for value, attack in scored if value == best)

    psnr, psnr_attack = strongest(lambda c: c["psnr"]["median"])
    success, success_attack = strongest(lambda c: c["success_rate"])
    return WorstCase(
        psnr, psnr_attack, success, success_attack, tuple(c["attack"] for c in by_attack)
    )


@dataclass
class SettingResult:
    """One row of the privacy–utility table."""

    label: str
    defense: str
    options: dict[str, Any]
    worst: WorstCase
    accuracy: list[float]  # one per utility seed
    undefended_accuracy: list[float]
    run_dir: str
    defense_report: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_mean(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)

    def row(self) -> dict[str, Any]:
        undefended = sum(self.undefended_accuracy) / len(self.undefended_accuracy)
        return {
            "setting": self.label,
            "defense": self.defense,
            "options": self.options,
            "worst_psnr_median": self.worst.psnr_median,
            "worst_psnr_attack": self.worst.psnr_attack,
            "worst_success_rate": self.worst.success_rate,
            "worst_success_attack": self.worst.success_attack,
            "attacks": list(self.worst.attacks),
            "accuracy": self.accuracy_mean,
            "accuracy_per_seed": self.accuracy,
            "undefended_accuracy": undefended,
            "accuracy_change": self.accuracy_mean - undefended,
            "defense_report": self.defense_report,
            "run_dir": self.run_dir,
        }


def applicable_attacks(
    config: RunConfig, candidates: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """The attacks of ``candidates`` that can run on the track's victim, batch sizes, grants
    and client protocol, and for each of the others the reason it cannot."""
    from leakbench.interfaces import UnsupportedModelError
    from leakbench.protocol.attack import UnsupportedClientProtocol
    from leakbench.runner import prepare
    from leakbench.threat_model import RequirementsNotGranted

    runnable: list[str] = []
    reasons: dict[str, str] = {}
    for name in candidates:
        options = {k: v for k, v in config.attack_options.items() if k == name}
        # Only the checks: no gallery or reference classifier is needed to refuse an attack.
        single = RunConfig.from_mapping(
            {
                **config.to_dict(),
                "attacks": [name],
                "attack_options": options,
                "privacy_metrics": False,
            }
        )
        try:
            prepared = prepare(single)
        except (RequirementsNotGranted, UnsupportedModelError, UnsupportedClientProtocol) as exc:
            reasons[name] = str(exc)
            continue
        limit = prepared.attacks[name].max_batch_size
        if limit is not None and min(config.batch_sizes) > limit:
            reasons[name] = f"handles batches of at most {limit}"
            continue
        runnable.append(name)
    return runnable, reasons


def with_training_accounting(
    setting: DefenseSetting, utility: UtilityRecipe, train_size: int
) -> DefenseSetting:
    """A DP setting given by its ``epsilon`` is that ε for the utility training: its sampling
    rate and step count are filled in from the recipe (q = B/N, T = epochs · ⌈N/B⌉) unless the
    track states them, so the attacked round uses the noise multiplier that training used."""
    if "epsilon" not in setting.options:
        return setting
    options = {
        "sample_rate": utility.batch_size / train_size,
        "steps": utility.epochs * math.ceil(train_size / utility.batch_size),
        **setting.options,
    }
    return DefenseSetting(setting.label, setting.defense, options)


def run_defense_track(
    track: DefenseTrack,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[SettingResult]:
    """Run every setting of ``track`` (see the module docstring); returns the table's rows,
    also written to ``<output_dir>/<track name>/privacy_utility.{json,csv,md,png}``.

    A setting whose run folder already holds trials of the same configuration skips them (the
    runner continues a folder of its own configuration), so an interrupted track picks up where
    it stopped; trained victims are found in the checkpoint cache."""
    from leakbench.models.training import default_checkpoint_dir, trained_once
    from leakbench.registry import ATTACKS, DATAMODULES
    from leakbench.runner import run

    started = time.perf_counter()
    base = dict(track.base)
    folder = Path(output_dir or base.get("output_dir", "runs")) / (
        base.get("run_name") or track.name
    )
    checkpoints = Path(base.get("checkpoint_dir") or default_checkpoint_dir())
    candidates = list(track.attacks or ATTACKS.names())
    # The shared configuration is checked once, before anything is trained or written.
    config = RunConfig.from_mapping(
        {**base, "attacks": candidates, "output_dir": str(folder), "run_name": "none"},
        source=f"track {track.name}",
    )
    train_size = len(DATAMODULES.get(config.dataset)(**config.dataset_options).samples("train"))
    settings = [with_training_accounting(s, track.utility, train_size) for s in track.settings]

    # 1. The attacked victim: trained without a defense, with the recipe's first seed.
    recipe = {
        "model_options": dict(config.model_options),
        "dataset_options": dict(config.dataset_options),
        "epochs": track.utility.epochs,
        "batch_size": track.utility.batch_size,
        "lr": track.utility.lr,
        "optimizer": track.utility.optimizer,
    }

    def trained(setting: DefenseSetting | None, seed: int) -> Any:
        undefended = setting is None or (setting.defense == "none" and not setting.options)
        defense = (
            {} if undefended else {"defense": setting.defense, "defense_options": setting.options}
        )
        return trained_once(
            config.model,
            config.dataset,
            checkpoint_dir=checkpoints,
            seed=seed,
            **recipe,
            **defense,
        )

    victim = trained(None, track.utility.seeds[0])
    echo(
        f"victim: {config.model} trained on {config.dataset} ({track.utility.epochs} epochs, "
        f"seed {track.utility.seeds[0]}), checkpoint {victim.checkpoint.sha256[:16]}, "
        f"test accuracy {victim.test_accuracy:.3f}"
    )
    attacked = {
        **config.to_dict(),
        "model_state": victim.checkpoint.sha256,
        "checkpoint_dir": str(checkpoints),
    }

    # 2. The attacks that apply.
    attacks, not_applicable = applicable_attacks(
        RunConfig.from_mapping(attacked, source=f"track {track.name}"), candidates
    )
    for name, reason in not_applicable.items():
        echo(f"not applicable: {name}: {reason}")
    if not attacks:
        raise ConfigError(f"track {track.name}: no registered attack can run under its grants")

    undefended = [trained(None, seed).test_accuracy for seed in track.utility.seeds]
    results: list[SettingResult] = []
    for setting in settings:
        # 3. Privacy: one ordinary run per setting, every applicable attack.
        values = {
            **attacked,
            "attacks": attacks,
            "attack_options": {k: v for k, v in config.attack_options.items() if k in attacks},
            "defense": setting.defense,
            "defense_options": setting.options,
            "run_name": setting.slug,
        }
        setting_config = RunConfig.from_mapping(values, source=f"track {track.name}")
        run_path = folder / setting.slug
        echo(f"setting {setting.label}: {', '.join(attacks)}")
        summary = run(setting_config, progress=progress, echo=echo)
        # 4. Utility: victims trained with the defense.
        accuracy = [trained(setting, seed).test_accuracy for seed in track.utility.seeds]
        results.append(
            SettingResult(
                label=setting.label,
                defense=setting.defense,
                options=setting.options,
                worst=worst_case(summary["cells"]),
                accuracy=accuracy,
                undefended_accuracy=undefended,
                run_dir=str(run_path),
                defense_report=_first_defense_report(run_path),
            )
        )

    # 5. The table and its figure.
    write_table(results, folder, track, not_applicable, time.perf_counter() - started)
    if config.logger == "wandb":
        log_table_to_wandb(folder, track, config)
    echo(format_table(results))
    echo(f"privacy-utility table: {folder / 'privacy_utility.md'}")
    return results


def _first_defense_report(run_path: Path) -> dict[str, Any]:
    """What the defense reported in the setting's first trial (its ε, say): the same in every
    trial of a setting, since it describes the defense, not the batch."""
    from leakbench.results import RunDirectory

    for record in RunDirectory(run_path).records():
        if record.get("defense_report"):
            return dict(record["defense_report"])
    return {}


def format_table(results: Sequence[SettingResult]) -> str:
    """The privacy–utility table as Markdown."""
    lines = [
        "| setting | worst median PSNR (attack) | worst success rate (attack) | accuracy "
        "| vs undefended | DP ε |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        row = result.row()
        psnr = row["worst_psnr_median"]
        success = row["worst_success_rate"]
        epsilon = row["defense_report"].get("epsilon")  # DP defenses: over the utility training
        lines.append(
            f"| {row['setting']} "
            f"| {'-' if psnr is None else f'{psnr:.1f} dB'} ({row['worst_psnr_attack']}) "
            f"| {'-' if success is None else f'{success:.2f}'} ({row['worst_success_attack']}) "
            f"| {row['accuracy']:.3f} | {row['accuracy_change']:+.3f} "
            f"| {'-' if epsilon is None else f'{epsilon:.2f}'} |"
        )
    return "\n".join(lines)


def write_table(
    results: Sequence[SettingResult],
    folder: Path,
    track: DefenseTrack,
    not_applicable: Mapping[str, str],
    seconds: float,
) -> None:
    """``privacy_utility.json`` (everything), ``.csv``, ``.md`` and the scatter ``.png``."""
    from leakbench.figures import privacy_utility_figure
    from leakbench.results import atomic_write_bytes, atomic_write_text

    rows = [r.row() for r in results]
    document = {
        "track": track.name,
        "utility": asdict(track.utility),
        "rows": rows,
        "not_applicable": dict(not_applicable),
        "wall_s": seconds,
    }
    atomic_write_text(folder / "privacy_utility.json", json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    columns = [k for k in rows[0] if k not in ("options", "attacks", "defense_report")]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "privacy_utility.csv", buffer.getvalue())
    atomic_write_text(folder / "privacy_utility.md", format_table(results) + "\n")
    atomic_write_bytes(folder / "privacy_utility.png", privacy_utility_figure(rows, track.name))


def log_table_to_wandb(folder: Path, track: DefenseTrack, config: RunConfig) -> None:
    """The table and the scatter as one W&B run of the track's group (offline unless the user
    configured W&B); each setting's own run logs its cells as ``leakbench run`` does."""
    import wandb

    from leakbench.evaluator import figure_pixels
    from leakbench.runner import wandb_configured

    document = json.loads((folder / "privacy_utility.json").read_text())
    columns = [k for k in document["rows"][0] if k not in ("options", "attacks", "defense_report")]
    run = wandb.init(
        project=config.wandb_project,
        name=f"{track.name}-privacy-utility",
        group=config.wandb_group or track.name,
        job_type="defense-track",
        dir=str(folder),
        # What the user configured decides (WANDB_MODE, a login); without it, offline.
        mode=None if wandb_configured() else "offline",
        config={"track": track.name, "utility": document["utility"]},
    )
    table = wandb.Table(
        columns=columns,
        data=[
            [json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in columns]
            for r in document["rows"]
        ],
    )
    run.log(
        {
            "privacy_utility": table,
            "privacy_utility_scatter": wandb.Image(figure_pixels(folder / "privacy_utility.png")),
        }
    )
    run.summary.update({"rows": document["rows"], "wall_s": document["wall_s"]})
    run.finish()
