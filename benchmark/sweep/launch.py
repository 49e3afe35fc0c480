"""Launching the runs of a grid through submitit: what each run asks the scheduler for
(``Resources``), the job every task of it runs (``execute``, with its heartbeat), and the launchers
(``--launcher local`` and ``--launcher slurm``, registered with ``launcher``)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakbench.config import ConfigError, RunConfig
from leakbench.results import RunDirectory, atomic_write_text
from leakbench.sweep.grid import Grid, PlannedRun, expected_trials

HEARTBEAT_FILE = ".sweep-heartbeat.json"
FAILED_FILE = ".sweep-failed.json"
HEARTBEAT_S = float(os.environ.get("LEAKBENCH_SWEEP_HEARTBEAT_S", "30"))
POLL_S = 0.5  # how often the local launcher looks at its jobs
SLACK_MIN = 10  # added to a time limit bounded by the trial budget: start-up, summary
DEFAULT_TIME_MIN = 120  # when the budget sets no per-trial limit


class LauncherUnavailable(ConfigError):
    """The launcher asked for cannot run on this machine (e.g. no SLURM here)."""


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Resources:
    """What one run asks the scheduler for: one job of ``tasks`` tasks (DDP ranks) on one node."""

    tasks: int
    cpus_per_task: int
    gpus_per_node: int
    mem_gb: float
    time_min: int
    time_from_budget: bool
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()

    def describe(self) -> str:
        text = (
            f"{self.tasks} task{'s' if self.tasks > 1 else ''} x {self.cpus_per_task} CPU, "
            f"{self.gpus_per_node} GPU, {self.mem_gb:g} GB, {self.time_min} min"
        )
        text += " (trial budget bound)" if self.time_from_budget else ""
        return text + (f", partition {self.partition}" if self.partition else "")


def run_resources(run: PlannedRun, requested: dict[str, Any]) -> Resources:
    """A run's request: the grid's (or the flags') resources, else what its config implies."""
    config = run.config
    tasks = config.processes()
    gpus = requested.get("gpus_per_node")
    if gpus is None:
        gpus = tasks if str(config.accelerator) in ("gpu", "cuda") else 0
    time_min = requested.get("time_min")
    from_budget = time_min is None
    if time_min is None:
        limit = config.budget.max_seconds
        time_min = (
            SLACK_MIN + math.ceil(expected_trials(config) * float(limit) / tasks / 60)
            if limit
            else DEFAULT_TIME_MIN
        )
    return Resources(
        tasks=tasks,
        cpus_per_task=int(requested.get("cpus_per_task") or config.threads or 2),
        gpus_per_node=int(gpus),
        mem_gb=float(requested.get("mem_gb") or 4 * tasks),
        time_min=int(time_min),
        time_from_budget=from_budget,
        partition=requested.get("partition"),
        account=requested.get("account"),
        qos=requested.get("qos"),
        constraint=requested.get("constraint"),
        setup=tuple(requested.get("setup") or ()),
    )


def measured_peak_mb(path: Path) -> float | None:
    """The largest peak RSS (harness or attack worker) the run's trials recorded so far."""
    if not path.is_dir():
        return None
    peaks = [
        value
        for record in RunDirectory(path).records()
        for key in ("peak_rss_mb", "harness_peak_rss_mb")
        if isinstance(value := (record.get("memory") or {}).get(key), (int, float))
    ]
    return max(peaks) if peaks else None


# --------------------------------------------------------------------------- the job


class Heartbeat(AbstractContextManager["Heartbeat"]):
    """Keeps ``.sweep-heartbeat.json`` in a run folder fresh while a job runs it."""

    def __init__(self, run_path: Path, job_id: str) -> None:
        self.path = run_path / HEARTBEAT_FILE
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": job_id,
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        atomic_write_text(self.path, json.dumps(self.info) + "\n")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def _join_ranks(job_id: str, local_rank: int) -> None:
    """Turn this submitit task into a Lightning rank. On SLURM, Lightning reads srun's
    variables itself; elsewhere (the local executor) the tasks are told who they are, the way
    torchrun would, so that Lightning does not start processes of its own."""
    os.environ.update(
        LOCAL_RANK=str(local_rank),
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        # The same port for every task of a job, different across concurrent local jobs.
        MASTER_PORT=str(20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000),
    )


def execute(values: dict[str, Any]) -> dict[str, Any]:
    """Run, or continue, one run of a grid inside a submitit job (every task is one rank).

    The run's folder is continued by ``leakbench.runner.run`` itself (trials already recorded
    are skipped); a folder of another configuration is refused by every rank before DDP starts.
    Returns the trials the run holds and the seconds this call took.
    """
    import submitit

    from leakbench.runner import RUN_DIR_VARIABLE, refuse_another_configuration, run

    config = RunConfig.from_mapping(dict(values), source="sweep job")
    run_path = Path(config.output_dir) / str(config.run_name)
    env = submitit.JobEnvironment()
    if config.processes() > 1 and env.cluster != "slurm":
        _join_ranks(env.job_id, env.local_rank)
    first = env.global_rank == 0
    if not first:  # the folder is the first rank's; the others only add their records
        os.environ[RUN_DIR_VARIABLE] = str(run_path.resolve())
    # Every rank checks, not only the first: a rank that went on would wait for the others forever.
    refuse_another_configuration(run_path, config, "refused, not merged")
    run_path.mkdir(parents=True, exist_ok=True)
    if first:
        (run_path / FAILED_FILE).unlink(missing_ok=True)
    beat: AbstractContextManager[Any] = Heartbeat(run_path, env.job_id) if first else nullcontext()
    start = time.monotonic()
    with beat:
        try:
            summary = run(config, progress=False)
        except BaseException as exc:
            if first:
                error = {"error": f"{type(exc).__name__}: {exc}", "job_id": env.job_id}
                atomic_write_text(run_path / FAILED_FILE, json.dumps(error) + "\n")
            raise
    return {
        "run": config.run_name,
        "trials": sum(cell["trials"] for cell in summary["cells"].values()),
        "seconds": time.monotonic() - start,
    }


# --------------------------------------------------------------------------- launchers


@dataclass
class LaunchOptions:
    jobs: int = 1
    resources: dict[str, Any] = field(default_factory=dict)  # the grid's, then the flags'


Launcher = Callable[[Grid, list[PlannedRun], LaunchOptions, Callable[[str], None]], int]


@dataclass(frozen=True)
class LauncherSpec:
    launch: Launcher
    check: Callable[[], None]  # raises LauncherUnavailable where it cannot run


LAUNCHERS: dict[str, LauncherSpec] = {}


def _always() -> None:
    return None


def launcher(name: str, check: Callable[[], None] = _always) -> Callable[[Launcher], Launcher]:
    """Decorator: register a launcher under ``name`` (``--launcher NAME``); ``check`` says,
    before anything is printed or launched, whether it can run here."""

    def register(function: Launcher) -> Launcher:
        if name in LAUNCHERS:
            raise ValueError(f"launcher {name!r} is already registered")
        LAUNCHERS[name] = LauncherSpec(function, check)
        return function

    return register


def _last_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(no message)"


def local_executor(folder: Path, resources: Resources, name: str) -> Any:
    """submitit's local executor, shaped for one run: its tasks (ranks) and its time limit."""
    import submitit
    import torch

    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(
        name=name,
        timeout_min=resources.time_min,
        tasks_per_node=resources.tasks,
        # The local executor hides the GPUs it was not asked for.
        gpus_per_node=resources.gpus_per_node or torch.cuda.device_count(),
    )
    return executor


@launcher("local")
def launch_local(
    grid: Grid, runs: list[PlannedRun], options: LaunchOptions, echo: Callable[[str], None]
) -> int:
    """Run the jobs on this machine through submitit's local executor, ``jobs`` at a time."""
    pending = list(runs)
    running: dict[Any, PlannedRun] = {}
    failed = 0
    try:
        while pending or running:
            while pending and len(running) < max(1, options.jobs):
                run = pending.pop(0)
                resources = run_resources(run, options.resources)
                executor = local_executor(
                    grid.submitit_folder, resources, f"{grid.name}-{run.name}"
                )
                job = executor.submit(execute, run.config.to_dict())
                running[job] = run
                echo(f"started  {run.name} (local job {job.job_id})")
            finished = [job for job in running if job.done()]
            if not finished:
                time.sleep(POLL_S)
                continue
            for job in finished:
                run = running.pop(job)
                try:
                    result = job.results()[0]  # rank 0 speaks for the run
                except Exception as exc:  # the job's traceback comes back as text
                    failed += 1
                    echo(f"failed   {run.name}: {_last_line(str(exc))} (log: {job.paths.stderr})")
                else:
                    echo(
                        f"done     {run.name}: {result['trials']} trials, {result['seconds']:.1f} s"
                    )
    except KeyboardInterrupt:
        for job in running:
            job.cancel(check=False)
        echo("interrupted; re-launch the grid to finish what is missing")
        return 130
    return 1 if failed else 0


def slurm_executor(folder: Path, resources: Resources, name: str, parallelism: int) -> Any:
    """submitit's SLURM executor for one array: every task of it asks for ``resources``."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        name=name,
        nodes=1,  # a sharded run's ranks share one node
        tasks_per_node=resources.tasks,
        cpus_per_task=resources.cpus_per_task,
        gpus_per_node=resources.gpus_per_node,
        mem_gb=resources.mem_gb,
        timeout_min=resources.time_min,
        slurm_partition=resources.partition,
        slurm_account=resources.account,
        slurm_qos=resources.qos,
        slurm_constraint=resources.constraint,
        slurm_setup=list(resources.setup) or None,
        slurm_array_parallelism=parallelism,
    )
    return executor


def check_slurm() -> None:
    import submitit

    if submitit.SlurmExecutor.affinity() <= 0:  # submitit's own test: is srun on the PATH
        raise LauncherUnavailable(
            "no SLURM on this machine (srun not found); use --launcher local, or --dry-run "
            "to see the plan"
        )


@launcher("slurm", check=check_slurm)
def launch_slurm(
    grid: Grid, runs: list[PlannedRun], options: LaunchOptions, echo: Callable[[str], None]
) -> int:
    """Submit one SLURM job array per resource shape, one array task per run; returns at once."""
    shapes: dict[Resources, list[PlannedRun]] = {}
    for run in runs:
        shapes.setdefault(run_resources(run, options.resources), []).append(run)
    parallelism = int(options.resources.get("array_parallelism") or 256)
    for resources, group in shapes.items():
        executor = slurm_executor(grid.submitit_folder, resources, grid.name, parallelism)
        jobs = executor.map_array(execute, [run.config.to_dict() for run in group])
        echo(
            f"submitted array {jobs[0].job_id.split('_')[0]}: {len(group)} run(s), each "
            f"{resources.describe()}: {', '.join(run.name for run in group)}"
        )
    echo(f"logs: {grid.submitit_folder}; follow with: leakbench sweep status {grid.path}")
    return 0
