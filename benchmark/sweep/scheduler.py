"""What SLURM says about the jobs a grid's launches submitted: ``squeue`` for the jobs it still
holds (pending, running, and finished ones for ``MinJobAge`` seconds), then ``sacct`` for the
others where the cluster keeps accounting. One call of each per grid, never one per run.

The states SLURM reports are sorted into what a launch must know (:func:`classify`): a job that
is ``queued`` or ``running`` must not be submitted again; an ``ended`` job is done with, and its
state (CANCELLED, TIMEOUT, PREEMPTED, OUT_OF_MEMORY, NODE_FAIL, ...) is the reason shown when
its run is unfinished.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from leakbench.config import ConfigError

# SLURM's job states (squeue --states, sacct --state), by what they mean for a launch.
QUEUED = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
)
RUNNING = frozenset(
    {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
)
QUERY_TIMEOUT_S = 60


class SchedulerUnavailable(ConfigError):
    """SLURM could not be asked about a grid's jobs; nothing may be launched on a guess."""


@dataclass(frozen=True)
class JobState:
    job_id: str  # as submitted: "1234" or, for an array task, "1234_5"
    state: str  # SLURM's word: PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    reason: str = ""  # SLURM's reason for a pending job (Resources, Priority, JobHeldUser, ...)

    @property
    def kind(self) -> str:
        return classify(self.state)

    def describe(self) -> str:
        """e.g. "SLURM job 12_3 PENDING (Resources)"; the reason only while the job waits."""
        waiting = self.kind == "queued" and self.reason not in ("", "None")
        return f"SLURM job {self.job_id} {self.state}" + (f" ({self.reason})" if waiting else "")


def classify(state: str) -> str:
    """``queued``, ``running`` or ``ended`` (every other state: the job will not run again)."""
    if state in QUEUED:
        return "queued"
    if state in RUNNING:
        return "running"
    return "ended"


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except FileNotFoundError:
        raise SchedulerUnavailable(f"{command[0]} not found: SLURM is not reachable here") from None
    except subprocess.TimeoutExpired:
        raise SchedulerUnavailable(
            f"{command[0]} gave no answer in {QUERY_TIMEOUT_S} s (is slurmctld up?)"
        ) from None


def _squeue(job_ids: list[str]) -> dict[str, JobState]:
    result = _run(
        ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r"]
        + [f"--jobs={','.join(job_ids)}"]
    )
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:  # every id asked about is forgotten
            return {}
        raise SchedulerUnavailable(f"squeue failed: {result.stderr.strip()[:300]}")
    states = {}
    for line in result.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id.strip()] = JobState(job_id.strip(), state.strip(), reason.strip())
    return states


def _sacct(job_ids: list[str]) -> dict[str, JobState]:
    """The last state accounting holds of each job; none where the cluster keeps no accounting."""
    try:
        result = _run(
            ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State"]
            + [f"--jobs={','.join(job_ids)}"]
        )
    except SchedulerUnavailable:
        return {}
    if result.returncode != 0:  # "Slurm accounting storage is disabled", and the like
        return {}
    states = {}
    for line in result.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in job_ids:
            # "CANCELLED by 0": the first word is the state
            states[job_id] = JobState(job_id, (state.split() or ["UNKNOWN"])[0])
    return states


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """SLURM's state of each job it still knows of; a job it has forgotten is left out."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return {}
    states = _squeue(wanted)
    forgotten = [job_id for job_id in wanted if job_id not in states]
    if forgotten:
        states.update(_sacct(forgotten))
    return states
