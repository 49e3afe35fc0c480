"""How many cores a process of leakbench may use, and how many intra-op threads it takes.

``os.cpu_count()`` counts the machine's cores, not this process's: a SLURM job of 4 CPUs on a
64-core node, or a container limited to 2 CPUs, sees all 64. Threads sized from it
oversubscribe the cores the process has, and PyTorch's OpenMP threads then spin waiting for
each other: on a busy 2-core machine a 2-thread DLG trial took ten times the CPU of a 1-thread
one. This module imports no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a SLURM job's allocation), capped
    by its cgroup's CPU quota (a container's ``--cpus``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity alone
    return max(1, cores)


def default_threads(processes: int = 1) -> int:
    """Intra-op threads for each of ``processes`` processes: ``OMP_NUM_THREADS`` where it is set
    (PyTorch's own convention), else the usable cores divided among the processes; at least 1."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, usable_cores() // max(1, processes))
