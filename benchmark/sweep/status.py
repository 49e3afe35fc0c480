"""The state of each run of a grid (``leakbench sweep status``), read from its run folder alone:
done, running, failed or missing, as the package's overview (``leakbench.sweep``) defines them."""

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
from leakbench.sweep.launch import FAILED_FILE, HEARTBEAT_FILE, HEARTBEAT_S

STALE_AFTER_HEARTBEATS = 4
STATES = ("done", "running", "failed", "missing")


@dataclass(frozen=True)
class RunStatus:
    name: str
    state: str  # one of STATES
    recorded: int
    expected: int
    note: str = ""


def _heartbeat_note(run_path: Path) -> str | None:
    """A note on the job keeping the run's heartbeat fresh; None when no job is alive."""
    path = run_path / HEARTBEAT_FILE
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if age > STALE_AFTER_HEARTBEATS * HEARTBEAT_S:
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return None  # killed: its heartbeat file outlived it
        except PermissionError:
            pass  # alive, another user's
    return f"job {info.get('job_id')} on {info.get('host')}, heartbeat {age:.0f} s ago"


def run_status(run: PlannedRun) -> RunStatus:
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
    alive = _heartbeat_note(path)
    if alive is not None:
        return RunStatus(run.name, "running", recorded, expected, alive)
    failed = path / FAILED_FILE
    if (path / "config.yaml").is_file():
        differing = protocol_differences(saved_config(path), run.config)
        if differing:
            note = f"holds another configuration (differs in: {', '.join(differing)})"
            return RunStatus(run.name, "failed", recorded, expected, note)
        if (path / "summary.json").is_file():
            return RunStatus(run.name, "done", recorded, expected)
    if failed.is_file():
        error = json.loads(failed.read_text()).get("error", "")
        return RunStatus(run.name, "failed", recorded, expected, error.splitlines()[0][:200])
    if (path / "config.yaml").is_file():
        note = (
            f"stopped after {recorded} of {expected} trials (killed, preempted or out of "
            "time); a re-launch finishes it"
        )
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
