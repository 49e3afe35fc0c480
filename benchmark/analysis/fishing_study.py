"""The fishing study (Pan, Zhang, Yang, CRAD 2022; issue 9), as ``leakbench fishing-study``.

For the d-512-K ReLU FCN on lfw-subset (with its mirror images by default,
``dataset_options: {mirrored: true}``: 320 train images, so that batches of 256 can be drawn)
in the state ``--model-state`` (default: its random initialisation) and after a few epochs of
FedSGD training from it (``--train-epochs [0,5]``; each trained state a cached checkpoint
whose hash prefix the state's label names, see :meth:`leakbench.analysis.boundary.Study.state`),
every batch size (``--batch-sizes [8,16,32,64,128,256]``) and the first ``--trials`` batches of
each, it runs through the trial protocol (:func:`leakbench.protocol.run_trial`, via
:func:`leakbench.analysis.boundary.run_trial`):

* ``fishing`` with each of ``--settings`` (named sets of its hyperparameters: objective,
  assignment, k, epsilon, ...; each over ``--fishing-options``; none: ``--fishing-options``
  alone) and each of ``--solvers`` (default HiGHS; ``[highs,cbc]`` compares the LP solvers of
  the LP objectives on the same batches), granted ``client_code``. The comparison of the
  issue (the perturbation's cost per objective, k and assignment rule) is::

      leakbench fishing-study --batch-sizes [16,64,128] --train-epochs [0] --ig-trials 0 \
        --fishing-options "{workers: 1}" --isolation in-process \
        --settings "{old-linf-k2: {objective: linf, k: 2, epsilon: 0.001}, l2-k2: {k: 2},
          new-l2-k1: {}, l2-k1-eps1e-3: {epsilon: 0.001},
          linf-k1: {objective: linf}, l1-k1: {objective: l1},
          l2-k1-max_psnr: {assignment: max_psnr}, l2-k1-margin: {assignment: margin},
          l2-k1-seeded: {assignment: seeded}}"

* on the same original batches, ``exan`` without fishing, and ``inverting-gradients`` at its
  default budget granted the batch size (on the first ``--ig-trials`` batches: it is the slow
  one).

It prints, per training state, batch size and fishing setting: the LP feasibility rate
(samples whose LP gave a checked solution, and batches where all did), the samples left
unprotected (and how many of them by a time limit), the LP wall time per batch (and the LPs'
CPU time over the workers, the wall time a quiet machine would take) and the share of the LPs'
rows the solver was given, the perturbation's L∞ and PSNR(perturbed, original) (median and
minimum over the samples), the reconstruction PSNR against the perturbed batch (what the
client trained on) and against the original private batch, the inferred batch size's accuracy,
the total attack time (the client code plus the reconstruction), and ExAN's and Inverting
Gradients' PSNR and time on the original batches, with the speed-up of fishing over Inverting
Gradients. Every image figure is read from the trial records
(``metrics``, ``metrics_vs_trained``, ``perturbation``), scored by the canonical metrics module;
the LP facts come from the recorded client state. Results: ``fishing_study.json`` (every
record's figures), ``summary.csv`` and ``batches.csv`` in the run folder.

The trial batches come from the ``train`` split by default: lfw-subset's test split holds 40
images, fewer than 64 (a federated client's batch is its training data anyway).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from leakbench.analysis.boundary import Study, format_table, run_trial, to_csv
from leakbench.analysis.commands import STUDY_RUN_KEYS, FishingStudyOptions
from leakbench.attacks.fishing import SOLVED, Fishing
from leakbench.config import RunConfig
from leakbench.progress import track
from leakbench.protocol import PreparedAttack, prepare_attack
from leakbench.results import atomic_write_text
from leakbench.threat_model import Capability
from leakbench.timing import load_text


def prepared(name: str, options: dict[str, Any]) -> PreparedAttack:
    """The attack ``name`` with ``options``; its trials grant exactly what it requires."""
    return prepare_attack(name, options, frozenset(Capability))


def sample_values(record: dict[str, Any], key: str, field: str) -> list[float]:
    """Per-sample ``field`` of ``metrics`` / ``metrics_vs_trained``; [] when absent."""
    block = record.get(key)
    if not block:
        return []
    return [s[field] for s in block["samples"]]


def fishing_figures(record: dict[str, Any]) -> dict[str, Any]:
    """One fishing record's figures: LP facts from the client state, images from the metrics."""
    lp = (record.get("client_report") or {}).get("lp") or {}
    statuses = lp.get("status", [])
    original = sample_values(record, "metrics", "psnr")
    # Without a perturbation (every LP failed) the client trained on the original batch.
    trained = sample_values(record, "metrics_vs_trained", "psnr") or original
    perturbation = record.get("perturbation") or [{"linf": 0.0, "psnr": None} for _ in original]
    return {
        "status": record["status"],
        "error": record.get("error"),
        "solved": sum(s in SOLVED for s in statuses),
        "samples": len(original),
        "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "unprotected": lp.get("unprotected", []),
        "rows_given": sum(g for g, _ in lp.get("rows", [])),
        "rows_total": sum(t for _, t in lp.get("rows", [])),
        "solver_version": lp.get("solver_version"),
        "lp_seconds": lp.get("wall_seconds"),
        # The LPs' CPU time spread over the workers: the LP wall time of a quiet machine.
        "lp_cpu_seconds": sum(lp.get("cpu_seconds", [])) / max(lp.get("workers", 1), 1),
        "client_seconds": lp.get("client_seconds"),
        "attack_seconds": record.get("time_s"),
        "total_seconds": (lp.get("client_seconds") or 0.0) + (record.get("time_s") or 0.0),
        "linf": [p["linf"] for p in perturbation],
        "perturbation_psnr": [p["psnr"] for p in perturbation if p["psnr"] is not None],
        "psnr_vs_trained": trained,
        "psnr_vs_original": original,
        "batch_size_correct": record["metrics"].get("batch_size_correct"),
    }


def _lp_facts(figures: Any) -> bool:
    return isinstance(figures, dict) and figures.get("solver_version") is not None


def baseline_figures(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": record["status"],
        "error": record.get("error"),
        "psnr": sample_values(record, "metrics", "psnr"),
        "seconds": record.get("time_s"),
    }


def study_batches(
    model: nn.Module,
    study: Study,
    state: str,
    batch_sizes: Sequence[int],
    trials: int,
    ig_trials: int,
    attacks: dict[str, PreparedAttack],
    echo: Any,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every attack on the same batches, interleaved batch by batch (load hits all alike)."""
    rows = []
    for b in batch_sizes:
        batches = track(study.trials(b, trials), f"{state} B={b}", progress)
        for index, batch in enumerate(batches):
            row: dict[str, Any] = {"state": state, "batch_size": b, "trial": int(batch["trial"])}
            for name, attack in attacks.items():
                if name == "inverting-gradients" and index >= ig_trials:
                    continue
                record = run_trial(model, study, attack, batch)
                fishing = attack.name == "fishing"
                row[name] = fishing_figures(record) if fishing else baseline_figures(record)
            rows.append(row)
            echo(f"  {state} B={b} trial {row['trial']}: " + brief(row))
    return rows


def brief(row: dict[str, Any]) -> str:
    parts = []
    for name, figures in row.items():
        if not isinstance(figures, dict):
            continue
        if "psnr_vs_original" in figures:
            psnr = _median(figures["psnr_vs_original"])
            parts.append(
                f"{name} {figures['solved']}/{figures['samples']} solved, "
                f"LP {_fmt(figures['lp_seconds'])} s, {_fmt(psnr)} dB"
            )
        else:
            parts.append(f"{name} {_fmt(_median(figures['psnr']))} dB {_fmt(figures['seconds'])} s")
    return "; ".join(parts)


def summarize(rows: list[dict[str, Any]], fishing: Sequence[str]) -> list[dict[str, Any]]:
    """One line per (state, batch size, fishing setting): the figures the issue asks for;
    the baselines (ExAN, Inverting Gradients) repeat on every line of their batches."""
    table = []
    for state in dict.fromkeys(r["state"] for r in rows):
        for b in dict.fromkeys(r["batch_size"] for r in rows if r["state"] == state):
            cell = [r for r in rows if r["state"] == state and r["batch_size"] == b]
            baselines: dict[str, Any] = {}
            for name, label in (("exan", "exan"), ("inverting-gradients", "ig")):
                runs = [r[name] for r in cell if name in r]
                if not runs:
                    continue
                baselines[f"{label}_psnr_median"] = _median([v for f in runs for v in f["psnr"]])
                baselines[f"{label}_failed"] = sum(f["status"] != "ok" for f in runs)
                baselines[f"{label}_s"] = _median([f["seconds"] for f in runs])
                baselines[f"{label}_batches"] = len(runs)
            for label in fishing:
                line = {"state": state, "B": b, "fishing": label, "batches": len(cell)}
                line.update(fishing_line([r[label] for r in cell]))
                line.update(baselines)
                if "ig_s" in line and line["total_s"]:
                    line["ig_over_fishing"] = line["ig_s"] / line["total_s"]
                table.append(line)
    return table


def fishing_line(fish: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one fishing setting over the batches of one cell."""
    line: dict[str, Any] = {}
    line["lp_feasible"] = sum(f["solved"] for f in fish) / max(sum(f["samples"] for f in fish), 1)
    line["batches_all_feasible"] = float(np.mean([f["solved"] == f["samples"] for f in fish]))
    unprotected = [u for f in fish for u in f["unprotected"]]
    line["unprotected"] = len(unprotected)
    line["time_limited"] = sum(u["status"] == "time_limit" for u in unprotected)
    line["rows_given"] = sum(f["rows_given"] for f in fish) / max(
        sum(f["rows_total"] for f in fish), 1
    )
    line["lp_s"] = _median([f["lp_seconds"] for f in fish])
    line["lp_cpu_s"] = _median([f["lp_cpu_seconds"] for f in fish])
    line["linf_median"] = _median([v for f in fish for v in f["linf"]])
    line["linf_max"] = _max([v for f in fish for v in f["linf"]])
    cost = [v for f in fish for v in f["perturbation_psnr"]]
    line["pert_psnr_median"] = _median(cost)
    line["pert_psnr_min"] = _min(cost)
    vs_trained = [v for f in fish for v in f["psnr_vs_trained"]]
    vs_original = [v for f in fish for v in f["psnr_vs_original"]]
    line["psnr_trained_median"] = _median(vs_trained)
    line["psnr_trained_min"] = _min(vs_trained)
    line["psnr_original_median"] = _median(vs_original)
    line["psnr_original_min"] = _min(vs_original)
    line["B_correct"] = float(np.mean([bool(f["batch_size_correct"]) for f in fish]))
    line["failed"] = sum(f["status"] != "ok" for f in fish)
    line["total_s"] = _median([f["total_seconds"] for f in fish])
    return line


def _values(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def _median(values: Sequence[Any]) -> float | None:
    v = _values(values)
    return float(np.median(v)) if v else None


def _min(values: Sequence[Any]) -> float | None:
    v = _values(values)
    return float(np.min(v)) if v else None


def _max(values: Sequence[Any]) -> float | None:
    v = _values(values)
    return float(np.max(v)) if v else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def fishing_settings(options: FishingStudyOptions) -> dict[str, dict[str, Any]]:
    """The fishing attacks to compare, by label: every setting (or ``fishing_options`` alone),
    one per solver where its objective is an LP; a label names the setting, then the solver
    where several are compared (the l2 objective has its own solver: one attack)."""
    settings = {
        name: {**options.fishing_options, **values} for name, values in options.settings.items()
    } or {"fishing": dict(options.fishing_options)}
    default_objective = inspect.signature(Fishing).parameters["objective"].default
    attacks = {}
    for name, values in settings.items():
        if values.get("objective", default_objective) == "l2":
            attacks[name] = dict(values)
        elif len(options.solvers) == 1:
            attacks[name] = {**values, "solver": options.solvers[0]}
        else:
            attacks.update({f"{name}-{s}": {**values, "solver": s} for s in options.solvers})
    return attacks


def fishing_study_command(
    config: RunConfig, options: FishingStudyOptions, progress: bool = True, echo: Any = print
) -> int:
    """Run the study: ``config`` gives the run keys it shares with ``leakbench run``
    (:data:`~leakbench.analysis.commands.STUDY_RUN_KEYS`), ``options`` its own."""
    study = Study.from_config(config)
    batch_sizes = [int(b) for b in config.batch_sizes]
    states = options.train_epochs
    attacks = {
        label: prepared("fishing", fishing_options)
        for label, fishing_options in fishing_settings(options).items()
    }
    fishing = list(attacks)
    if options.ig_trials > 0:
        attacks["inverting-gradients"] = prepared("inverting-gradients", options.ig_options)
    attacks["exan"] = prepared("exan", {})
    if Capability.CLIENT_CODE not in attacks[fishing[0]].requires:
        raise AssertionError("fishing must require client code")
    probe = study.victim()
    for attack in attacks.values():
        attack.instance().check_model(probe)

    run_dir = Path(config.output_dir) / (
        config.run_name or datetime.now().strftime("fishing-%Y%m%d-%H%M%S")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    trained = [study.state(epochs, options.train_lr) for epochs in states]
    accuracy = {s.label: s.test_accuracy for s in trained}
    echo(f"machine {load_text()} (at the start)")
    for studied in trained:
        state = studied.label
        echo(f"{state}: test accuracy {accuracy[state]:.3f}")
        rows += study_batches(
            studied.victim.build().eval(),
            study,
            state,
            batch_sizes,
            config.trials,
            options.ig_trials,
            attacks,
            echo,
            progress=progress,
        )
    summary = summarize(rows, fishing)
    run_keys = config.to_dict()
    # What was measured, lists as lists: the run keys the study uses and its own keys.
    settings = {**{key: run_keys[key] for key in STUDY_RUN_KEYS}, **dataclasses.asdict(options)}
    atomic_write_text(
        run_dir / "fishing_study.json",
        json.dumps(
            {
                "config": settings,
                "states": [s.record() for s in trained],
                "test_accuracy": accuracy,
                "summary": summary,
                "batches": rows,
            },
            indent=2,
        )
        + "\n",
    )
    atomic_write_text(run_dir / "summary.csv", to_csv(summary))
    atomic_write_text(
        run_dir / "batches.csv",
        to_csv(
            [{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows]
        ),
    )
    echo(
        f"\n{study.dataset} ({study.split} split) / {study.model_name}, {config.dtype}, "
        f"test accuracy {json.dumps({k: round(v, 3) for k, v in accuracy.items()})}"
    )
    groups = {
        "LP and perturbation (fishing; LP wall time per batch, and the LPs' CPU time over the "
        "workers: a quiet machine's wall time; L∞ in pixel units; PSNR of the perturbed batch "
        "against the original, dB)": (
            "state", "B", "fishing", "batches", "lp_feasible", "batches_all_feasible",
            "unprotected", "time_limited", "lp_s", "lp_cpu_s", "rows_given", "linf_median",
            "linf_max", "pert_psnr_median", "pert_psnr_min",
        ),
        "reconstruction (PSNR dB vs the perturbed and vs the original batch)": (
            "state", "B", "fishing", "psnr_trained_median", "psnr_trained_min",
            "psnr_original_median", "psnr_original_min", "B_correct", "failed",
        ),
        "time (s; fishing = client code + reconstruction) and baselines on the original batches": (
            "state", "B", "fishing", "total_s", "exan_psnr_median", "exan_failed", "exan_s",
            "ig_psnr_median", "ig_s", "ig_batches", "ig_over_fishing",
        ),
    }  # fmt: skip
    for title, columns in groups.items():
        echo(f"\n{title}")
        echo(format_table([{c: line.get(c) for c in columns if c in line} for line in summary]))
    versions = sorted({f["solver_version"] for r in rows for f in r.values() if _lp_facts(f)})
    echo(f"solvers: {'; '.join(versions)}; machine {load_text()} (at the end)")
    echo(f"results: {run_dir}")
    return 0
