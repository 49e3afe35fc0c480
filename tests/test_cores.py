"""The threads a run takes: the cores this process may use (not the machine's), or the user's
``OMP_NUM_THREADS``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leakbench import cores


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A 64-core machine on which this process may run on ``cpus`` cores, under a cgroup
    ``cpu.max`` of ``quota`` (None: no cgroup v2 file)."""

    def make(cpus: int, quota: str | None) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        cpu_max = tmp_path / "cpu.max"
        if quota is not None:
            cpu_max.write_text(quota + "\n")
        monkeypatch.setattr(cores, "CGROUP_CPU_MAX", cpu_max)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    return make


@pytest.mark.parametrize(
    "cpus, quota, expected",
    [
        (4, None, 4),  # a SLURM job of 4 CPUs on a 64-core node: its affinity
        (64, "200000 100000", 2),  # a container of --cpus=2: its quota
        (64, "150000 100000", 1),  # 1.5 CPUs: whole cores only
        (4, "max 100000", 4),  # no quota
        (4, "garbled", 4),
    ],
)
def test_usable_cores_are_the_affinity_capped_by_the_cgroup_quota(machine, cpus, quota, expected):
    machine(cpus, quota)
    assert cores.usable_cores() == expected


def test_default_threads_divide_the_usable_cores_among_the_processes(machine):
    machine(4, None)
    assert [cores.default_threads(p) for p in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


@pytest.mark.parametrize(
    "value, one_process, two_processes",
    [
        ("3", 3, 3),  # the user's count, for each process
        ("1", 1, 1),
        ("0", 4, 2),  # not a positive count: the usable cores, divided
        ("two", 4, 2),
        ("", 4, 2),
    ],
)
def test_default_threads_honour_a_positive_omp_num_threads(
    machine, monkeypatch, value, one_process, two_processes
):
    machine(4, None)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert [cores.default_threads(1), cores.default_threads(2)] == [one_process, two_processes]
