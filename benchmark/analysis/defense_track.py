"""Defense tracks: privacy against utility, per defense setting, under one fixed protocol.

A defense track is a run configuration (dataset, victim architecture, ONE client batch size,
client protocol, grants, trial budget) plus a list of defense settings and a training recipe
(``track.defenses``, ``track.utility`` in the track file). Every setting is measured at the same
operating point for privacy and utility:

* its victims are trained with the defense active at every step, at the batch size behind one
  shared update (B; K·B for an aggregate of K clients), one per seed of the recipe; the attacked
  victim is the one of the first seed, so each setting is attacked on the model that defense
  produced;
* privacy: every generic registered attack that can run under the track's grants, plus the
  adaptive attacks the setting's defense names (``Defense.adaptive_attacks``: the attacks the
  literature uses against it, told the defense's public configuration), each at its published
  budget unless the track's ``attack_options`` say otherwise (the table states each budget).
  Failed trials are counted apart and never scored as privacy: the statistics are over the
  trials an attack completed. The client's worst case is taken per private sample (the best
  attack on each sample: its PSNR, whether any attack identified it (IIP) or leaked its label
  (task leakage)), with intervals: a bootstrap over trials for the median, Wilson intervals for
  the rates;
* utility: test accuracy of the trained victims, mean and 95 % t-interval over the seeds, next
  to the undefended setting's;
* DP: the ε of the training (``defense_accounting`` on the checkpoint card) and the ε of the
  attacked round itself (one release at q = 1, T = 1).

A setting may carry its own ``client_protocol`` (secure aggregation of K clients is a setting:
``{defense: none, client_protocol: {name: aggregate, clients: 4}}``) and, for a defense that
extends the model (PRECODE), its own ``model`` and ``model_options``. A track whose undefended
worst case is below ``min_undefended_psnr`` (30 dB) says that it cannot rank defenses by PSNR.

Steps, as :func:`run_defense_track` runs them:

1. the shared configuration is checked; the generic attacks are those registered attacks that
   adapt to no defense (``Attack.adapts_to`` empty), or the track's list;
2. per setting: its client protocol and defense (a defense that cannot run under the protocol is
   a row that says so), its victims trained (or found in the checkpoint cache), the attacks that
   apply to its victim, one ordinary run (``leakbench run``'s runner) in a sub-folder;
3. per setting: privacy from the run's records, utility from the victims, and a
   machine-readable result ``settings/<slug>.json`` with the canonical records
   ``settings/<slug>.records.jsonl`` and their hashes (an entry can be made from it);
4. the privacy–utility table (JSON, CSV, Markdown) and its scatter, logged to W&B when the
   track's logger is W&B.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leakbench.config import ConfigError, RunConfig, read_yaml

# The budgets the attacks' papers use (iterations and restarts per trial). A track runs an
# attack at these unless its attack_options override them; the table shows which.
PUBLISHED_BUDGETS: dict[str, dict[str, Any]] = {
    # Zhu et al. (NeurIPS 2019), the paper's code: 300 L-BFGS steps.
    "dlg": {"iterations": 300},
    "idlg": {"iterations": 300},
    "improved-rgap": {"dlg_iterations": 300},
    # Geiping et al. (NeurIPS 2020): 24 000 Adam steps, one restart (breaching's configuration).
    "inverting-gradients": {"iterations": 24_000, "restarts": 1},
    # The adaptive attacks on Inverting Gradients' optimiser: its budget.
    "soteria-skip": {"iterations": 24_000, "restarts": 1},
    "mask-aware": {"iterations": 24_000, "restarts": 1},
    "quantization-aware": {"iterations": 24_000, "restarts": 1},
    "noise-aware": {"iterations": 24_000, "restarts": 1},
    # The unmixing attacks fall back to DLG where no first-layer rows apply.
    "mixup-unmixing": {"dlg_iterations": 300},
    "instahide-decoding": {"dlg_iterations": 300},
}
BUDGET_KEYS = ("iterations", "restarts", "dlg_iterations")
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
SETTING_KEYS = {"label", "defense", "options", "client_protocol", "model", "model_options"}


@dataclass(frozen=True)
class DefenseSetting:
    """One row of the table: a registered defense with its options, under a readable label,
    optionally under its own client protocol (secure aggregation of K clients, say)."""

    label: str
    defense: str
    options: dict[str, Any] = field(default_factory=dict)
    client_protocol: str | dict[str, Any] | None = None  # None: the track's
    # A defense that is a model extension (PRECODE) brings its own victim; None: the track's.
    model: str | None = None
    model_options: dict[str, Any] | None = None

    @property
    def slug(self) -> str:
        """The setting's folder name."""
        return re.sub(r"[^a-z0-9.=-]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class UtilityRecipe:
    """How every setting's victims are trained (at the track's batch size)."""

    epochs: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 0.01
    optimizer: str = "adam"


@dataclass(frozen=True)
class DefenseTrack:
    """A defense track: the run configuration every setting shares, and the settings."""

    base: dict[str, Any]  # RunConfig keys, without defense / defense_options / attacks
    settings: tuple[DefenseSetting, ...]
    utility: UtilityRecipe
    attacks: tuple[str, ...] | None  # None: every registered generic attack
    adaptive: bool = True  # run each defense's adaptive attacks
    min_undefended_psnr: float = 30.0

    @property
    def name(self) -> str:
        return str(self.base["track"]["name"])

    @property
    def batch_size(self) -> int:
        return int(self.base.get("batch_sizes", [1])[0])

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
        if len(values.get("batch_sizes", [1])) != 1:
            raise ConfigError(
                f"{path}: batch_sizes = {values['batch_sizes']}; a defense track has one batch "
                "size (its victims train at it): expected one, e.g. [8], and one track per size"
            )
        settings = []
        for i, entry in enumerate(track.get("defenses") or []):
            unknown = sorted(set(entry) - SETTING_KEYS)
            if unknown or "defense" not in entry:
                raise ConfigError(
                    f"{path}: track.defenses[{i}] = {entry!r}; expected keys defense, options, "
                    "label, client_protocol, model, model_options"
                )
            settings.append(
                DefenseSetting(
                    str(entry.get("label", entry["defense"])),
                    entry["defense"],
                    dict(entry.get("options") or {}),
                    entry.get("client_protocol"),
                    entry.get("model"),
                    entry.get("model_options"),
                )
            )
        if not settings:
            raise ConfigError(f"{path}: track.defenses lists no defense setting")
        slugs = [s.slug for s in settings]
        if len(set(slugs)) != len(slugs):
            raise ConfigError(f"{path}: two defense settings share a label: {slugs}")
        recipe = dict(track.get("utility") or {})
        if "batch_size" in recipe:
            raise ConfigError(
                f"{path}: track.utility.batch_size = {recipe['batch_size']!r}; victims train at "
                "the track's batch size (privacy and utility at one operating point): expected "
                "it left out"
            )
        try:
            utility = UtilityRecipe(
                **{k: tuple(v) if k == "seeds" else v for k, v in recipe.items()}
            )
        except TypeError as exc:
            raise ConfigError(f"{path}: track.utility: {exc}") from None
        if not utility.seeds:
            raise ConfigError(f"{path}: track.utility.seeds is empty; expected at least one seed")
        attacks = track.get("attacks", "all")
        base = {k: v for k, v in values.items() if k != "attacks"}
        return cls(
            base=base,
            settings=tuple(settings),
            utility=utility,
            attacks=None if attacks == "all" else tuple(attacks),
            adaptive=bool(track.get("adaptive", True)),
            min_undefended_psnr=float(track.get("min_undefended_psnr", 30.0)),
        )


# ------------------------------------------------------------------ statistics


def wilson_interval(count: int, total: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """Wilson's score interval of a rate count/total; None without observations."""
    if total == 0:
        return None
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    rate = count / total
    centre = (rate + z * z / (2 * total)) / (1 + z * z / total)
    half = (
        z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    )
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """Student's t interval of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    import numpy as np
    from scipy.stats import t

    array = np.asarray(values, dtype=np.float64)
    half = (
        float(t.ppf(0.5 + confidence / 2, len(array) - 1))
        * array.std(ddof=1)
        / math.sqrt(len(array))
    )
    return [float(array.mean()) - half, float(array.mean()) + half]


def bootstrap_median(
    groups: Sequence[Sequence[float]], seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float | None, list[float] | None]:
    """Median of all values and its percentile-bootstrap interval, resampling whole groups
    (trials: the samples of one batch are not independent)."""
    import numpy as np

    from leakbench.metrics import bootstrap_medians

    values = [v for g in groups for v in g]
    if not values:
        return None, None
    median = float(np.median(values))
    if len(groups) < 2:
        return median, None
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if len({len(a) for a in arrays}) == 1:
        # Every resample at once (the same draws as one after the other): loading a board
        # recomputes every entry's intervals.
        picks = rng.integers(len(arrays), size=(BOOTSTRAP_RESAMPLES, len(arrays)))
        medians = bootstrap_medians(np.stack(arrays), picks).tolist()
    else:
        medians = [
            float(
                np.median(
                    np.concatenate([arrays[i] for i in rng.integers(len(arrays), size=len(arrays))])
                )
            )
            for _ in range(BOOTSTRAP_RESAMPLES)
        ]
    tail = (1 - confidence) / 2
    return median, [float(np.quantile(medians, tail)), float(np.quantile(medians, 1 - tail))]


def attack_results(records: Sequence[Mapping[str, Any]], success_psnr: float) -> dict[str, Any]:
    """One attack's trials: failures apart, scores over the trials it completed."""
    import numpy as np

    done = [r for r in records if r["status"] == "ok"]
    samples = [s for r in done for s in r["metrics"]["samples"]]

    def rate(key: str) -> float | None:
        scored = [s[key] for s in samples if key in s]
        return float(np.mean(scored)) if scored else None

    psnr = [s["psnr"] for s in samples]
    return {
        "trials": len(records),
        "failed": len(records) - len(done),
        "failure_reasons": sorted({str(r.get("error")) for r in records if r["status"] != "ok"}),
        "psnr_median": float(np.median(psnr)) if psnr else None,
        "success_rate": float(np.mean([p >= success_psnr for p in psnr])) if psnr else None,
        "iip": rate("iip_pixel"),
        "task_leakage": rate("task_leakage"),
        "iterations_median": (
            float(np.median([r["budget"]["used"]["iterations"] for r in done])) if done else None
        ),
    }


def setting_privacy(
    records: Sequence[Mapping[str, Any]], success_psnr: float, adaptive: Sequence[str]
) -> dict[str, Any]:
    """The privacy of one setting from all its trial records (every attack's): per attack, the
    worst attack by median PSNR, and the per-sample worst case with intervals."""
    by_attack: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_attack.setdefault(record["attack"], []).append(record)
    attacks = {
        name: {**attack_results(rs, success_psnr), "adaptive": name in adaptive}
        for name, rs in sorted(by_attack.items())
    }
    # The strongest attack by median PSNR; ties go to the name that sorts first.
    scored = sorted(
        (-a["psnr_median"], name) for name, a in attacks.items() if a["psnr_median"] is not None
    )
    worst = (-scored[0][0], scored[0][1]) if scored else (None, None)
    # Per private sample: the best completed attack on it.
    best: dict[tuple[int, str], dict[str, Any]] = {}
    trials_seen: set[int] = set()
    for record in records:
        trials_seen.add(int(record["trial"]))
        if record["status"] != "ok":
            continue
        for sample in record["metrics"]["samples"]:
            key = (int(record["trial"]), str(sample["sample_id"]))
            entry = best.setdefault(key, {"psnr": -math.inf, "iip": None, "task": None})
            if sample["psnr"] > entry["psnr"]:
                entry["psnr"], entry["attack"] = sample["psnr"], record["attack"]
            for field_name, key_name in (("iip", "iip_pixel"), ("task", "task_leakage")):
                if key_name in sample:
                    entry[field_name] = bool(entry[field_name]) or bool(sample[key_name])
    by_trial: dict[int, list[float]] = {}
    for (trial, _), entry in best.items():
        by_trial.setdefault(trial, []).append(entry["psnr"])
    median, interval = bootstrap_median([by_trial[t] for t in sorted(by_trial)])
    samples = len(best)
    successes = sum(e["psnr"] >= success_psnr for e in best.values())
    identified = [e["iip"] for e in best.values() if e["iip"] is not None]
    leaked = [e["task"] for e in best.values() if e["task"] is not None]
    chance = [
        1.0 / r["metrics"]["iip_gallery_size"]
        for r in records
        if r["metrics"].get("iip_gallery_size")
    ]
    return {
        "attacks": attacks,
        "worst_attack": worst[1],
        "worst_attack_psnr_median": worst[0],
        "worst_attack_adaptive": worst[1] in adaptive if worst[1] else None,
        "per_sample": {
            "samples": samples,
            "trials_without_completed_attack": len(trials_seen - set(by_trial)),
            "psnr_max_median": median,
            "psnr_max_median_interval": interval,
            "success_rate": successes / samples if samples else None,
            "success_interval": wilson_interval(successes, samples),
            "iip_rate": sum(identified) / len(identified) if identified else None,
            "iip_interval": wilson_interval(sum(identified), len(identified)),
            "iip_chance": chance[0] if chance else None,
            "task_leakage_rate": sum(leaked) / len(leaked) if leaked else None,
            "task_leakage_interval": wilson_interval(sum(leaked), len(leaked)),
            "best_attack_counts": _counts(e.get("attack") for e in best.values()),
        },
        "trials": {name: a["trials"] for name, a in attacks.items()},
        "failed_trials": sum(a["failed"] for a in attacks.values()),
        "total_trials": sum(a["trials"] for a in attacks.values()),
    }


def _counts(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def budget_text(name: str, options: Mapping[str, Any]) -> str:
    """An attack's budget in words, and how it compares with the published one."""
    used = {k: options[k] for k in BUDGET_KEYS if k in options}
    published = PUBLISHED_BUDGETS.get(name)
    if published is None:
        return "closed form" if not used else _budget_words(used)
    words = _budget_words({**published, **used})
    same = all(options.get(k, v) == v for k, v in published.items())
    return (
        f"{words} (published)" if same else f"{words} (track; published {_budget_words(published)})"
    )


def _budget_words(budget: Mapping[str, Any]) -> str:
    parts = []
    if "iterations" in budget:
        parts.append(f"{budget['iterations']} it")
    if "restarts" in budget:
        parts.append(f"{budget['restarts']} restart{'s' if budget['restarts'] != 1 else ''}")
    if "dlg_iterations" in budget:
        parts.append(f"DLG {budget['dlg_iterations']} it")
    return " × ".join(parts)


# ------------------------------------------------------------------ running


@dataclass
class SettingResult:
    """One row of the privacy–utility table."""

    label: str
    defense: str
    options: dict[str, Any]
    client_protocol: dict[str, Any]
    privacy: dict[str, Any] | None  # None: not applicable
    accuracy: list[float]
    undefended_accuracy: list[float]
    run_dir: str
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    accounting: dict[str, Any] = field(default_factory=dict)
    round_epsilon: float | None = None
    reason: str | None = None  # why the setting could not run
    undefended: bool = False  # the track's reference: no defense, the track's protocol
    victim: dict[str, Any] = field(default_factory=dict)  # model, options, attacked checkpoint

    def row(self) -> dict[str, Any]:
        accuracy = _mean(self.accuracy)
        undefended = _mean(self.undefended_accuracy)
        privacy = self.privacy or {}
        per_sample = privacy.get("per_sample", {})
        return {
            "setting": self.label,
            "defense": self.defense,
            "options": self.options,
            "client_protocol": self.client_protocol,
            "victim": self.victim,
            "not_applicable": self.reason,
            # The scatter's and the CSV's headline numbers (the per-sample worst case).
            "worst_psnr_median": per_sample.get("psnr_max_median"),
            "worst_psnr_interval": per_sample.get("psnr_max_median_interval"),
            "worst_psnr_attack": privacy.get("worst_attack"),
            "worst_attack_psnr_median": privacy.get("worst_attack_psnr_median"),
            "worst_attack_adaptive": privacy.get("worst_attack_adaptive"),
            "success_rate": per_sample.get("success_rate"),
            "iip_rate": per_sample.get("iip_rate"),
            "task_leakage_rate": per_sample.get("task_leakage_rate"),
            "failed_trials": privacy.get("failed_trials"),
            "total_trials": privacy.get("total_trials"),
            "accuracy": accuracy,
            "accuracy_interval": mean_interval(self.accuracy),
            "accuracy_per_seed": self.accuracy,
            "undefended_accuracy": undefended,
            "accuracy_change": None
            if accuracy is None or undefended is None
            else accuracy - undefended,
            "training_epsilon": self.accounting.get("epsilon"),
            "round_epsilon": self.round_epsilon,
            "privacy": privacy,
            "attack_options": self.attack_options,
            "attacks_not_applicable": self.not_applicable,
            "accounting": self.accounting,
            "run_dir": self.run_dir,
        }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generic_attacks(names: Sequence[str] | None) -> list[str]:
    """The track's attack list, or every registered attack that adapts to no defense."""
    from leakbench.registry import ATTACKS

    if names is not None:
        return list(names)
    return [n for n in ATTACKS.names() if not getattr(ATTACKS.get(n), "adapts_to", frozenset())]


def applicable_attacks(
    config: RunConfig, candidates: Sequence[str], options: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], dict[str, str]]:
    """The attacks of ``candidates`` (with ``options``) that can run on the configuration's
    victim, batch size, grants and client protocol, and for each of the others the reason."""
    from leakbench.interfaces import UnsupportedModelError
    from leakbench.protocol.attack import UnsupportedClientProtocol
    from leakbench.runner import prepare
    from leakbench.threat_model import RequirementsNotGranted

    runnable: list[str] = []
    reasons: dict[str, str] = {}
    for name in candidates:
        # Only the checks: no gallery or reference classifier is needed to refuse an attack.
        single = RunConfig.from_mapping(
            {
                **config.to_dict(),
                "attacks": [name],
                "attack_options": {name: dict(options.get(name, {}))},
                "privacy_metrics": False,
            }
        )
        try:
            prepared = prepare(single)
        except (
            RequirementsNotGranted,
            UnsupportedModelError,
            UnsupportedClientProtocol,
            ConfigError,
            ValueError,
        ) as exc:
            reasons[name] = str(exc)
            continue
        limit = prepared.attacks[name].max_batch_size
        samples = prepared.client_protocol.samples_per_trial(min(config.batch_sizes))
        if limit is not None and samples > limit:
            reasons[name] = f"handles batches of at most {limit}"
            continue
        runnable.append(name)
    return runnable, reasons


def run_defense_track(
    track: DefenseTrack,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[SettingResult]:
    """Run every setting of ``track`` (see the module docstring); returns the table's rows,
    also written to ``<output_dir>/<track name>/privacy_utility.{json,csv,md,png}``.

    A setting whose run folder already holds trials of the same configuration skips them, so
    an interrupted track picks up where it stopped; trained victims are found in the
    checkpoint cache."""
    with warnings.catch_warnings():
        # Lightning suggests srun on every Trainer where SLURM is installed; a track makes many.
        warnings.filterwarnings("ignore", message=".*srun.*")
        return _run_defense_track(track, output_dir, progress, echo)


@dataclass
class SettingRun:
    """What one setting runs: its protocol, defense options, trained victims, and the run
    configuration with the attacks that apply (generic and adaptive) at their budgets; or, for a
    defense that cannot run under the protocol, the reason."""

    setting: DefenseSetting
    protocol: Any  # leakbench.client.ClientProtocol
    values: dict[str, Any] = field(default_factory=dict)  # RunConfig keys of the setting's run
    options: dict[str, Any] = field(default_factory=dict)  # the defense's, as it trains
    victims: list[Any] = field(default_factory=list)  # one TrainedVictim per seed
    generic: list[str] = field(default_factory=list)
    adaptive: list[str] = field(default_factory=list)
    used_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # the defense cannot run under the protocol


@dataclass
class TrackContext:
    """What every setting of a track shares: the checked configuration and the caches."""

    track: DefenseTrack
    config: RunConfig
    candidates: list[str]
    track_options: dict[str, dict[str, Any]]
    train_size: int
    checkpoints: Path
    applicability: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)


def track_context(track: DefenseTrack, folder: Path) -> TrackContext:
    """Step 1: the shared configuration, checked before anything is trained or written."""
    from leakbench.models.training import default_checkpoint_dir
    from leakbench.registry import ATTACKS, DATAMODULES, DEFENSES

    base = dict(track.base)
    checkpoints = Path(base.get("checkpoint_dir") or default_checkpoint_dir())
    candidates = generic_attacks(track.attacks)
    track_options: dict[str, dict[str, Any]] = dict(base.pop("attack_options", None) or {})
    unknown = sorted(set(track_options) - set(ATTACKS.names()))
    if unknown:
        raise ConfigError(
            f"track {track.name}: attack_options for unregistered attacks {unknown}; valid: "
            f"{', '.join(ATTACKS.names())}"
        )
    config = RunConfig.from_mapping(
        {
            **base,
            "attacks": candidates,
            "attack_options": {k: v for k, v in track_options.items() if k in candidates},
            "output_dir": str(folder),
            "run_name": "none",
        },
        source=f"track {track.name}",
    )
    train_size = len(DATAMODULES.get(config.dataset)(**config.dataset_options).samples("train"))
    for setting in track.settings:
        DEFENSES.get(setting.defense)  # an unknown name is refused before any training
    return TrackContext(track, config, candidates, track_options, train_size, checkpoints)


def prepare_setting(
    context: TrackContext,
    setting: DefenseSetting,
    seeds: Sequence[int] | None = None,
    echo: Callable[[str], None] = print,
) -> SettingRun:
    """Step 2 for one setting: its client protocol and defense, its victims (trained with the
    defense, one per seed of ``seeds``, default the recipe's; the first is attacked) and the
    attacks that apply to its victim. ``leakbench defenses`` and the board's verification of a
    defense entry both run a setting from what this returns."""
    from leakbench.client import protocol_from_spec
    from leakbench.registry import DEFENSES

    track, config = context.track, context.config
    spec = setting.client_protocol or config.client_protocol
    try:
        protocol = protocol_from_spec(spec)
    except ValueError as exc:
        raise ConfigError(f"track {track.name}: setting {setting.label!r}: {exc}") from None
    defense_cls = DEFENSES.get(setting.defense)
    unsupported = sorted(protocol.names() - defense_cls.client_protocols)
    if unsupported:
        reason = (
            f"{setting.defense} cannot run under the client protocol {unsupported[0]!r} "
            f"(it supports: {', '.join(sorted(defense_cls.client_protocols))})"
        )
        return SettingRun(setting, protocol, options=dict(setting.options), reason=reason)
    training_batch = protocol.samples_per_trial(track.batch_size)
    try:
        options = defense_cls.options_for_training(
            setting.options,
            batch_size=training_batch,
            dataset_size=context.train_size,
            epochs=track.utility.epochs,
        )
        defense = defense_cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"track {track.name}: setting {setting.label!r}: {exc}") from None
    victims = [
        _trained(config, setting, track.utility, seed, training_batch, context.checkpoints)
        for seed in (track.utility.seeds if seeds is None else seeds)
    ]
    attacked = victims[0]
    echo(
        f"setting {setting.label}: victim trained at B = {training_batch} (seed "
        f"{track.utility.seeds[0]}), checkpoint {attacked.checkpoint.sha256[:16]}, test "
        f"accuracy {attacked.test_accuracy:.3f}"
    )
    values = {
        **config.to_dict(),
        "client_protocol": spec,
        "model": setting.model or config.model,
        "model_options": _model_options(config, setting),
        "model_state": attacked.checkpoint.sha256,
        "checkpoint_dir": str(context.checkpoints),
        "defense": setting.defense,
        "defense_options": options,
        "run_name": setting.slug,
    }
    # The attacks: generic ones (checked once per protocol), then the defense's adaptive.
    attack_options = {
        name: {**PUBLISHED_BUDGETS.get(name, {}), **context.track_options.get(name, {})}
        for name in context.candidates
    }
    key = json.dumps([protocol.spec(), values["model"], values["model_options"]], sort_keys=True)
    if key not in context.applicability:
        context.applicability[key] = applicable_attacks(
            RunConfig.from_mapping(values, source=f"track {track.name}"),
            context.candidates,
            attack_options,
        )
    generic, not_applicable = context.applicability[key]
    adaptive_options = {
        name: {**PUBLISHED_BUDGETS.get(name, {}), **context.track_options.get(name, {}), **told}
        for name, told in (defense.adaptive_attacks() if track.adaptive else {}).items()
    }
    adaptive, adaptive_refused = applicable_attacks(
        RunConfig.from_mapping(values, source=f"track {track.name}"),
        list(adaptive_options),
        adaptive_options,
    )
    not_applicable = {**not_applicable, **adaptive_refused}
    attacks = generic + adaptive
    if not attacks:
        raise ConfigError(f"track {track.name}: no attack can run on setting {setting.label!r}")
    used_options = {
        name: (adaptive_options if name in adaptive else attack_options)[name] for name in attacks
    }
    values.update(attacks=attacks, attack_options=used_options)
    return SettingRun(
        setting,
        protocol,
        values,
        options,
        victims,
        list(generic),
        adaptive,
        used_options,
        not_applicable,
    )


def _run_defense_track(
    track: DefenseTrack,
    output_dir: str | Path | None,
    progress: bool,
    echo: Callable[[str], None],
) -> list[SettingResult]:
    started = time.perf_counter()
    folder = Path(output_dir or track.base.get("output_dir", "runs")) / (
        track.base.get("run_name") or track.name
    )
    context = track_context(track, folder)
    config = context.config
    results: list[SettingResult] = []
    undefended: list[float] = []
    for setting in track.settings:
        # 2. The setting's protocol, defense, victims and attacks.
        prepared = prepare_setting(context, setting, echo=echo)
        run_path = folder / setting.slug
        if prepared.reason is not None:
            echo(f"setting {setting.label}: not applicable: {prepared.reason}")
            results.append(
                SettingResult(
                    setting.label,
                    setting.defense,
                    setting.options,
                    prepared.protocol.spec(),
                    None,
                    [],
                    undefended,
                    str(run_path),
                    reason=prepared.reason,
                )
            )
            continue
        accuracy = [v.test_accuracy for v in prepared.victims]
        is_reference = setting.defense == "none" and not setting.client_protocol
        if is_reference and not undefended:
            undefended = accuracy
        for name, reason in prepared.not_applicable.items():
            echo(f"  not applicable: {name}: {reason}")
        echo(
            f"  attacks: {', '.join(prepared.generic)}; adaptive: "
            f"{', '.join(prepared.adaptive) or 'none'}"
        )
        from leakbench.results import RunDirectory
        from leakbench.runner import run

        setting_config = RunConfig.from_mapping(prepared.values, source=f"track {track.name}")
        run(setting_config, progress=progress, echo=lambda line: None)
        # 3. Privacy, utility and the machine-readable result.
        records = list(RunDirectory(run_path).records())
        privacy = setting_privacy(records, config.success_psnr, prepared.adaptive)
        round_epsilon = next(
            (
                r["defense_report"].get("round_epsilon")
                for r in records
                if isinstance(r.get("defense_report"), dict)
                and "round_epsilon" in r["defense_report"]
            ),
            None,
        )
        attacked = prepared.victims[0]
        result = SettingResult(
            setting.label,
            setting.defense,
            prepared.options,
            prepared.protocol.spec(),
            privacy,
            accuracy,
            undefended,
            str(run_path),
            attack_options=prepared.used_options,
            not_applicable=prepared.not_applicable,
            accounting=dict(attacked.checkpoint.card.get("defense_accounting", {})),
            round_epsilon=round_epsilon,
            undefended=is_reference,
            victim={
                "model": prepared.values["model"],
                "model_options": prepared.values["model_options"],
                "checkpoint": attacked.checkpoint.sha256,
                "test_accuracy": attacked.test_accuracy,
                # Every seed's trained victim: what a verifier re-trains and compares.
                "checkpoints_per_seed": [v.checkpoint.sha256 for v in prepared.victims],
            },
        )
        results.append(result)
        write_setting(result, records, folder, track, prepared.adaptive)

    # 4. The table and its figure.
    for result in results:
        result.undefended_accuracy = undefended
    write_table(results, folder, track, time.perf_counter() - started)
    if config.logger == "wandb":
        log_table_to_wandb(folder, track, config)
    echo(format_table(results, track))
    echo(f"privacy-utility table: {folder / 'privacy_utility.md'}")
    return results


def _trained(
    config: RunConfig,
    setting: DefenseSetting,
    recipe: UtilityRecipe,
    seed: int,
    batch_size: int,
    checkpoints: Path,
) -> Any:
    """The setting's victim of ``seed``, trained with its defense (once; then cached)."""
    from leakbench.models.training import trained_once

    undefended = setting.defense == "none" and not setting.options
    defense = {} if undefended else {"defense": setting.defense, "defense_options": setting.options}
    return trained_once(
        setting.model or config.model,
        config.dataset,
        checkpoint_dir=checkpoints,
        seed=seed,
        model_options=_model_options(config, setting),
        dataset_options=dict(config.dataset_options),
        epochs=recipe.epochs,
        batch_size=batch_size,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        **defense,
    )


def _model_options(config: RunConfig, setting: DefenseSetting) -> dict[str, Any]:
    """The setting's victim options: its own where it brings its own model."""
    if setting.model is None:
        return dict(config.model_options)
    return dict(setting.model_options or {})


def write_setting(
    result: SettingResult,
    records: Sequence[Mapping[str, Any]],
    folder: Path,
    track: DefenseTrack,
    adaptive: Sequence[str],
) -> Path:
    """``settings/<slug>.json``: the setting's result as an entry can be made from it, next to
    its canonical records (``<slug>.records.jsonl``: the attack board's records file, one
    sorted-key line per record in trial order, the attacks of a trial by name) and their hashes
    (every field; and without the fields that measure the machine)."""
    from leakbench.leaderboard.entry import outcome_sha256, records_text
    from leakbench.results import atomic_write_text

    ordered = sorted(records, key=lambda r: (r["trial"], r["attack"]))
    text = records_text(ordered)  # a stable sort by trial: the order above
    slug = DefenseSetting(result.label, result.defense).slug
    records_path = folder / "settings" / f"{slug}.records.jsonl"
    atomic_write_text(records_path, text)
    row = result.row()
    document = {
        "kind": "defense-setting",
        "track": track.name,
        "track_config": track.base,
        "batch_size": track.batch_size,
        "setting": {
            "label": result.label,
            "defense": result.defense,
            "options": result.options,
            "client_protocol": result.client_protocol,
        },
        "victim": {**result.victim, "utility_recipe": asdict(track.utility)},
        "attacks": {
            name: {
                "options": options,
                "adaptive": name in adaptive,
                "budget": budget_text(name, options),
            }
            for name, options in result.attack_options.items()
        },
        "attacks_not_applicable": result.not_applicable,
        "privacy": result.privacy,
        "utility": {
            "accuracy_per_seed": result.accuracy,
            "seeds": list(track.utility.seeds),
            "accuracy": row["accuracy"],
            "accuracy_interval": row["accuracy_interval"],
            "undefended_accuracy": row["undefended_accuracy"],
        },
        "dp": {"training": result.accounting, "round_epsilon": result.round_epsilon},
        "records": {
            "file": records_path.name,
            "count": len(ordered),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "outcome_sha256": outcome_sha256(ordered),
        },
    }
    path = folder / "settings" / f"{slug}.json"
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


# ------------------------------------------------------------------ the table


def _value(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _interval(interval: Sequence[float] | None, digits: int = 1) -> str:
    return "" if not interval else f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def format_table(results: Sequence[SettingResult], track: DefenseTrack) -> str:
    """The privacy–utility table as Markdown, with the attacks' budgets and the track's note."""
    lines = [
        "| setting | worst attack: median PSNR | per-sample worst PSNR, median [95% CI] "
        "| success ≥ 30 dB | IIP [95% CI] | task leakage [95% CI] | failed trials "
        "| accuracy [95% CI] | vs undefended | DP ε training / round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    budgets: dict[str, tuple[str, bool]] = {}
    for result in results:
        row = result.row()
        if result.privacy is None:
            lines.append(f"| {row['setting']} | not applicable: {result.reason} |||||||||")
            continue
        per_sample = result.privacy["per_sample"]
        adaptive = " (adaptive)" if row["worst_attack_adaptive"] else ""
        epsilons = (
            "-"
            if row["training_epsilon"] is None and row["round_epsilon"] is None
            else f"{_value(row['training_epsilon'], 2)} / {_value(row['round_epsilon'], 2)}"
        )
        cells = [
            row["setting"],
            f"{row['worst_psnr_attack']}{adaptive}: "
            + _value(row["worst_attack_psnr_median"], 1, " dB"),
            _value(row["worst_psnr_median"], 1, " dB") + _interval(row["worst_psnr_interval"]),
            _value(row["success_rate"], 2) + _interval(per_sample["success_interval"], 2),
            _value(row["iip_rate"], 2) + _interval(per_sample["iip_interval"], 2),
            _value(row["task_leakage_rate"], 2) + _interval(per_sample["task_leakage_interval"], 2),
            f"{row['failed_trials']}/{row['total_trials']}",
            _value(row["accuracy"], 3) + _interval(row["accuracy_interval"], 3),
            _value(row["accuracy_change"], 3),
            epsilons,
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for name, options in result.attack_options.items():
            budgets[name] = (
                budget_text(name, options),
                bool(result.privacy["attacks"].get(name, {}).get("adaptive")),
            )
    lines += ["", "| attack | adaptive | budget per trial |", "|---|---|---|"]
    lines += [
        f"| {name} | {'yes' if a else 'no'} | {b} |" for name, (b, a) in sorted(budgets.items())
    ]
    note = undefended_note(results, track)
    return "\n".join(lines + ["", note])


def undefended_note(results: Sequence[SettingResult], track: DefenseTrack) -> str:
    """Whether the undefended worst case is strong enough for the track to rank defenses."""
    reference = next((r for r in results if r.undefended and r.privacy is not None), None)
    if reference is None:
        return "The track has no undefended setting: nothing says whether its attacks are strong."
    privacy = reference.privacy or {}
    worst = privacy["per_sample"]["psnr_max_median"]
    success = privacy["per_sample"]["success_rate"]
    strongest = (
        f"; its strongest attack, {privacy['worst_attack']}, has a median of "
        f"{_value(privacy['worst_attack_psnr_median'], 1, ' dB')} over the trials it completed"
        if privacy.get("worst_attack")
        else ""
    )
    measured = (
        f"The undefended worst case is {_value(worst, 1, ' dB')} (median over samples of the "
        f"best attack per sample; {_value(success, 2)} of the samples at or above 30 dB"
        f"{strongest})"
    )
    if worst is None or worst < track.min_undefended_psnr:
        return (
            f"{measured}, below {track.min_undefended_psnr:g} dB: this track cannot rank defenses "
            "by reconstruction quality; read the success rate, IIP and task leakage instead."
        )
    return (
        f"{measured}, at or above {track.min_undefended_psnr:g} dB: the attacks are strong "
        "enough here for the track to rank defenses."
    )


def write_table(
    results: Sequence[SettingResult], folder: Path, track: DefenseTrack, seconds: float
) -> None:
    """``privacy_utility.json`` (everything), ``.csv``, ``.md`` and the scatter ``.png``."""
    from leakbench.figures import privacy_utility_figure
    from leakbench.results import atomic_write_bytes, atomic_write_text

    rows = [r.row() for r in results]
    document = {
        "track": track.name,
        "batch_size": track.batch_size,
        "utility": asdict(track.utility),
        "note": undefended_note(results, track),
        "rows": rows,
        "wall_s": seconds,
    }
    atomic_write_text(folder / "privacy_utility.json", json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "privacy_utility.csv", buffer.getvalue())
    atomic_write_text(folder / "privacy_utility.md", format_table(results, track) + "\n")
    plotted = [
        _plotted(r)
        for r in rows
        if r["worst_psnr_median"] is not None and r["accuracy"] is not None
    ]
    if plotted and plotted[0]["undefended_accuracy"] is not None:
        atomic_write_bytes(
            folder / "privacy_utility.png", privacy_utility_figure(plotted, track.name)
        )


CSV_COLUMNS = (
    "setting",
    "defense",
    "worst_psnr_median",
    "worst_psnr_attack",
    "worst_attack_psnr_median",
    "worst_attack_adaptive",
    "success_rate",
    "iip_rate",
    "task_leakage_rate",
    "failed_trials",
    "total_trials",
    "accuracy",
    "undefended_accuracy",
    "accuracy_change",
    "training_epsilon",
    "round_epsilon",
    "not_applicable",
)


def _plotted(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the scatter reads it (the per-sample worst case against accuracy)."""
    adaptive = " adaptive" if row["worst_attack_adaptive"] else ""
    return {**row, "worst_psnr_attack": f"{row['worst_psnr_attack']}{adaptive}"}


def log_table_to_wandb(folder: Path, track: DefenseTrack, config: RunConfig) -> None:
    """The table and the scatter as one W&B run of the track's group (offline unless the user
    configured W&B); each setting's own run logs its cells as ``leakbench run`` does."""
    import wandb

    from leakbench.evaluator import figure_pixels
    from leakbench.runner import wandb_configured

    document = json.loads((folder / "privacy_utility.json").read_text())
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
        columns=list(CSV_COLUMNS),
        data=[[_cell(r.get(c)) for c in CSV_COLUMNS] for r in document["rows"]],
    )
    logged: dict[str, Any] = {"privacy_utility": table}
    if (folder / "privacy_utility.png").is_file():
        logged["privacy_utility_scatter"] = wandb.Image(
            figure_pixels(folder / "privacy_utility.png")
        )
    run.log(logged)
    run.summary.update({"note": document["note"], "wall_s": document["wall_s"]})
    run.finish()


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value
