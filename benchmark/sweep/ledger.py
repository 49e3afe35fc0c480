"""What a grid's run folders say about the jobs that ran, run or will run them, next to the run's
own records (``leakbench.results``)::

    <run>/.sweep-launches.jsonl   one line per launch of the run: the launcher, the job's id (a
                                  SLURM job or array task, or the local job's process), host, time
    <run>/.sweep-heartbeat.json   kept fresh by the job's first rank while it runs
    <run>/.sweep-failed.json      the error of the job's first rank to fail: the cause, not the
                                  symptoms the other ranks then see (a closed connection)
    <grid output>/.sweep-launch.lock   held by the launch that decides and submits, so that two
                                  launches of one grid (a cron job and a user) never both submit
                                  a run
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from leakbench.results import atomic_write_text

LAUNCHES_FILE = ".sweep-launches.jsonl"
HEARTBEAT_FILE = ".sweep-heartbeat.json"
FAILED_FILE = ".sweep-failed.json"
LOCK_FILE = ".sweep-launch.lock"
HEARTBEAT_S = float(os.environ.get("LEAKBENCH_SWEEP_HEARTBEAT_S", "30"))


# --------------------------------------------------------------------------- launches


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if there is
    no such process: a pid and its start time name one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def record_launch(run_path: Path, launcher: str, job_id: str, **facts: Any) -> None:
    """Append one launch of the run (flushed and synced, like a trial record)."""
    run_path.mkdir(parents=True, exist_ok=True)
    entry = {
        "launcher": launcher,
        "job_id": str(job_id),
        "host": socket.gethostname(),
        "time": time.time(),
        **facts,
    }
    with open(run_path / LAUNCHES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def last_launch(run_path: Path) -> dict[str, Any] | None:
    """The run's latest launch; a line cut short by a killed launch is passed over."""
    try:
        lines = (run_path / LAUNCHES_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def local_job_alive(launch: dict[str, Any]) -> bool:
    """Whether a local launch's job (its submitit controller process) still runs on this host."""
    if launch.get("launcher") != "local" or launch.get("host") != socket.gethostname():
        return False
    start = process_start(int(launch["job_id"]))
    return start is not None and start == launch.get("process_start")


@contextmanager
def launch_lock(output_dir: Path, echo: Callable[[str], None]) -> Iterator[None]:
    """Hold the grid's launch lock (waiting, and saying so, while another launch holds it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"waiting for another launch of this grid ({output_dir / LOCK_FILE})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- failures


def record_failure(run_path: Path, error: str, job_id: str, rank: int) -> bool:
    """Keep the error of the first rank to fail; returns whether this one was first.

    Written whole under a temporary name, then linked into place: a link fails if the file
    exists, so a later rank never overwrites the first cause with its symptom.
    """
    entry = {"error": error, "job_id": job_id, "rank": rank, "time": time.time()}
    fd, tmp = tempfile.mkstemp(dir=run_path, prefix=f".{FAILED_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(entry) + "\n")
        os.link(tmp, run_path / FAILED_FILE)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def failure(run_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_path / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return None


def clear_failure(run_path: Path) -> None:
    """Forget the run's last failure: it is being launched again."""
    (run_path / FAILED_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------- heartbeat


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
