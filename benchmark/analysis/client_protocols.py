"""How attacks fare when the client does not share one FedSGD gradient (issue 11, item 2).

For victim/attack pairs on lfw-subset (by default FCN/ExAN, LeNet-Zhu/DLG and
LeNet-Zhu/Inverting Gradients at random initialisation) and a list of client protocols (by
default FedSGD, FedAvg with 1, 5 and 20 local full-batch SGD steps, and the sum of 1, 4 and 16
FedSGD clients, as under secure aggregation), it runs a few trials per setting through the trial
protocol (:func:`leakbench.protocol.run_trial`) and reports, per (pair, protocol): the median
PSNR over every private sample behind the update (under an aggregate, every client's), the
success rate (samples at ≥ 30 dB), failed trials and the median attack time.

Each attack is granted what its class requires and, by default, the protocol's local
hyperparameters (``local_hyperparameters``: the attacker's best case;
``--no-local-hyperparameters`` withholds them, which refuses Inverting Gradients under FedAvg
before any trial). ``batch_size`` is one client's B: an aggregate of K clients draws K·B
samples per trial.

``leakbench client-protocols --help`` lists its options.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leakbench.analysis.boundary import Study, format_table, to_csv
from leakbench.client import Aggregate, ClientProtocol, FedAvg, FedSGD
from leakbench.interfaces import Defense
from leakbench.metrics import DEFAULT_SUCCESS_PSNR
from leakbench.progress import track
from leakbench.protocol import TrialSetting, run_trial
from leakbench.protocol.attack import prepare_attack
from leakbench.protocol.isolation import Placement, default_threads
from leakbench.results import atomic_write_text
from leakbench.runner import study_placement
from leakbench.threat_model import Budget, Capability


@dataclass(frozen=True)
class Pair:
    """A victim, the attack on it, and one client's batch size."""

    model: str
    attack: str
    batch_size: int
    attack_options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.attack}"


# Small iteration budgets: the defaults finish in minutes on two cores.
DEFAULT_PAIRS = (
    Pair("fcn-exan", "exan", 4),
    Pair("lenet-zhu", "dlg", 1, {"iterations": 20}),
    Pair("lenet-zhu", "inverting-gradients", 1, {"iterations": 100}),
)


def protocol_settings(
    local_steps: Sequence[int] = (1, 5, 20),
    clients: Sequence[int] = (1, 4, 16),
    lr: float = 0.01,
    local_batch_size: int | None = None,
) -> list[tuple[str, ClientProtocol]]:
    """FedSGD, FedAvg with each number of local steps, and the sum of each number of FedSGD
    clients, labelled for the table."""
    settings: list[tuple[str, ClientProtocol]] = [("fedsgd", FedSGD())]
    settings += [
        (f"fedavg E={e}", FedAvg(lr=lr, local_steps=e, local_batch_size=local_batch_size))
        for e in local_steps
    ]
    settings += [(f"aggregate K={k}", Aggregate(clients=k)) for k in clients]
    return settings


def client_protocol_study(
    pairs: Sequence[Pair] = DEFAULT_PAIRS,
    protocols: Sequence[tuple[str, ClientProtocol]] | None = None,
    *,
    trials: int = 2,
    dataset: str = "lfw-subset",
    split: str = "train",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    grant_local_hyperparameters: bool = True,
    placement: Placement | None = None,
    progress: bool = False,
    echo: Callable[[str], Any] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``trials`` trials of every pair under every protocol; returns (summary rows, records).

    Every attack is prepared for every protocol before the first trial, so an unsupported
    combination is refused up front (:class:`leakbench.protocol.attack.UnsupportedClientProtocol`).
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials = {trials!r}: expected a positive integer")
    protocols = list(protocols if protocols is not None else protocol_settings())
    extra = {Capability.LOCAL_HYPERPARAMETERS} if grant_local_hyperparameters else set()
    placement = placement or Placement("process", default_threads())
    prepared = {}
    for pair in pairs:
        for label, protocol in protocols:
            prepared[pair.label, label] = prepare_attack(
                pair.attack, pair.attack_options, frozenset(Capability), protocol,
                placement=placement,
            )  # fmt: skip
    summary: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for pair in pairs:
        study = Study(dataset=dataset, split=split, model=pair.model, dtype=dtype, seed=seed)
        dm = study.reference
        for label, protocol in protocols:
            attack = prepared[pair.label, label]
            setting = TrialSetting(
                cell=f"{pair.label}/{label}",
                attack_name=pair.attack,
                defense_name="none",
                batch_size=pair.batch_size,
                input_shape=tuple(dm.input_shape),
                num_classes=dm.num_classes,
                mean=tuple(dm.mean),
                std=tuple(dm.std),
                granted=attack.requires | extra,
                budget=Budget(),
                dtype=dtype,
                client_mode="eval",
                seed=seed,
                success_psnr=DEFAULT_SUCCESS_PSNR,
                isolation=placement.isolation,
                sandbox_view=placement.view,
                threads=placement.threads,
                client_protocol=protocol,
            )
            cell = []
            batches = study.trials(protocol.samples_per_trial(pair.batch_size), trials)
            for batch in track(batches, f"{pair.label} {label}", progress):
                record = run_trial(study.victim_spec(), attack, Defense(), setting, batch).record
                cell.append(record)
            records += cell
            summary.append(summarize(pair, label, protocol, cell))
            row = summary[-1]
            echo(
                f"{row['pair']} {label}: median PSNR {_fmt(row['psnr_median'])} dB, success "
                f"{_fmt(row['success_rate'])}, failed {row['failed']}/{row['trials']}"
            )
    return summary, records


def summarize(
    pair: Pair, label: str, protocol: ClientProtocol, cell: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """One table row: median PSNR and success rate over every private sample of the cell."""
    samples = [s for r in cell for s in r["metrics"]["samples"]]
    seconds = [r["time_s"] for r in cell if r.get("time_s") is not None]
    return {
        "pair": pair.label,
        "protocol": label,
        "B": pair.batch_size,
        "samples": protocol.samples_per_trial(pair.batch_size),
        "trials": len(cell),
        "psnr_median": statistics.median(s["psnr"] for s in samples) if samples else None,
        "success_rate": sum(bool(s["success"]) for s in samples) / len(samples)
        if samples
        else None,
        "failed": sum(r["status"] != "ok" for r in cell),
        "attack_s": statistics.median(seconds) if seconds else None,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def client_protocols_command(
    *,
    pairs: Sequence[str] | None,
    trials: int,
    local_steps: Sequence[int],
    clients: Sequence[int],
    lr: float,
    local_batch_size: int | None,
    attack_options: dict[str, dict[str, Any]],
    local_hyperparameters: bool,
    dtype: str,
    seed: int,
    isolation: str,
    output_dir: str | None,
    progress: bool = True,
    echo: Any = print,
) -> int:
    """``leakbench client-protocols``: the study's table, and its files under ``output_dir``."""
    chosen = [
        Pair(
            p.model,
            p.attack,
            p.batch_size,
            {**p.attack_options, **attack_options.get(p.attack, {})},
        )
        for p in DEFAULT_PAIRS
        if not pairs or p.label in pairs
    ]
    if not chosen:
        valid = ", ".join(p.label for p in DEFAULT_PAIRS)
        raise ValueError(f"pairs: got {list(pairs or [])}, expected some of {valid}")
    protocols = protocol_settings(local_steps, clients, lr, local_batch_size)
    started = time.perf_counter()
    summary, records = client_protocol_study(
        chosen,
        protocols,
        trials=trials,
        dtype=getattr(torch, dtype),
        seed=seed,
        grant_local_hyperparameters=local_hyperparameters,
        placement=study_placement(isolation, [p.attack for p in chosen], output_dir),
        progress=progress,
        echo=echo,
    )
    echo("\n" + format_table(summary))
    echo(f"wall time: {time.perf_counter() - started:.1f} s")
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "client_protocols.csv", to_csv(summary))
        atomic_write_text(out / "client_protocols.json", json.dumps(records) + "\n")
        echo(f"results: {out}")
    return 0
