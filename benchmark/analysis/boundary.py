"""The security-boundary study of the ExAN paper (Pan et al., USENIX Security 2022), as
``leakbench boundary``.

For one victim and one dataset it measures, and writes to a run folder (and to W&B on request):

* **P(condition) versus batch size** (``boundary.csv``): the fraction of trial batches that meet
  the exclusivity condition (:mod:`leakbench.analysis.exclusivity`), with the mean ExANs per
  sample of every ReLU layer; per training state (random init, and after N epochs of FedSGD on
  the train split with ``--train-epochs 0,N``).
* **PSNR versus ExAN count** (``psnr_by_exans.csv``): every trial batch is attacked (the ExAN
  attack unless ``--psnr-attack`` says otherwise) and each ground-truth sample's PSNR is binned
  by its fewest ExANs over the ReLU layers.
* ``boundary.png``: both curves, one panel each.
* ``--compare-attacks exan,dlg,inverting-gradients`` (``compare.csv``): the attacks on the same
  batches, only batches inside the insecure boundary (chosen by the harness-side analysis, which
  holds the ground truth: a selection of the protocol, not of any reconstruction). Each attack
  is granted exactly the capabilities it requires; the attacks run interleaved, batch by batch,
  so that machine load hits them alike. Median PSNR, median wall time per attack, and that time
  as a multiple of the ExAN attack's.
* ``--defenses a,b,c`` (``defenses.csv``): the exclusivity-reduction defenses, each with ExANs
  per sample and the condition rate measured on the batch the client actually trains on, the
  ExAN attack's PSNR against the private batch, and the utility cost: test accuracy of a victim
  trained ``--utility-epochs`` epochs with the defense minus the same without it.

Every trial is the protocol's (:func:`leakbench.protocol.run_trial`): the same client, defense,
isolated attack and canonical scoring as ``leakbench run``; this module only chooses the trials.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leakbench.analysis.exclusivity import analyse_exclusivity
from leakbench.client import fedsgd_update
from leakbench.interfaces import Defense
from leakbench.metrics import DEFAULT_SUCCESS_PSNR
from leakbench.protocol import PreparedAttack, TrialSetting, Victim, prepare_attack
from leakbench.protocol import run_trial as run_protocol_trial
from leakbench.registry import ATTACKS, DATAMODULES, DEFENSES
from leakbench.results import atomic_write_bytes, atomic_write_text, cell_key
from leakbench.threat_model import Budget

# Bins of a sample's fewest ExANs over its ReLU layers (lower edges; the last is open).
EXAN_BINS = (0, 1, 2, 3, 5, 9, 17, 33, 65)


class Study:
    """One dataset and one victim architecture, and how to draw trials of them."""

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
        isolation: str = "process",
    ) -> None:
        self.dataset = dataset
        self.isolation = isolation
        self.dataset_options = dict(dataset_options or {})
        self.split = split
        self.model_name = model
        self.model_options = dict(model_options or {})
        self.model_seed = model_seed
        self.dtype = dtype
        self.seed = seed
        self.reference = self.datamodule(1, 1)

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

    def victim_spec(self) -> Victim:
        dm = self.reference
        return Victim(
            self.model_name,
            tuple(dm.input_shape),
            dm.num_classes,
            self.model_options,
            self.model_seed,
            self.dtype,
        )

    def victim(self) -> nn.Module:
        try:
            return self.victim_spec().build()
        except TypeError as exc:
            raise ValueError(f"bad options for model {self.model_name!r}: {exc}") from None

    def trials(self, batch_size: int, trials: int) -> list[dict[str, Any]]:
        return [
            {**t, "images": t["images"].to(self.dtype)}
            for t in self.datamodule(batch_size, trials).trials()
        ]


def train_victim(
    model: nn.Module,
    study: Study,
    epochs: int,
    lr: float = 0.05,
    defense: Defense | None = None,
    train_batch_size: int = 16,
) -> nn.Module:
    """FedSGD on the train split: every mini-batch's (defended) update is one SGD step.

    The defense sees every mini-batch as a client batch (``Defense.apply``). Its randomness
    comes from the study seed.
    """
    dm = study.datamodule(1, 1, train_batch_size=train_batch_size)
    generator = torch.Generator().manual_seed(study.seed)
    model.train()
    for _ in range(epochs):
        for images, labels, _ in dm.train_dataloader():
            images = images.to(study.dtype)
            update = (
                (defense or Defense()).apply(model, images, labels, generator, fedsgd_update).update
            )
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter -= lr * update[name].to(parameter.dtype)
    return model.eval()


def accuracy_on_test_split(model: nn.Module, study: Study) -> float:
    """Accuracy on the dataset's test split."""
    samples = study.reference.samples("test")
    images = torch.stack([samples[i][0] for i in range(len(samples))]).to(study.dtype)
    labels = torch.tensor([samples[i][1] for i in range(len(samples))])
    with torch.no_grad():
        return float((model.eval()(images).argmax(dim=1) == labels).float().mean())


def condition_rows(
    model: nn.Module, study: Study, batch_sizes: Sequence[int], trials: int, state: str
) -> list[dict[str, Any]]:
    """P(exclusivity condition) and mean ExANs per sample per layer, for each batch size."""
    rows = []
    for b in batch_sizes:
        reports = [analyse_exclusivity(model, t["images"]) for t in study.trials(b, trials)]
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
) -> list[dict[str, Any]]:
    """Per ground-truth sample: its fewest ExANs over the layers and the attack's PSNR."""
    rows = []
    for b in batch_sizes:
        for batch in study.trials(b, trials):
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
        isolation=study.isolation,
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
        for batch in chosen:  # attacks interleaved per batch: machine load hits all alike
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
) -> list[dict[str, Any]]:
    """Exclusivity, ExAN-attack PSNR and utility cost of each defense (``"none"`` included)."""
    baseline_accuracy = None
    if utility_epochs > 0:
        baseline_accuracy = accuracy_on_test_split(
            train_victim(study.victim(), study, utility_epochs), study
        )
    rows = []
    for label, (name, options) in defenses.items():
        accuracy = baseline_accuracy
        if utility_epochs > 0 and name != "none":
            trained = train_victim(
                study.victim(), study, utility_epochs, defense=DEFENSES.get(name)(**options)
            )
            accuracy = accuracy_on_test_split(trained, study)
        for b in batch_sizes:
            exans, conditions, psnr, failures = [], [], [], 0
            for batch in study.trials(b, trials):
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


def plot(condition: list[dict[str, Any]], binned: list[dict[str, Any]], title: str) -> bytes:
    """The two curves of the study as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = 2 if binned else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for state in dict.fromkeys(r["state"] for r in condition):
        rows = [r for r in condition if r["state"] == state]
        ax.plot(
            [r["batch_size"] for r in rows], [r["p_condition"] for r in rows], "o-", label=state
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("P(exclusivity condition)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.set_title("insecure boundary")
    if binned:
        ax = axes[0][1]
        for state in dict.fromkeys(r["state"] for r in binned):
            rows = [r for r in binned if r["state"] == state]
            ax.plot(
                [r["min_exans"] for r in rows], [r["psnr_median"] for r in rows], "o-", label=state
            )
        ax.set_xlabel("fewest ExANs of the sample over its ReLU layers")
        ax.set_ylabel("median PSNR (dB)")
        ax.legend()
        ax.set_title("attack quality vs exclusivity")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


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


def _prepared(name: str, options: dict[str, Any]) -> PreparedAttack:
    """The attack ``name``, granted exactly what it requires."""
    return prepare_attack(name, options.get(name, {}), frozenset(ATTACKS.get(name).requires))


def comma_ints(text: str) -> list[int]:
    """A command-line list like ``2,4,8``: non-negative integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"expected non-negative integers, got {text!r}")
    return values


def comma_names(text: str | None) -> list[str]:
    """A command-line list like ``exan,dlg``."""
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def json_object(text: str | None, what: str) -> dict[str, Any]:
    """A command-line JSON object (``what`` names the flag in the error)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def boundary_command(args: argparse.Namespace, echo: Any = print) -> int:
    study = Study(
        dataset=args.dataset,
        dataset_options=json_object(args.dataset_options, "--dataset-options"),
        split=args.split,
        model=args.model,
        model_options=json_object(args.model_options, "--model-options"),
        model_seed=args.model_seed,
        dtype=getattr(torch, args.dtype),
        seed=args.seed,
        isolation=args.isolation,
    )
    batch_sizes = comma_ints(args.batch_sizes)
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be at least 1, got {args.batch_sizes}")
    states = comma_ints(args.train_epochs)
    attack_options = json_object(args.attack_options, "--attack-options")
    defense_options = json_object(args.defense_options, "--defense-options")
    psnr_attack = (
        None if args.psnr_attack == "none" else _prepared(args.psnr_attack, attack_options)
    )
    compared = {n: _prepared(n, attack_options) for n in comma_names(args.compare_attacks)}
    defenses = {"none": ("none", {})}
    for name in comma_names(args.defenses):
        DEFENSES.get(name)
        defenses[name] = (name, defense_options.get(name, {}))
    exan = _prepared("exan", attack_options)
    probe = study.victim()
    for attack in [a for a in (psnr_attack, *compared.values()) if a is not None]:
        attack.instance().check_model(probe)

    run_dir = Path(args.output_dir) / (
        args.run_name or datetime.now().strftime("boundary-%Y%m%d-%H%M%S")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    condition, samples, compare, defended = [], [], [], []
    for epochs in states:
        model = study.victim()
        state = "random-init"
        if epochs:
            train_victim(model, study, epochs)
            state = f"trained-{epochs}ep (test acc {accuracy_on_test_split(model, study):.2f})"
        model.eval()
        condition += condition_rows(model, study, batch_sizes, args.trials, state)
        if psnr_attack is not None:
            samples += attack_sample_rows(
                model, study, batch_sizes, args.attack_trials, psnr_attack, state
            )
        if compared and epochs == states[0]:
            compare = compare_attacks(
                model,
                study,
                compared,
                comma_ints(args.compare_batch_sizes),
                args.compare_trials,
                args.compare_pool,
            )
        if len(defenses) > 1 and epochs == states[0]:
            defended = defense_rows(
                model,
                study,
                defenses,
                comma_ints(args.defense_batch_sizes),
                args.defense_trials,
                args.utility_epochs,
                exan,
            )
    binned = psnr_by_exans(samples)
    title = f"{study.dataset} / {study.model_name} {study.model_options or ''}".strip()
    tables = {
        "boundary": condition,
        "psnr_by_exans": binned,
        "samples": samples,
        "compare": compare,
        "defenses": defended,
    }
    config = {k: v for k, v in vars(args).items() if k != "func"}
    for name, rows in tables.items():
        if rows:
            atomic_write_text(run_dir / f"{name}.csv", to_csv(rows))
    atomic_write_text(
        run_dir / "boundary.json", json.dumps({"config": config, **tables}, indent=2) + "\n"
    )
    atomic_write_bytes(run_dir / "boundary.png", plot(condition, binned, title))
    if args.wandb:
        log_to_wandb(args.wandb, run_dir, config, tables)
    echo(f"{title}: P(exclusivity condition) over {args.trials} trials per batch size")
    echo(format_table([{k: v for k, v in r.items() if k != "layers"} for r in condition]))
    if binned:
        echo(f"\n{args.psnr_attack} PSNR by the sample's fewest ExANs")
        echo(format_table(binned))
    if compare:
        echo("\nattacks on the same insecure-boundary batches")
        echo(format_table(compare))
    if defended:
        echo("\nexclusivity-reduction defenses (our interpretations; ExAN attack)")
        echo(format_table(defended))
    echo(f"results: {run_dir}")
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "boundary",
        help="exclusivity security-boundary study: P(condition) vs batch size, PSNR vs ExANs",
    )
    p.add_argument("--dataset", default="lfw-subset")
    p.add_argument("--dataset-options", help="JSON object of datamodule options")
    p.add_argument("--split", default="test", help="split the trial batches come from")
    p.add_argument("--model", default="fcn-exan")
    p.add_argument("--model-options", help="JSON object of model options")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", default="2,4,8,16,32")
    p.add_argument("--trials", type=int, default=200, help="batches per batch size")
    p.add_argument(
        "--train-epochs", default="0", help="training states, e.g. 0,5: random init and 5 epochs"
    )
    p.add_argument("--psnr-attack", default="exan", help="attack for PSNR vs ExANs, or none")
    p.add_argument("--attack-trials", type=int, default=20, help="attacked batches per size")
    p.add_argument("--attack-options", help='JSON: {"attack name": {options}}')
    p.add_argument("--compare-attacks", help="e.g. exan,dlg,inverting-gradients")
    p.add_argument("--compare-batch-sizes", default="1,4,8")
    p.add_argument("--compare-trials", type=int, default=5, help="qualifying batches per size")
    p.add_argument("--compare-pool", type=int, default=400, help="batches searched per size")
    p.add_argument("--defenses", help="comma-separated defense names")
    p.add_argument("--defense-options", help='JSON: {"defense name": {options}}')
    p.add_argument("--defense-batch-sizes", default="4")
    p.add_argument("--defense-trials", type=int, default=20)
    p.add_argument("--utility-epochs", type=int, default=0, help="0: skip the utility cost")
    p.add_argument(
        "--isolation",
        choices=["process", "in-process"],
        default="process",
        help="where attacks run: a fresh worker process per trial, or in-process (debugging)",
    )
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--run-name")
    p.add_argument(
        "--wandb",
        nargs="?",
        const="offline",
        choices=["offline", "online", "disabled"],
        help="also log the tables and the figure to W&B (default mode: offline)",
    )
    p.set_defaults(func=boundary_command)
