"""The command line of sweeps: ``leakbench sweep GRID.yaml`` launches a grid; ``sweep status``,
``sweep collect`` and ``sweep throughput`` are its other commands (typed functions, see
:mod:`leakbench.commands`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from leakbench.commands import command
from leakbench.config import Count, RunConfig
from leakbench.results import atomic_write_text
from leakbench.sweep.collect import collect_rows, render_collected, write_entries
from leakbench.sweep.grid import Grid, _tracks_dir, expected_trials, load_grid
from leakbench.sweep.launch import LAUNCHERS, LaunchOptions, measured_peak_mb, run_resources
from leakbench.sweep.status import LAUNCHABLE, RunStatus, format_status, grid_status
from leakbench.sweep.throughput import format_throughput, measure_throughput

LauncherName = Literal[tuple(sorted(LAUNCHERS))]  # type: ignore[valid-type]


@dataclass
class ResourceOptions:
    """Resources of every run of the grid; each given one overrides the grid file's.

    Args:
        partition: SLURM partition.
        time_min: Time limit per run (minutes).
        cpus_per_task: CPUs per task.
        gpus_per_node: GPUs per node.
        mem_gb: Memory per run (GB).
        array_parallelism: Array tasks running at once.
        account: SLURM account.
        qos: SLURM quality of service.
        constraint: SLURM node constraint.
        signal_delay_s: Seconds before the time limit at which a job is told (SIGUSR2) to
            requeue itself (default: 90, or a quarter of a shorter limit).
    """

    partition: str | None = None
    time_min: Count | None = None
    cpus_per_task: Count | None = None
    gpus_per_node: int | None = None
    mem_gb: float | None = None
    array_parallelism: Count | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: Count | None = None


@command("sweep")
def launch_command(
    grid: str,
    resources: ResourceOptions,
    *,
    dry_run: bool = False,
    launcher: LauncherName = "local",
    jobs: Count = 1,  # type: ignore[assignment]
) -> int:
    """Expand a grid of runs and launch what is missing or failed (local or SLURM).

    Args:
        grid: The grid file (GRID.yaml).
        dry_run: Print the plan; launch nothing.
        launcher: Where the runs go.
        jobs: Local runs at a time.
    """
    planned = load_grid(grid)
    flags = {f.name: getattr(resources, f.name) for f in fields(resources)}
    given = {key: value for key, value in flags.items() if value}
    options = LaunchOptions(jobs=jobs, resources={**planned.resources, **given})
    # A launch must know what is queued or running; the plan may show what the folders say.
    found = grid_status(planned.runs, strict=not dry_run)
    statuses = {status.name: status for status in found}
    todo = [run for run in planned.runs if statuses[run.name].state in LAUNCHABLE]
    if dry_run:
        print(format_plan(planned, statuses, options, launcher))
        return 0
    LAUNCHERS[launcher].check()
    for run in planned.runs:
        status = statuses[run.name]
        if status.state not in LAUNCHABLE:
            print(f"skipped  {run.name}: {status.state} {status.note}".rstrip())
    print(f"grid {planned.name}: {len(todo)} of {len(planned.runs)} runs to launch ({launcher})")
    if not todo:
        return 0
    # The launcher decides again under the grid's launch lock: another launch may have come.
    return LAUNCHERS[launcher].launch(planned, todo, options, print)


def format_plan(
    grid: Grid, statuses: dict[str, RunStatus], options: LaunchOptions, launcher_name: str
) -> str:
    width = max([len("run")] + [len(run.name) for run in grid.runs]) + 2
    lines = [f"grid {grid.name} ({grid.path}) -> {grid.output_dir}"]
    total_trials, cpu_count, gpu_count, mem, minutes, todo = 0, 0, 0, 0.0, 0, 0
    for run in grid.runs:
        status = statuses[run.name]
        resources = run_resources(run, options.resources)
        trials = expected_trials(run.config)
        peak = measured_peak_mb(run.path)
        measured = f"; peak RSS so far {peak:.0f} MB" if peak is not None else ""
        lines.append(
            f"  {run.name:<{width}}{status.state:<9}{trials:>6} trials  "
            f"{resources.describe()}{measured}"
        )
        total_trials += trials
        if status.state in LAUNCHABLE:
            todo += 1
            cpu_count += resources.tasks * resources.cpus_per_task
            gpu_count += resources.gpus_per_node
            mem += resources.mem_gb
            minutes += resources.time_min
    lines.append(
        f"total: {len(grid.runs)} runs, {total_trials} trials; {todo} to launch with "
        f"--launcher {launcher_name}, asking in all for {cpu_count} CPUs, {gpu_count} GPUs, "
        f"{mem:g} GB and {minutes} job-minutes"
    )
    return "\n".join(lines)


@command("sweep status")
def status_command(grid: str) -> int:
    """The state of every run of a grid (done, running, queued, failed, missing).

    Args:
        grid: The grid file (GRID.yaml).
    """
    planned = load_grid(grid, check=False)
    print(format_status(planned, grid_status(planned.runs, strict=False)))
    return 0


@command("sweep collect")
def collect_command(
    grid: str,
    *,
    out: str | None = None,
    entries_dir: str | None = None,
    tracks_dir: str | None = None,
    replace: bool = False,
) -> int:
    """Collect a grid's finished runs into CSV and Markdown tables (and leaderboard entries).

    Args:
        grid: The grid file (GRID.yaml).
        out: Folder for <grid>.csv and <grid>.md (default: the grid's).
        entries_dir: Also write a leaderboard entry per cell of each track run here; then
            `leakbench leaderboard render --entries-dir DIR`.
        tracks_dir: Folder of the track files (default: the package's).
        replace: Overwrite entries of the same name.
    """
    planned = load_grid(grid, check=False)
    rows, left_out = collect_rows(planned)
    tables = render_collected(planned, rows, left_out)
    folder = Path(out) if out else planned.output_dir
    for suffix, text in tables.items():
        atomic_write_text(folder / f"{planned.name}.{suffix}", text)
        print(f"wrote {folder / f'{planned.name}.{suffix}'}")
    print(tables["md"], end="")
    if entries_dir:
        tracks = Path(tracks_dir) if tracks_dir else _tracks_dir()
        write_entries(rows, Path(entries_dir), tracks, print, replace)
    return 0


@command("sweep throughput")
def throughput_command(
    *,
    config: str | None = None,
    attack: str = "dlg",
    processes: list[Count] | None = None,
    trials: Count = 16,  # type: ignore[assignment]
    threads: Count | None = None,
    output_dir: str | None = None,
) -> int:
    """Trials per minute of one attack on 1, 2, ... processes.

    Args:
        config: A CPU-bound track or run config file (default: lfw-subset-fcn-exan-b4).
        attack: The attack to time.
        processes: Process counts (default: [1,2]).
        trials: Trials per timed run.
        threads: Intra-op threads per process (default: cores / processes).
        output_dir: Where the timed runs go (default: a temporary folder).
    """
    path = config or str(_tracks_dir() / "lfw-subset-fcn-exan-b4.yaml")
    run = RunConfig.load(path, {"attacks": [attack], "trials": trials, "threads": threads})
    counts = list(processes or [1, 2])
    if output_dir:
        results = measure_throughput(run, counts, Path(output_dir).resolve(), print)
    else:
        with tempfile.TemporaryDirectory(prefix="leakbench-throughput-") as tmp:
            results = measure_throughput(run, counts, Path(tmp), print)
    print(format_throughput(run, results))
    return 0
