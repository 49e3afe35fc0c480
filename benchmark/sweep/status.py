"""The state of each run of a grid (``leakbench sweep status``): its run folder, and what the
scheduler says about the job its last launch submitted, as the package's overview
(``leakbench.sweep``) defines them: done, running, queued, failed or missing."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leakbench.results import RunDirectory
from leakbench.sweep.grid import Grid, PlannedRun, expected_trials
from leakbench.sweep.ledger import (
    HEARTBEAT_FILE,
    HEARTBEAT_S,
    failure,
    last_launch,
    local_job_alive,
)
from leakbench.sweep.scheduler import JobState, SchedulerUnavailable, job_states

STALE_AFTER_HEARTBEATS = 4
STATES = ("done", "running", "queued", "failed", "missing")
LAUNCHABLE = ("failed", "missing")  # a launch submits these, and nothing else


@dataclass(frozen=True)
class RunStatus:
    name: str
    state: str  # one of STATES
    recorded: int
    expected: int
    note: str = ""


def _heartbeat_note(run_path: Path, ended_job: str | None = None) -> str | None:
    """A note on the job keeping the run's heartbeat fresh; None when no job is alive (also
    when the heartbeat is of ``ended_job``, a job SLURM says has ended: a killed job's file
    outlives it)."""
    path = run_path / HEARTBEAT_FILE
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if age > STALE_AFTER_HEARTBEATS * HEARTBEAT_S or info.get("job_id") == ended_job:
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return None  # killed: its heartbeat file outlived it
        except PermissionError:
            pass  # alive, another user's
    return f"job {info.get('job_id')} on {info.get('host')}, heartbeat {age:.0f} s ago"


def slurm_job(run: PlannedRun) -> str | None:
    """The SLURM job (or array task) the run's last launch submitted, if it went to SLURM."""
    launch = last_launch(run.path)
    return launch["job_id"] if launch and launch.get("launcher") == "slurm" else None


def grid_status(runs: Sequence[PlannedRun], strict: bool = True) -> list[RunStatus]:
    """Every run's state, asking SLURM once about the jobs the runs' last launches submitted.

    Where SLURM cannot be asked, ``strict`` refuses (a launch must not guess whether a job is
    still queued); otherwise the states come from the run folders alone, with a note saying so.
    """
    jobs = {run.name: slurm_job(run) for run in runs}
    asked = [job for job in jobs.values() if job]
    unanswered = ""
    try:
        states = job_states(asked)
    except SchedulerUnavailable as exc:
        if strict:
            raise SchedulerUnavailable(
                f"cannot tell which runs are still queued or running: {exc}; nothing launched, "
                "so that no run is submitted twice"
            ) from None
        states, unanswered = {}, f"SLURM not asked: {exc}"
    statuses = []
    for run in runs:
        job = jobs[run.name]
        status = _run_status(run, states.get(job) if job else None)
        if job and unanswered and status.state != "done":
            status = RunStatus(**{**status.__dict__, "note": f"{status.note} ({unanswered})"})
        statuses.append(status)
    return statuses


def run_status(run: PlannedRun) -> RunStatus:
    """One run's state (:func:`grid_status` asks about every run of a grid at once)."""
    return grid_status([run], strict=False)[0]


def _run_status(run: PlannedRun, job: JobState | None) -> RunStatus:
    """The run's state from its folder and ``job``, SLURM's word on its last launch's job."""
    from leakbench.config import protocol_differences, saved_config
    from leakbench.results import DamagedRecordsError

    expected = expected_trials(run.config)
    path = run.path
    if not path.is_dir():
        return RunStatus(run.name, "missing", 0, expected)
    try:
        recorded = len(RunDirectory(path).completed())
    except DamagedRecordsError as exc:
        return RunStatus(run.name, "failed", 0, expected, str(exc))
    started = (path / "config.yaml").is_file()
    if started:
        differing = protocol_differences(saved_config(path), run.config)
        if differing:
            note = f"holds another configuration (differs in: {', '.join(differing)})"
            return RunStatus(run.name, "failed", recorded, expected, note)
        if (path / "summary.json").is_file():
            return RunStatus(run.name, "done", recorded, expected)
    if job is not None and job.kind in ("queued", "running"):
        return RunStatus(run.name, job.kind, recorded, expected, job.describe())
    alive = _heartbeat_note(path, ended_job=job.job_id if job is not None else None)
    if alive is not None:
        return RunStatus(run.name, "running", recorded, expected, alive)
    launch = last_launch(path)
    if launch is not None and local_job_alive(launch):
        note = f"local job {launch['job_id']} on {launch['host']}, starting"
        return RunStatus(run.name, "running", recorded, expected, note)
    ended = f"; {job.describe()}" if job is not None and job.state != "COMPLETED" else ""
    failed = failure(path)
    if failed is not None:
        error = str(failed.get("error", "")).splitlines()[0][:200] if failed.get("error") else ""
        rank = f"rank {failed['rank']}: " if failed.get("rank") else ""
        return RunStatus(run.name, "failed", recorded, expected, f"{rank}{error}{ended}")
    if started or job is not None:
        why = ended or " (killed, preempted or out of time)"
        note = f"stopped after {recorded} of {expected} trials{why}; a re-launch finishes it"
        return RunStatus(run.name, "failed", recorded, expected, note)
    return RunStatus(run.name, "missing", recorded, expected)


def format_status(grid: Grid, statuses: Sequence[RunStatus]) -> str:
    width = max([len("run")] + [len(s.name) for s in statuses]) + 2
    lines = [
        f"grid {grid.name}: {len(statuses)} runs in {grid.output_dir}",
        f"{'run':<{width}}{'state':<9}{'trials':>9}  note",
    ]
    for s in statuses:
        trials = f"{s.recorded}/{s.expected}"
        lines.append(f"{s.name:<{width}}{s.state:<9}{trials:>9}  {s.note}".rstrip())
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
