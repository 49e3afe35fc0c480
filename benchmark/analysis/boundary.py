"""The security-boundary study of the ExAN paper (Pan et al., USENIX Security 2022), as
``leakbench boundary``.

For one victim and one dataset it measures, and writes to a run folder (and to W&B on request):

* **P(condition) versus batch size** (``boundary.csv``): the fraction of trial batches that meet
  the exclusivity condition (:mod:`leakbench.analysis.exclusivity`), with the mean ExANs per
  sample of every ReLU layer; per training state (``--train-epochs [0,N]``: the victim of
  ``--model-state``, and that victim after N more epochs of FedSGD on the train split).
* **PSNR versus ExAN count** (``psnr_by_exans.csv``): every trial batch is attacked (the ExAN
  attack unless ``--psnr-attack`` says otherwise) and each ground-truth sample's PSNR is binned
  by its fewest ExANs over the ReLU layers.
* ``boundary.png``: both curves, one panel each.
* ``--compare-attacks [exan,dlg,inverting-gradients]`` (``compare.csv``): the attacks on the same
  batches, only batches inside the insecure boundary (chosen by the harness-side analysis, which
  holds the ground truth: a selection of the protocol, not of any reconstruction). Each attack
  is granted exactly the capabilities it requires; the attacks run interleaved, batch by batch,
  so that machine load hits them alike. Median PSNR, median wall time per attack, and that time
  as a multiple of the ExAN attack's.
* ``--defenses [a,b,c]`` (``defenses.csv``): the exclusivity-reduction defenses, each with ExANs
  per sample and the condition rate measured on the batch the client actually trains on, the
  ExAN attack's PSNR against the private batch, and the utility cost: test accuracy of a victim
  trained ``--utility-epochs`` epochs with the defense minus the same without it.

Every trained state is a cached checkpoint (:func:`leakbench.models.training.trained_once`, in
the run's ``checkpoint_dir``): its label names the hash prefix, which ``--model-state`` reloads,
and ``boundary.json``'s ``states`` lists each state's full hash and test accuracy.

Every trial is the protocol's (:func:`leakbench.protocol.run_trial`): the same client, defense,
isolated attack and canonical scoring as ``leakbench run``; this module only chooses the trials.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leakbench.analysis.commands import STUDY_RUN_KEYS, BoundaryOptions
from leakbench.analysis.exclusivity import analyse_exclusivity
from leakbench.capabilities import Capability
from leakbench.config import RunConfig
from leakbench.figures import boundary_figure, median_interval
from leakbench.interfaces import Defense
from leakbench.metrics import DEFAULT_SUCCESS_PSNR
from leakbench.models.training import (
    TrainedVictim,
    accuracy_on,
    default_checkpoint_dir,
    trained_once,
)
from leakbench.progress import track
from leakbench.protocol import PreparedAttack, TrialSetting, Victim, prepare_attack
from leakbench.protocol import run_trial as run_protocol_trial
from leakbench.protocol.isolation import Placement, default_threads
from leakbench.protocol.victim import resolve_victim_state
from leakbench.registry import DATAMODULES, DEFENSES
from leakbench.results import atomic_write_bytes, atomic_write_text, cell_key
from leakbench.runner import checkpoint_folder, run_placement
from leakbench.threat_model import Budget

# Bins of a sample's fewest ExANs over its ReLU layers (lower edges; the last is open).
EXAN_BINS = (0, 1, 2, 3, 5, 9, 17, 33, 65)
# The studies' training recipe (plain SGD on each mini-batch's update, i.e. FedSGD).
TRAIN_LR = 0.05
TRAIN_BATCH_SIZE = 16
# Hex digits of a checkpoint's hash in a state's label: enough for --model-state to reload it.
LABEL_HASH_DIGITS = 16


@dataclass(frozen=True)
class StudyState:
    """One training state of a study's victim: its label, the victim, its test accuracy."""

    label: str
    epochs: int
    victim: Victim
    test_accuracy: float

    def record(self) -> dict[str, Any]:
        """The state as a table row; ``model_state`` is what ``--model-state`` reloads."""
        return {
            "state": self.label,
            "train_epochs": self.epochs,
            "model_state": self.victim.state_text,
            "test_accuracy": self.test_accuracy,
        }


class Study:
    """One dataset and one victim (architecture and state), and how to draw trials of them.

    ``model_state`` is the base victim (:func:`~leakbench.protocol.victim.resolve_victim_state`:
    ``random``, ``random(<seed>)`` or a checkpoint hash of ``checkpoint_dir``); training states
    (:meth:`state`) continue from it.
    """

    def __init__(
        self,
        dataset: str = "lfw-subset",
        dataset_options: dict[str, Any] | None = None,
        split: str = "test",
        model: str = "fcn-exan",
        model_options: dict[str, Any] | None = None,
        model_seed: int = 0,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        placement: Placement | None = None,
        model_state: str = "random",
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.placement = placement or Placement("process", default_threads())
        self.dataset_options = dict(dataset_options or {})
        self.split = split
        self.model_name = model
        self.model_options = dict(model_options or {})
        self.model_seed = model_seed
        self.dtype = dtype
        self.seed = seed
        self.checkpoint_dir = (
            default_checkpoint_dir() if checkpoint_dir is None else Path(checkpoint_dir)
        )
        self.reference = self.datamodule(1, 1)
        self.base = self.resolve(model_state)

    @classmethod
    def from_config(cls, config: RunConfig) -> Study:
        """The study of a run configuration's dataset, victim, seeds and isolation."""
        return cls(
            dataset=config.dataset,
            dataset_options=config.dataset_options,
            split=config.split,
            model=config.model,
            model_options=config.model_options,
            model_seed=config.model_seed,
            dtype=getattr(torch, config.dtype),
            seed=config.seed,
            placement=run_placement(config, config.threads or default_threads())[0],
            model_state=config.model_state,
            checkpoint_dir=checkpoint_folder(config),
        )

    def datamodule(self, batch_size: int, trials: int, **options: Any) -> Any:
        factory = DATAMODULES.get(self.dataset)
        try:
            return factory(
                **self.dataset_options,
                batch_size=batch_size,
                num_trials=trials,
                seed=self.seed,
                split=self.split,
                **options,
            )
        except TypeError as exc:
            raise ValueError(f"bad options for dataset {self.dataset!r}: {exc}") from None

    def resolve(self, model_state: str) -> Victim:
        """The study's victim in the state ``model_state`` names, checked against the study."""
        dm = self.reference
        try:
            return resolve_victim_state(
                model_state,
                model=self.model_name,
                model_options=self.model_options,
                input_shape=tuple(dm.input_shape),
                num_classes=dm.num_classes,
                dtype=self.dtype,
                checkpoint_dir=self.checkpoint_dir,
                seed=self.model_seed,
            )
        except TypeError as exc:
            raise ValueError(f"bad options for model {self.model_name!r}: {exc}") from None

    def victim_spec(self) -> Victim:
        """The base victim (``model_state``)."""
        return self.base

    def victim(self) -> nn.Module:
        """A fresh model of the base victim."""
        try:
            return self.base.build()
        except TypeError as exc:
            raise ValueError(f"bad options for model {self.model_name!r}: {exc}") from None

    def trained(
        self,
        epochs: int,
        *,
        lr: float = TRAIN_LR,
        defense: str = "none",
        defense_options: dict[str, Any] | None = None,
    ) -> TrainedVictim:
        """The base victim after ``epochs`` epochs of FedSGD on the train split (``defense``
        active in every step), trained once and then loaded from the checkpoint folder.

        The training seed is the base victim's (its initialisation, or its card's seed), so
        that training continues from exactly the state of ``model_state``."""
        defended = {} if defense == "none" else {"defense": defense}
        if defense_options:
            defended["defense_options"] = dict(defense_options)
        start = {} if self.base.checkpoint is None else {"initial_checkpoint": self.base.checkpoint}
        return trained_once(
            self.model_name,
            self.dataset,
            checkpoint_dir=self.checkpoint_dir,
            model_options=self.model_options,
            dataset_options=self.dataset_options,
            epochs=epochs,
            batch_size=TRAIN_BATCH_SIZE,
            lr=lr,
            optimizer="sgd",
            seed=self.base.seed,
            **defended,
            **start,
        )

    def test_accuracy(self, model: nn.Module) -> float:
        """``model``'s accuracy on the dataset's test split."""
        return accuracy_on(model, self.reference.samples("test"))

    def state(self, epochs: int, lr: float = TRAIN_LR) -> StudyState:
        """Training state ``epochs``: 0 is the base victim, N the base after N epochs
        (:meth:`trained`). The label is ``random(<seed>)`` or the checkpoint's hash prefix."""
        if epochs == 0:
            victim = self.base
            label = self._label(victim)
        else:
            victim = self.resolve(self.trained(epochs, lr=lr).checkpoint.sha256)
            label = f"trained-{epochs}ep {self._label(victim)}"
        return StudyState(label, epochs, victim, self.test_accuracy(victim.build()))

    @staticmethod
    def _label(victim: Victim) -> str:
        text = victim.state_text
        return text if victim.checkpoint is None else text[:LABEL_HASH_DIGITS]

    def trials(self, batch_size: int, trials: int) -> list[dict[str, Any]]:
        return [
            {**t, "images": t["images"].to(self.dtype)}
            for t in self.datamodule(batch_size, trials).trials()
        ]


def condition_rows(
    model: nn.Module,
    study: Study,
    batch_sizes: Sequence[int],
    trials: int,
    state: str,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """P(exclusivity condition) and mean ExANs per sample per layer, for each batch size."""
    rows = []
    for b in batch_sizes:
        batches = track(study.trials(b, trials), f"condition {state} B={b}", progress)
        reports = [analyse_exclusivity(model, t["images"]) for t in batches]
        if reports[0] is None:
            raise ValueError(f"model {study.model_name!r} has no ReLU layer: no exclusivity")
        counts = torch.stack([r.counts.float() for r in reports])  # (trials, B, L)
        rows.append(
            {
                "state": state,
                "batch_size": b,
                "trials": len(reports),
                "p_condition": float(np.mean([r.holds for r in reports])),
                "p_sample_condition": float(
                    torch.cat([r.condition for r in reports]).float().mean()
                ),
                "mean_exans_per_sample": [round(float(v), 3) for v in counts.mean(dim=(0, 1))],
                "layers": reports[0].layers,
            }
        )
    return rows


def attack_sample_rows(
    model: nn.Module,
    study: Study,
    batch_sizes: Sequence[int],
    trials: int,
    attack: PreparedAttack,
    state: str,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per ground-truth sample: its fewest ExANs over the layers and the attack's PSNR."""
    rows = []
    for b in batch_sizes:
        for batch in track(study.trials(b, trials), f"{attack.name} {state} B={b}", progress):
            report = analyse_exclusivity(model, batch["images"])
            record = run_trial(model, study, attack, batch)
            for i, sample in enumerate(record["metrics"]["samples"]):
                rows.append(
                    {
                        "state": state,
                        "batch_size": b,
                        "trial": int(batch["trial"]),
                        "min_exans": int(report.counts[i].min()),
                        "condition": bool(report.condition[i]),
                        "psnr": sample["psnr"],
                        "failed": record["status"] != "ok",
                    }
                )
    return rows


def run_trial(
    model: nn.Module,
    study: Study,
    attack: PreparedAttack,
    batch: dict[str, Any],
    defense: Defense | None = None,
) -> dict[str, Any]:
    """One trial of the protocol on ``model`` in its current state, granting exactly what the
    attack requires, with the exclusivity covariate. Returns the trial record."""
    dm = study.reference
    defense = defense or Defense()
    defense_name = getattr(defense, "registered_name", "none")
    setting = TrialSetting(
        cell=cell_key(attack.name, defense_name, len(batch["labels"])),
        attack_name=attack.name,
        defense_name=defense_name,
        batch_size=len(batch["labels"]),
        input_shape=tuple(dm.input_shape),
        num_classes=dm.num_classes,
        mean=tuple(dm.mean),
        std=tuple(dm.std),
        granted=attack.requires,
        budget=Budget(),
        dtype=study.dtype,
        client_mode="eval",
        seed=study.seed,
        success_psnr=DEFAULT_SUCCESS_PSNR,
        covariates=("exclusivity",),
        isolation=study.placement.isolation,
        sandbox_view=study.placement.view,
        threads=study.placement.threads,
    )
    victim = Victim.of(study.victim_spec(), model)
    return run_protocol_trial(victim, attack, defense, setting, batch).record


def sample_psnrs(record: dict[str, Any]) -> list[float]:
    return [s["psnr"] for s in record["metrics"]["samples"]]


def psnr_by_exans(sample_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median PSNR of the samples in each bin of their fewest ExANs, per training state."""
    table = []
    for state in dict.fromkeys(r["state"] for r in sample_rows):
        rows = [r for r in sample_rows if r["state"] == state]
        for low, high in zip(EXAN_BINS, (*EXAN_BINS[1:], math.inf), strict=True):
            members = [r for r in rows if low <= r["min_exans"] < high]
            if not members:
                continue
            psnr = [r["psnr"] for r in members]
            interval = median_interval(psnr)
            table.append(
                {
                    "state": state,
                    "min_exans": f"{low}"
                    if high == low + 1
                    else f"{low}+"
                    if math.isinf(high)
                    else f"{low}-{int(high) - 1}",
                    "samples": len(members),
                    "psnr_median": float(np.median(psnr)),
                    # 95 % order-statistic interval; None below 6 samples (none exists)
                    "psnr_median_low": None if math.isnan(interval[0]) else interval[0],
                    "psnr_median_high": None if math.isnan(interval[1]) else interval[1],
                    "psnr_min": float(np.min(psnr)),
                    "failed_fraction": float(np.mean([r["failed"] for r in members])),
                }
            )
    return table


def compare_attacks(
    model: nn.Module,
    study: Study,
    attacks: dict[str, PreparedAttack],
    batch_sizes: Sequence[int],
    batches_per_size: int,
    pool: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every attack on the same insecure-boundary batches: median PSNR and median time."""
    rows = []
    for b in batch_sizes:
        chosen = [t for t in study.trials(b, pool) if analyse_exclusivity(model, t["images"]).holds]
        chosen = chosen[:batches_per_size]
        if not chosen:
            rows.append({"batch_size": b, "batches": 0, "note": f"none of {pool} batches qualify"})
            continue
        results: dict[str, dict[str, list]] = {
            name: {"psnr": [], "seconds": [], "failed": []} for name in attacks
        }
        # attacks interleaved per batch: machine load hits all alike
        for batch in track(chosen, f"compare B={b}", progress):
            for name, attack in attacks.items():
                record = run_trial(model, study, attack, batch)
                results[name]["failed"].append(record["status"] != "ok")
                results[name]["seconds"].append(record["time_s"])
                results[name]["psnr"] += sample_psnrs(record)
        exan_time = np.median(results["exan"]["seconds"]) if "exan" in results else None
        for name, result in results.items():
            seconds = float(np.median(result["seconds"]))
            rows.append(
                {
                    "attack": name,
                    "batch_size": b,
                    "batches": len(chosen),
                    "failed": sum(result["failed"]),
                    "psnr_median": float(np.median(result["psnr"])),
                    "psnr_min": float(np.min(result["psnr"])),
                    "time_median_s": seconds,
                    "time_vs_exan": None if exan_time is None else seconds / float(exan_time),
                }
            )
    return rows


def defense_rows(
    model: nn.Module,
    study: Study,
    defenses: dict[str, tuple[str, dict[str, Any]]],
    batch_sizes: Sequence[int],
    trials: int,
    utility_epochs: int,
    attack: PreparedAttack,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Exclusivity, ExAN-attack PSNR and utility cost of each defense (``"none"`` included)."""
    baseline_accuracy = None
    if utility_epochs > 0:
        baseline_accuracy = study.trained(utility_epochs).test_accuracy
    rows = []
    for label, (name, options) in defenses.items():
        accuracy = baseline_accuracy
        if utility_epochs > 0 and name != "none":
            accuracy = study.trained(
                utility_epochs, defense=name, defense_options=options
            ).test_accuracy
        for b in batch_sizes:
            exans, conditions, psnr, failures = [], [], [], 0
            batches = track(study.trials(b, trials), f"defense {label} B={b}", progress)
            for batch in batches:
                record = run_trial(model, study, attack, batch, DEFENSES.get(name)(**options))
                exclusivity = record["covariates"]["exclusivity"]
                exans.append(float(np.mean(exclusivity["exans_per_sample"])))
                conditions.append(exclusivity["condition"])
                failures += record["status"] != "ok"
                psnr += sample_psnrs(record)
            rows.append(
                {
                    "defense": label,
                    "batch_size": b,
                    "trials": trials,
                    "exans_per_sample": float(np.mean(exans)),
                    "p_condition": float(np.mean(conditions)),
                    "attack_psnr_median": float(np.median(psnr)),
                    "attack_failed": failures,
                    "test_accuracy": accuracy,
                    "utility_cost": None
                    if accuracy is None or baseline_accuracy is None
                    else baseline_accuracy - accuracy,
                }
            )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def log_to_wandb(mode: str, run_dir: Path, config: dict[str, Any], tables: dict[str, list]) -> None:
    import wandb

    run = wandb.init(
        project="leakbench", name=run_dir.name, dir=str(run_dir), mode=mode, config=config
    )
    for name, rows in tables.items():
        if rows:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            data = [
                [json.dumps(r.get(c)) if isinstance(r.get(c), list) else r.get(c) for c in columns]
                for r in rows
            ]
            run.log({name: wandb.Table(columns=columns, data=data)})
    run.log({"boundary": wandb.Image(str(run_dir / "boundary.png"))})
    run.finish()


def _prepared(name: str, options: dict[str, Any], study: Study) -> PreparedAttack:
    """The attack ``name`` on the study's victim; trials grant it exactly what it requires."""
    return prepare_attack(
        name,
        options.get(name, {}),
        frozenset(Capability),
        victim=study.victim_spec(),
        placement=study.placement,
    )


def boundary_command(
    config: RunConfig, options: BoundaryOptions, progress: bool = True, echo: Any = print
) -> int:
    """Run the study: ``config`` gives the run keys it shares with ``leakbench run``
    (:data:`~leakbench.analysis.commands.STUDY_RUN_KEYS`), ``options`` its own."""
    study = Study.from_config(config)
    batch_sizes = [int(b) for b in config.batch_sizes]
    states = options.train_epochs
    psnr_attack = (
        None
        if options.psnr_attack == "none"
        else _prepared(options.psnr_attack, options.attack_options, study)
    )
    compared = {n: _prepared(n, options.attack_options, study) for n in options.compare_attacks}
    defenses = {"none": ("none", {})}
    for name in options.defenses:
        DEFENSES.get(name)
        defenses[name] = (name, options.defense_options.get(name, {}))
    exan = _prepared("exan", options.attack_options, study)
    probe = study.victim()
    if analyse_exclusivity(probe, study.trials(1, 1)[0]["images"]) is None:
        raise ValueError(f"model: {study.model_name!r} has no ReLU layer, expected one")

    run_dir = Path(config.output_dir) / (
        config.run_name or datetime.now().strftime("boundary-%Y%m%d-%H%M%S")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    condition, samples, compare, defended, state_rows = [], [], [], [], []
    for epochs in states:
        studied = study.state(epochs)
        state_rows.append(studied.record())
        model, state = studied.victim.build().eval(), studied.label
        condition += condition_rows(model, study, batch_sizes, config.trials, state, progress)
        if psnr_attack is not None:
            samples += attack_sample_rows(
                model, study, batch_sizes, options.attack_trials, psnr_attack, state, progress
            )
        if compared and epochs == states[0]:
            compare = compare_attacks(
                model,
                study,
                compared,
                options.compare_batch_sizes,
                options.compare_trials,
                options.compare_pool,
                progress,
            )
        if len(defenses) > 1 and epochs == states[0]:
            defended = defense_rows(
                model,
                study,
                defenses,
                options.defense_batch_sizes,
                options.defense_trials,
                options.utility_epochs,
                exan,
                progress,
            )
    binned = psnr_by_exans(samples)
    title = f"{study.dataset} / {study.model_name} {study.model_options or ''}".strip()
    tables = {
        "states": state_rows,
        "boundary": condition,
        "psnr_by_exans": binned,
        "samples": samples,
        "compare": compare,
        "defenses": defended,
    }
    run_keys = config.to_dict()
    # What was measured, lists as lists: the run keys the study uses and its own keys.
    settings = {**{key: run_keys[key] for key in STUDY_RUN_KEYS}, **dataclasses.asdict(options)}
    for name, rows in tables.items():
        if rows:
            atomic_write_text(run_dir / f"{name}.csv", to_csv(rows))
    atomic_write_text(
        run_dir / "boundary.json", json.dumps({"config": settings, **tables}, indent=2) + "\n"
    )
    atomic_write_bytes(run_dir / "boundary.png", boundary_figure(condition, binned, title))
    if options.wandb:
        log_to_wandb(options.wandb, run_dir, settings, tables)
    echo(f"{title}: victim states (model_state reloads each one)")
    echo(format_table(state_rows))
    echo(f"\n{title}: P(exclusivity condition) over {config.trials} trials per batch size")
    echo(format_table([{k: v for k, v in r.items() if k != "layers"} for r in condition]))
    if binned:
        echo(f"\n{options.psnr_attack} PSNR by the sample's fewest ExANs")
        echo(format_table(binned))
    if compare:
        echo("\nattacks on the same insecure-boundary batches")
        echo(format_table(compare))
    if defended:
        echo("\nexclusivity-reduction defenses (our interpretations; ExAN attack)")
        echo(format_table(defended))
    echo(f"results: {run_dir}")
    return 0
