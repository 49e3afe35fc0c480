"""The processes of a run, found in /proc by parent pid (in any session, process group or PID
namespace: a sandbox is all three), with their start times, so that a pid the kernel reused is
never taken for one of them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def process_table() -> dict[int, tuple[int, str, str]]:
    """Every process of this machine: pid -> (parent pid, start time, state), from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        table[int(stat.parent.name)] = (int(fields[1]), fields[19], fields[0])
    return table


def process_tree(root: int) -> dict[int, str]:
    """The processes below ``root`` with their start times, found by parent pid: in any
    session, process group or PID namespace (a sandbox is all three)."""
    table = process_table()
    below, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started, _) in table.items():
            if ppid == parent and pid not in below:
                below[pid] = started
                frontier.append(pid)
    return below


def still_there(processes: dict[int, str]) -> list[int]:
    """Those of ``processes`` still alive: the same pid with the same start time, no zombie."""
    table = process_table()
    return sorted(
        pid
        for pid, started in processes.items()
        if pid in table and table[pid][1] == started and table[pid][2] != "Z"
    )


def command_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None  # it ended meanwhile


def freeze_the_attack_in_flight(harness: int) -> dict[int, str]:
    """Wait for an attack job in the harness's sandbox (a child of its zygote, the child of
    bubblewrap), stop it with SIGSTOP, so that it cannot end by itself, and return every
    process of the run then (the harness's descendants)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        table = process_table()
        below = process_tree(harness)
        sandboxes = [pid for pid in below if command_name(pid) == "bwrap"]
        zygotes = [pid for pid in below if table.get(pid, (0,))[0] in sandboxes]
        jobs = [pid for pid in below if table.get(pid, (0,))[0] in zygotes]
        for job in jobs:
            try:
                os.kill(job, signal.SIGSTOP)
            except ProcessLookupError:
                continue  # it had just answered
            return process_tree(harness)
        time.sleep(0.01)
    raise AssertionError("no attack job ran in the run's sandbox")
