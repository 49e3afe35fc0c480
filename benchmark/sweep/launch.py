"""Launching the runs of a grid through submitit: what each run asks the scheduler for
(``Resources``), the job every task of it runs (``RunJob``: ``execute``, requeued on SIGUSR2), and
the launchers (``--launcher local`` and ``--launcher slurm``, registered with ``launcher``).

Every launcher decides and submits under the grid's launch lock, from states it reads under the
lock (``grid_status``), and records each job it submits with its run (``record_launch``): so a
run that is queued or running anywhere is never submitted again.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakbench.config import ConfigError, RunConfig
from leakbench.results import RunDirectory
from leakbench.sweep.grid import Grid, PlannedRun, expected_trials
from leakbench.sweep.ledger import (
    Heartbeat,
    clear_failure,
    launch_lock,
    process_start,
    record_failure,
    record_launch,
)
from leakbench.sweep.status import LAUNCHABLE, grid_status

POLL_S = 0.5  # how often the local launcher looks at its jobs
CANCEL_WAIT_S = 10.0  # how long an interrupted local launch waits for its jobs to end
SLACK_MIN = 10  # added to a time limit bounded by the trial budget: start-up, summary
DEFAULT_TIME_MIN = 120  # when the budget sets no per-trial limit
MAX_SIGNAL_DELAY_S = 90  # submitit's default warning before the time limit
# Requeues at the time limit before submitit gives a job up (its default is 3). Each requeue
# continues the run from its records; the bound only stops a run that cannot progress.
MAX_TIME_LIMIT_REQUEUES = 10


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
    signal_delay_s: int | None = None

    @property
    def warning_s(self) -> int:
        """Seconds before the time limit at which a SLURM job gets SIGUSR2 and requeues itself:
        submitit's 90, or a quarter of a short limit (a job warned at its start never ends).
        (submitit's local executor warns 30 s before.)"""
        if self.signal_delay_s is not None:
            return self.signal_delay_s
        return min(MAX_SIGNAL_DELAY_S, 15 * self.time_min)

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
        signal_delay_s=requested.get("signal_delay_s"),
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
    A rank that fails records its error unless another rank did first (the cause, not the
    symptom). An interruption records nothing: the signal goes on to the handler submitit set
    (SIGUSR2: checkpoint and requeue; SIGTERM: noted) and the job's processes end at once.
    Returns the trials the run holds and the seconds this call took.
    """
    import submitit

    from leakbench.interruption import end_process, received
    from leakbench.runner import RUN_DIR_VARIABLE, refuse_another_configuration, run

    config = RunConfig.from_mapping(dict(values), source="sweep job")
    run_path = Path(config.output_dir) / str(config.run_name)
    env = submitit.JobEnvironment()
    if config.processes() > 1 and env.cluster != "slurm":
        _join_ranks(env.job_id, env.local_rank)
    first = env.global_rank == 0
    if not first:  # the folder is the first rank's; the others only add their records
        os.environ[RUN_DIR_VARIABLE] = str(run_path.resolve())
    run_path.mkdir(parents=True, exist_ok=True)
    beat: AbstractContextManager[Any] = Heartbeat(run_path, env.job_id) if first else nullcontext()
    start = time.monotonic()
    try:
        with beat:
            # Every rank checks, not only the first: one that went on would wait for the others.
            refuse_another_configuration(run_path, config, "refused, not merged")
            summary = run(config, progress=False)
    except BaseException as exc:
        signum = received()
        if signum is None:
            record_failure(run_path, f"{type(exc).__name__}: {exc}", env.job_id, env.global_rank)
            raise
        # Interrupted, not failed (also where the signal surfaced first as the closed connection
        # of a rank that was interrupted before this one).
        end_process(_hand_on(signum))
    return {
        "run": config.run_name,
        "trials": sum(cell["trials"] for cell in summary["cells"].values()),
        "seconds": time.monotonic() - start,
    }


def _hand_on(signum: int) -> int:
    """Deliver ``signum`` to the handler the run found (submitit's, in a job): SIGUSR2
    checkpoints and requeues the job and exits; returns the exit status to end with."""
    try:
        signal.raise_signal(signum)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        pass
    return 128 + signum


class RunJob:
    """The submitit job of one run: ``RunJob()(values)`` runs :func:`execute`. On SIGUSR2 (the
    time limit is near, or a preemption announced) submitit calls :meth:`checkpoint` and requeues
    the job, which then continues the run from its records."""

    def __call__(self, values: dict[str, Any]) -> dict[str, Any]:
        return execute(values)

    def checkpoint(self, values: dict[str, Any]) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, values)


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

    executor = submitit.AutoExecutor(
        folder=folder, cluster="local", local_max_num_timeout=MAX_TIME_LIMIT_REQUEUES
    )
    executor.update_parameters(
        name=name,
        timeout_min=resources.time_min,
        tasks_per_node=resources.tasks,
        # The local executor hides the GPUs it was not asked for.
        gpus_per_node=resources.gpus_per_node or torch.cuda.device_count(),
    )
    return executor


def _claim(run: PlannedRun, echo: Callable[[str], None]) -> bool:
    """Whether ``run`` may be submitted now (call under the launch lock); if so, its last
    failure is forgotten, as it is being launched again."""
    (status,) = grid_status([run])
    if status.state not in LAUNCHABLE:
        echo(f"skipped  {run.name}: {status.state} {status.note}".rstrip())
        return False
    clear_failure(run.path)
    return True


def _start_local(
    grid: Grid, run: PlannedRun, options: LaunchOptions, echo: Callable[[str], None]
) -> Any:
    """Start one run as a local job, unless another launch started it meanwhile (None)."""
    with launch_lock(grid.output_dir, echo):
        if not _claim(run, echo):
            return None
        resources = run_resources(run, options.resources)
        executor = local_executor(grid.submitit_folder, resources, f"{grid.name}-{run.name}")
        job = executor.submit(RunJob(), run.config.to_dict())
        # The local job's id is its controller's pid; with its start time it names the process.
        start = process_start(int(job.job_id))
        record_launch(run.path, "local", job.job_id, process_start=start)
    echo(f"started  {run.name} (local job {job.job_id})")
    return job


def _end_local_jobs(jobs: list[Any]) -> None:
    """Cancel local jobs (their controllers stop their tasks: SIGINT, then SIGKILL) and wait."""
    for job in jobs:
        job.cancel(check=False)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while any(not job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)


@launcher("local")
def launch_local(
    grid: Grid, runs: list[PlannedRun], options: LaunchOptions, echo: Callable[[str], None]
) -> int:
    """Run the jobs on this machine through submitit's local executor, ``jobs`` at a time.
    Ctrl-C or SIGTERM cancels the jobs (their trials in flight are dropped) and ends the launch
    with :class:`~leakbench.interruption.RunInterrupted`."""
    from leakbench.interruption import RunInterrupted, interruptible

    pending = list(runs)
    running: dict[Any, PlannedRun] = {}
    failed = 0
    try:
        with interruptible():
            while pending or running:
                while pending and len(running) < max(1, options.jobs):
                    run = pending.pop(0)
                    job = _start_local(grid, run, options, echo)
                    if job is not None:
                        running[job] = run
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
                        log = job.paths.stderr
                        echo(f"failed   {run.name}: {_last_line(str(exc))} (log: {log})")
                    else:
                        seconds = result["seconds"]
                        echo(f"done     {run.name}: {result['trials']} trials, {seconds:.1f} s")
    except RunInterrupted as exc:
        _end_local_jobs(list(running))
        echo(f"{exc}; re-launch the grid to finish what is missing")
        raise  # the command line ends with 128 + the signal's number
    return 1 if failed else 0


def slurm_executor(folder: Path, resources: Resources, name: str, parallelism: int) -> Any:
    """submitit's SLURM executor for one array: every task of it asks for ``resources``."""
    import submitit

    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIME_LIMIT_REQUEUES
    )
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
        slurm_signal_delay_s=resources.warning_s,
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
    """Submit one SLURM job per run: a plain job for a run alone in its resource shape, a job
    array of one task per run otherwise; records each job with its run; returns at once."""
    import submitit

    parallelism = int(options.resources.get("array_parallelism") or 256)
    with launch_lock(grid.output_dir, echo):
        shapes: dict[Resources, list[PlannedRun]] = {}
        for run in runs:
            if _claim(run, echo):
                shapes.setdefault(run_resources(run, options.resources), []).append(run)
        for resources, group in shapes.items():
            executor = slurm_executor(grid.submitit_folder, resources, grid.name, parallelism)
            values = [run.config.to_dict() for run in group]
            names = ", ".join(run.name for run in group)
            try:
                if len(group) == 1:
                    jobs = [executor.submit(RunJob(), values[0])]
                else:
                    jobs = executor.map_array(RunJob(), values)
            except submitit.core.utils.FailedJobError as exc:  # sbatch refused: say why
                raise LauncherUnavailable(f"sbatch failed: {_last_line(str(exc))}") from None
            if len(group) == 1:
                echo(f"submitted job {jobs[0].job_id}: 1 run, {resources.describe()}: {names}")
            else:
                echo(
                    f"submitted array {jobs[0].job_id.split('_')[0]}: {len(group)} runs, each "
                    f"{resources.describe()}: {names}"
                )
            for run, job in zip(group, jobs, strict=True):
                record_launch(run.path, "slurm", job.job_id)
    echo(f"logs: {grid.submitit_folder}; follow with: leakbench sweep status {grid.path}")
    return 0
