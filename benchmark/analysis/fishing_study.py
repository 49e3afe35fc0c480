"""The fishing study (Pan, Zhang, Yang, CRAD 2022; issue 9), as ``leakbench fishing-study``.

For the d-512-K ReLU FCN on lfw-subset in the state ``--model-state`` (default: its random
initialisation) and after a few epochs of FedSGD training from it (``--train-epochs [0,5]``;
each trained state a cached checkpoint whose hash prefix the state's label names, see
:meth:`leakbench.analysis.boundary.Study.state`), every batch size
(``--batch-sizes [8,16,32,64]``) and the first ``--trials`` batches of each, it runs through
the trial protocol (:func:`leakbench.protocol.run_trial`, via
:func:`leakbench.analysis.boundary.run_trial`):

* ``fishing`` with CBC and with HiGHS (the same batches; the client code's LPs differ only by
  solver), granted ``client_code``;
* on the same original batches, ``exan`` without fishing, and ``inverting-gradients`` at its
  default budget granted the batch size (on the first ``--ig-trials`` batches: it is the slow
  one).

It prints, per training state and batch size: the LP feasibility rate (samples whose LP gave a
checked solution, and batches where all did), the LP wall time per batch for each solver, the
perturbation's L∞ and PSNR(perturbed, original), the reconstruction PSNR against the perturbed
batch (what the client trained on) and against the original private batch, the inferred batch
size's accuracy, the total attack time (the client code plus the reconstruction), and ExAN's
and Inverting Gradients' PSNR and time on the original batches, with the speed-up of fishing
over Inverting Gradients. Every image figure is read from the trial records (``metrics``,
``metrics_vs_trained``, ``perturbation``), scored by the canonical metrics module; the LP facts
come from the recorded client state. Results: ``fishing_study.json`` (every record's figures),
``summary.csv`` and ``batches.csv`` in the run folder.

The trial batches come from the ``train`` split by default: lfw-subset's test split holds 40
images, fewer than 64 (a federated client's batch is its training data anyway).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from leakbench.analysis.boundary import Study, format_table, run_trial, to_csv
from leakbench.analysis.commands import STUDY_RUN_KEYS, FishingStudyOptions
from leakbench.config import RunConfig
from leakbench.progress import track
from leakbench.protocol import PreparedAttack, prepare_attack
from leakbench.results import atomic_write_text
from leakbench.threat_model import Capability

SOLVED = ("optimal", "feasible")


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
        "lp_seconds": lp.get("wall_seconds"),
        "client_seconds": lp.get("client_seconds"),
        "attack_seconds": record.get("time_s"),
        "total_seconds": (lp.get("client_seconds") or 0.0) + (record.get("time_s") or 0.0),
        "linf": [p["linf"] for p in perturbation],
        "perturbation_psnr": [p["psnr"] for p in perturbation if p["psnr"] is not None],
        "psnr_vs_trained": trained,
        "psnr_vs_original": original,
        "batch_size_correct": record["metrics"].get("batch_size_correct"),
    }


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


def summarize(rows: list[dict[str, Any]], solvers: dict[str, str]) -> list[dict[str, Any]]:
    """One line per (state, batch size): the figures the issue asks for."""
    table = []
    cbc, highs = solvers.get("cbc"), solvers.get("highs")
    main = cbc or highs
    for state in dict.fromkeys(r["state"] for r in rows):
        for b in dict.fromkeys(r["batch_size"] for r in rows if r["state"] == state):
            cell = [r for r in rows if r["state"] == state and r["batch_size"] == b]
            fish = [r[main] for r in cell]
            line: dict[str, Any] = {"state": state, "B": b, "batches": len(cell)}
            solved = sum(f["solved"] for f in fish)
            line["lp_feasible"] = solved / max(sum(f["samples"] for f in fish), 1)
            line["batches_all_feasible"] = float(
                np.mean([f["solved"] == f["samples"] for f in fish])
            )
            for label, name in (("cbc", cbc), ("highs", highs)):
                if name is not None:
                    line[f"lp_s_{label}"] = _median([r[name]["lp_seconds"] for r in cell])
            line["linf_median"] = _median([v for f in fish for v in f["linf"]])
            line["linf_max"] = _max([v for f in fish for v in f["linf"]])
            line["pert_psnr_median"] = _median([v for f in fish for v in f["perturbation_psnr"]])
            vs_trained = [v for f in fish for v in f["psnr_vs_trained"]]
            vs_original = [v for f in fish for v in f["psnr_vs_original"]]
            line["psnr_trained_median"] = _median(vs_trained)
            line["psnr_trained_min"] = _min(vs_trained)
            line["psnr_original_median"] = _median(vs_original)
            line["psnr_original_min"] = _min(vs_original)
            line["B_correct"] = float(np.mean([bool(f["batch_size_correct"]) for f in fish]))
            line["failed"] = sum(f["status"] != "ok" for f in fish)
            for label, name in (("cbc", cbc), ("highs", highs)):
                if name is not None:
                    line[f"total_s_{label}"] = _median([r[name]["total_seconds"] for r in cell])
            for name, label in (("exan", "exan"), ("inverting-gradients", "ig")):
                runs = [r[name] for r in cell if name in r]
                if not runs:
                    continue
                line[f"{label}_psnr_median"] = _median([v for f in runs for v in f["psnr"]])
                line[f"{label}_failed"] = sum(f["status"] != "ok" for f in runs)
                line[f"{label}_s"] = _median([f["seconds"] for f in runs])
                line[f"{label}_batches"] = len(runs)
            if "ig_s" in line:
                for label in ("cbc", "highs"):
                    if f"total_s_{label}" in line and line[f"total_s_{label}"]:
                        line[f"ig_over_fishing_{label}"] = line["ig_s"] / line[f"total_s_{label}"]
            table.append(line)
    return table


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


def fishing_study_command(
    config: RunConfig, options: FishingStudyOptions, progress: bool = True, echo: Any = print
) -> int:
    """Run the study: ``config`` gives the run keys it shares with ``leakbench run``
    (:data:`~leakbench.analysis.commands.STUDY_RUN_KEYS`), ``options`` its own."""
    study = Study.from_config(config)
    batch_sizes = [int(b) for b in config.batch_sizes]
    states = options.train_epochs
    solvers = {s: f"fishing-{s}" for s in options.solvers}
    attacks = {
        label: prepared("fishing", {**options.fishing_options, "solver": solver})
        for solver, label in solvers.items()
    }
    if options.ig_trials > 0:
        attacks["inverting-gradients"] = prepared("inverting-gradients", options.ig_options)
    attacks["exan"] = prepared("exan", {})
    if Capability.CLIENT_CODE not in attacks[next(iter(solvers.values()))].requires:
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
    summary = summarize(rows, solvers)
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
        "LP and perturbation (fishing; LP wall time per batch, L∞ in pixel units)": (
            "state", "B", "batches", "lp_feasible", "batches_all_feasible", "lp_s_cbc",
            "lp_s_highs", "linf_median", "linf_max", "pert_psnr_median",
        ),
        "reconstruction (PSNR dB vs the perturbed and vs the original batch)": (
            "state", "B", "psnr_trained_median", "psnr_trained_min", "psnr_original_median",
            "psnr_original_min", "B_correct", "failed",
        ),
        "time (s; fishing = client code + reconstruction) and baselines on the original batches": (
            "state", "B", "total_s_cbc", "total_s_highs", "exan_psnr_median", "exan_failed",
            "exan_s", "ig_psnr_median", "ig_s", "ig_batches", "ig_over_fishing_cbc",
            "ig_over_fishing_highs",
        ),
    }  # fmt: skip
    for title, columns in groups.items():
        echo(f"\n{title}")
        echo(format_table([{c: line.get(c) for c in columns if c in line} for line in summary]))
    echo(f"results: {run_dir}")
    return 0
