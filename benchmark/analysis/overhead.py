"""What isolating attacks costs, as ``leakbench overhead``.

Runs one configuration with the attacks' code in-process, in a fresh worker process per job
and in the sandbox (where the machine can make one), alternating the modes over a few rounds,
and prints per cell the median wall time of a whole trial (as the harness sees it: client,
defense, attack, scoring) in each mode and what each isolation adds on top of in-process and of
``process``. The start-ups paid once per process (the workers' fork server, the warm sandbox)
are measured first and reported on their own lines.
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


def warm_sandbox(config: RunConfig) -> float | None:
    """Start the run's warm sandbox (once per process); the seconds it took, None without one."""
    from leakbench.protocol.isolation import default_threads
    from leakbench.protocol.sandbox import warm_sandbox as start
    from leakbench.runner import run_placement

    placement, _ = run_placement(config, config.threads or default_threads())
    if placement.view is None:
        return None
    started = time.perf_counter()
    start(placement.view)
    return time.perf_counter() - started


def overhead_rows(
    config: RunConfig,
    output_dir: Path,
    rounds: int = 2,
    progress: bool = False,
    modes: tuple[str, ...] = ("in-process", "process", "sandbox"),
) -> list[dict[str, Any]]:
    """Median whole-trial wall time per cell and mode. The modes alternate over ``rounds``
    rounds, so that a change in machine load hits all alike. ``progress``: each run's bar."""
    walls: dict[str, dict[str, list[float]]] = {}
    for round_ in range(rounds):
        for mode in modes:
            name = f"overhead-{mode}-{round_}"
            values = {**config.to_dict(), "isolation": mode, "logger": "none"}
            values.update(output_dir=str(output_dir), run_name=name)
            run(RunConfig.from_mapping(values), progress=progress, echo=lambda _: None)
            for path in (output_dir / name).glob("trials*.jsonl"):
                for record in map(json.loads, path.read_text().splitlines()):
                    # The mode the trial really ran in (a sandbox falls back where there is none).
                    walls.setdefault(record["cell"], {}).setdefault(record["isolation"], []).append(
                        record["wall_s"]
                    )
    rows = []
    for cell, by_mode in walls.items():
        medians = {mode: float(np.median(values)) for mode, values in by_mode.items()}
        here = medians["in-process"]
        row: dict[str, Any] = {"cell": cell, "trials": len(by_mode["in-process"])}
        for mode in modes:
            row[f"{mode}_s"] = medians.get(mode)
        for mode, base in (("process", "in-process"), ("sandbox", "process")):
            if mode in medians and base in medians:
                row[f"{mode}_over_{base}_s"] = medians[mode] - medians[base]
        row["process_overhead_pct"] = (
            100 * (medians["process"] - here) / here if here > 0 else float("nan")
        )
        rows.append(row)
    return rows


def overhead_command(
    config: RunConfig, rounds: int = 2, progress: bool = False, echo: Any = print
) -> int:
    """``leakbench overhead`` (declared in :mod:`leakbench.analysis.commands`)."""
    from leakbench.protocol.sandbox import sandbox_unavailable

    echo(f"fork server start-up (once per process): {warm_fork_server():.2f} s")
    reason = sandbox_unavailable()
    modes: tuple[str, ...] = ("in-process", "process")
    if reason is None:
        echo(f"warm sandbox start-up (once per process): {warm_sandbox(config):.2f} s")
        modes += ("sandbox",)
    else:
        echo(f"no sandbox on this machine: {reason}")
    with tempfile.TemporaryDirectory() as folder:
        rows = overhead_rows(config, Path(folder), rounds, progress=progress, modes=modes)
    header = f"{'cell':<34}{'trials':>7}{'in-process':>12}{'process':>10}"
    header += f"{'sandbox':>10}{'proc - in':>11}{'sbx - proc':>12}"
    echo(header)
    for r in rows:
        sandbox = r.get("sandbox_s")
        over = r.get("sandbox_over_process_s")
        echo(
            f"{r['cell']:<34}{r['trials']:>7}{r['in-process_s']:>11.3f}s{r['process_s']:>9.3f}s"
            + (f"{sandbox:>9.3f}s" if sandbox is not None else f"{'-':>10}")
            + f"{r['process_over_in-process_s']:>10.3f}s"
            + (f"{over:>11.3f}s" if over is not None else f"{'-':>12}")
        )
    return 0
