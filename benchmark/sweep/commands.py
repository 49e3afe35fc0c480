"""The command line, ``leakbench sweep``: launching a grid (the default), and the actions
``status``, ``collect`` and ``throughput`` (registered with ``action``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leakbench.config import ConfigError, RunConfig
from leakbench.results import atomic_write_text
from leakbench.sweep.collect import collect_rows, render_collected, write_entries
from leakbench.sweep.grid import RESOURCE_KEYS, Grid, _tracks_dir, expected_trials, load_grid
from leakbench.sweep.launch import LAUNCHERS, LaunchOptions, measured_peak_mb, run_resources
from leakbench.sweep.status import RunStatus, format_status, run_status
from leakbench.sweep.throughput import format_throughput, measure_throughput

USAGE = """\
leakbench sweep GRID.yaml [--dry-run] [--launcher local|slurm] [--jobs N] [resource flags]
leakbench sweep status GRID.yaml
leakbench sweep collect GRID.yaml [--out DIR] [--entries-dir DIR]
leakbench sweep throughput [--config TRACK.yaml] [--attack NAME] [--processes 1,2] [--trials N]"""

Action = Callable[[list[str]], int]
ACTIONS: dict[str, Action] = {}


def action(name: str) -> Callable[[Action], Action]:
    """Decorator: register ``leakbench sweep NAME ...``; anything else is a grid to launch."""

    def register(function: Action) -> Action:
        ACTIONS[name] = function
        return function

    return register


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="expand a grid of runs and launch it (local or SLURM), see its status, collect it",
        usage=USAGE,
        # The first paragraph of the package's overview (leakbench/sweep/__init__.py).
        description=sys.modules[__package__].__doc__.split("\n\n")[0],
    )
    p.add_argument("words", nargs=argparse.REMAINDER, help="GRID.yaml, or an action and its flags")
    p.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    words = list(args.words)
    if not words:
        print(f"usage:\n{USAGE}", file=sys.stderr)
        return 2
    if words[0] in ACTIONS:
        return ACTIONS[words[0]](words[1:])
    return launch_command(words)


def _resource_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (override the grid file's)")
    g.add_argument("--partition")
    g.add_argument("--time-min", type=int, help="time limit per run (minutes)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--array-parallelism", type=int, help="array tasks running at once")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")


def launch_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leakbench sweep", usage=USAGE)
    p.add_argument("grid")
    p.add_argument("--dry-run", action="store_true", help="print the plan; launch nothing")
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local")
    p.add_argument("--jobs", type=int, default=1, help="local runs at a time (default 1)")
    _resource_flags(p)
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    flags = {key: getattr(args, key) for key in RESOURCE_KEYS if getattr(args, key, None)}
    options = LaunchOptions(jobs=args.jobs, resources={**grid.resources, **flags})
    statuses = {run.name: run_status(run) for run in grid.runs}
    todo = [run for run in grid.runs if statuses[run.name].state in ("failed", "missing")]
    if args.dry_run:
        print(format_plan(grid, statuses, options, args.launcher))
        return 0
    LAUNCHERS[args.launcher].check()
    for run in grid.runs:
        status = statuses[run.name]
        if status.state in ("done", "running"):
            print(f"skipped  {run.name}: {status.state} {status.note}".rstrip())
    print(f"grid {grid.name}: {len(todo)} of {len(grid.runs)} runs to launch ({args.launcher})")
    if not todo:
        return 0
    return LAUNCHERS[args.launcher].launch(grid, todo, options, print)


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
        if status.state in ("failed", "missing"):
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


@action("status")
def status_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leakbench sweep status")
    p.add_argument("grid")
    args = p.parse_args(argv)
    grid = load_grid(args.grid, check=False)
    print(format_status(grid, [run_status(run) for run in grid.runs]))
    return 0


@action("collect")
def collect_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leakbench sweep collect")
    p.add_argument("grid")
    p.add_argument("--out", help="folder for <grid>.csv and <grid>.md (default: the grid's)")
    p.add_argument(
        "--entries-dir",
        help="also write a leaderboard entry per cell of each track run here; then "
        "`leakbench leaderboard render --entries-dir DIR`",
    )
    p.add_argument("--tracks-dir", default=str(_tracks_dir()))
    p.add_argument("--replace", action="store_true", help="overwrite entries of the same name")
    args = p.parse_args(argv)
    grid = load_grid(args.grid, check=False)
    rows, left_out = collect_rows(grid)
    tables = render_collected(grid, rows, left_out)
    out = Path(args.out) if args.out else grid.output_dir
    for suffix, text in tables.items():
        atomic_write_text(out / f"{grid.name}.{suffix}", text)
        print(f"wrote {out / f'{grid.name}.{suffix}'}")
    print(tables["md"], end="")
    if args.entries_dir:
        write_entries(rows, Path(args.entries_dir), Path(args.tracks_dir), print, args.replace)
    return 0


@action("throughput")
def throughput_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="leakbench sweep throughput")
    p.add_argument(
        "--config",
        default=str(_tracks_dir() / "lfw-subset-fcn-exan-b4.yaml"),
        help="a CPU-bound track or config (default: lfw-subset-fcn-exan-b4)",
    )
    p.add_argument("--attack", default="dlg", help="the attack to time (default: dlg)")
    p.add_argument("--processes", default="1,2", help="process counts, e.g. 1,2")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument(
        "--threads", type=int, help="intra-op threads per process (default: cores / processes)"
    )
    p.add_argument("--output-dir", help="where the timed runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        counts = [int(x) for x in args.processes.split(",")]
    except ValueError:
        raise ConfigError(f"--processes takes integers like 1,2, got {args.processes!r}") from None
    config = RunConfig.load(
        args.config, {"attacks": [args.attack], "trials": args.trials, "threads": args.threads}
    )
    if args.output_dir:
        output = Path(args.output_dir).resolve()
        results = measure_throughput(config, counts, output, print)
    else:
        with tempfile.TemporaryDirectory(prefix="leakbench-throughput-") as tmp:
            results = measure_throughput(config, counts, Path(tmp), print)
    print(format_throughput(config, results))
    return 0
