"""The throughput benchmark (``leakbench sweep throughput``): trials per minute of one
configuration run on 1, 2, ... processes through the sweep's own local launcher."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leakbench.config import RunConfig
from leakbench.cores import default_threads
from leakbench.sweep.grid import PlannedRun
from leakbench.sweep.launch import execute, local_executor, run_resources


def measure_throughput(
    config: RunConfig, processes: Sequence[int], output_dir: Path, echo: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Run ``config`` once per process count, each as one local submitit job of that many
    ranks (the sweep's own path), and return trials per minute of each run's wall time."""
    results = []
    for count in processes:
        threads = config.threads or default_threads(count)
        values = {
            **config.to_dict(),
            "devices": count,
            "accelerator": "cpu",
            "threads": threads,
            "logger": "none",
            "output_dir": str(output_dir),
            "run_name": f"processes-{count}",
        }
        run = PlannedRun(f"processes-{count}", RunConfig.from_mapping(values), {})
        resources = run_resources(run, {})
        load_before = os.getloadavg()
        job = local_executor(output_dir / ".submitit", resources, run.name).submit(
            execute, run.config.to_dict()
        )
        result = job.results()[0]  # rank 0 speaks for the run
        load_after = os.getloadavg()
        rate = 60.0 * result["trials"] / result["seconds"]
        results.append(
            {
                "processes": count,
                "threads": threads,
                "trials": result["trials"],
                "seconds": result["seconds"],
                "trials_per_min": rate,
                "load_before": load_before,
                "load_after": load_after,
            }
        )
        echo(f"{count} process(es): {result['trials']} trials in {result['seconds']:.1f} s")
    return results


def format_throughput(config: RunConfig, results: list[dict[str, Any]]) -> str:
    base = results[0]["trials_per_min"] if results else 1.0
    track = (config.track or {}).get("name", config.model)
    lines = [
        f"throughput: {track}, attacks {', '.join(config.attacks)}, {config.trials} trials per "
        f"cell, {os.cpu_count()} cores",
        f"{'processes':>9}{'threads':>9}{'trials':>8}{'seconds':>9}{'trials/min':>12}"
        f"{'speed-up':>10}  load avg (1, 5, 15 min) before -> after",
    ]
    for r in results:
        before = " ".join(f"{x:.2f}" for x in r["load_before"])
        after = " ".join(f"{x:.2f}" for x in r["load_after"])
        lines.append(
            f"{r['processes']:>9}{r['threads']:>9}{r['trials']:>8}{r['seconds']:>9.1f}"
            f"{r['trials_per_min']:>12.1f}{r['trials_per_min'] / base:>9.2f}x  "
            f"{before} -> {after}"
        )
    return "\n".join(lines)
