"""What isolating attacks costs, as ``leakbench overhead``.

Runs one configuration with attacks in a fresh worker process per trial (the default) and
in-process, alternating the two modes over a few rounds, and prints per cell the median wall
time of a whole trial (as the harness sees it: client, defense, attack, scoring) in each mode,
their difference and that difference as a share of the in-process trial. The fork server that
workers are forked from starts once per process; its start-up is measured first and reported on
its own line.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from leakbench.config import RunConfig
from leakbench.runner import run


def warm_fork_server() -> float:
    """Start the workers' fork server (once per process); returns the seconds it took."""
    from leakbench.protocol.isolation import worker_context

    started = time.perf_counter()
    context = worker_context()
    worker = context.Process(target=time.sleep, args=(0,))
    worker.start()
    worker.join()
    return time.perf_counter() - started


def overhead_rows(
    config: RunConfig, output_dir: Path, rounds: int = 2, progress: bool = False
) -> list[dict[str, Any]]:
    """Median whole-trial wall time per cell and mode. The modes alternate over ``rounds``
    rounds, so that a change in machine load hits both alike. ``progress``: each run's bar."""
    walls: dict[str, dict[str, list[float]]] = {}
    for round_, mode in enumerate(["in-process", "process"] * rounds):
        values = {**config.to_dict(), "isolation": mode, "logger": "none"}
        values.update(output_dir=str(output_dir), run_name=f"overhead-{mode}-{round_}")
        run(RunConfig.from_mapping(values), progress=progress, echo=lambda _: None)
        for path in (output_dir / f"overhead-{mode}-{round_}").glob("trials*.jsonl"):
            for record in map(json.loads, path.read_text().splitlines()):
                walls.setdefault(record["cell"], {}).setdefault(mode, []).append(record["wall_s"])
    rows = []
    for cell, by_mode in walls.items():
        here = float(np.median(by_mode["in-process"]))
        isolated = float(np.median(by_mode["process"]))
        rows.append(
            {
                "cell": cell,
                "trials": len(by_mode["process"]),  # per mode, over all rounds
                "in_process_s": here,
                "process_s": isolated,
                "overhead_s": isolated - here,
                "overhead_pct": 100 * (isolated - here) / here if here > 0 else float("nan"),
            }
        )
    return rows


def overhead_command(
    config: RunConfig, rounds: int = 2, progress: bool = False, echo: Any = print
) -> int:
    """``leakbench overhead`` (declared in :mod:`leakbench.analysis.commands`)."""
    echo(f"fork server start-up (once per process): {warm_fork_server():.2f} s")
    with tempfile.TemporaryDirectory() as folder:
        rows = overhead_rows(config, Path(folder), rounds, progress=progress)
    echo(f"{'cell':<36}{'trials':>7}{'in-process':>12}{'process':>10}{'overhead':>10}{'%':>8}")
    for r in rows:
        echo(
            f"{r['cell']:<36}{r['trials']:>7}{r['in_process_s']:>11.3f}s{r['process_s']:>9.3f}s"
            f"{r['overhead_s']:>9.3f}s{r['overhead_pct']:>7.1f}%"
        )
    return 0
