"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd of Debian's packages
(``slurmctld slurmd slurm-client munge``), started from a folder of their own with a generated
``slurm.conf`` (one node, sized by ``slurmd -C`` from this machine) and stopped afterwards.

Nothing outside the folder is touched: munge listens on its own socket (``AuthInfo``), the daemons
on free ports, and the client commands find the cluster through ``SLURM_CONF`` in :attr:`env`.
Run ``python tests/slurm/cluster.py`` to start one by hand (Ctrl-C stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge"
COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
PARTITION = "debug"


def missing_commands() -> list[str]:
    return [name for name in COMMANDS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """This machine as a SLURM node (``slurmd -C``: CPUs, sockets, cores, memory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


class SlurmUnavailable(RuntimeError):
    """The cluster could not be started here (the message says why)."""


class SingleNodeSlurm:
    """munged + slurmctld + slurmd in ``folder``; :attr:`env` points SLURM's commands at it."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="leakbench-slurm-"))
        self.processes: list[subprocess.Popen] = []
        self.node = socket.gethostname()
        self.conf = self.folder / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.hardware = node_line()
        self.cpus = int(self.hardware.split("CPUs=")[1].split()[0])

    # ------------------------------------------------------------------ configuration

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("etc", "munge", "run", "state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        # munged: a private key, and a socket in a folder everyone may traverse.
        (f / "munge").chmod(0o700)
        for path in (f, f / "etc", f / "run", f / "log"):
            path.chmod(0o755)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        hardware = " ".join(self.hardware.split()[1:])  # all but "NodeName=..."
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=leakbench-test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # A requeued job waits cred_expire seconds (120 by default) before it starts.
                    f"AuthInfo=socket={f / 'run' / 'munge.sock'},cred_expire=10",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={f / 'state'}",
                    f"SlurmdSpoolDir={f / 'spool'}",
                    f"SlurmctldPidFile={f / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={f / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
                    # Containers have no usable cgroups: track processes by parentage.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=1024",  # a job that names no memory does not take the node
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=1,bf_interval=1",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "KillWait=5",  # a cancelled job gets SIGKILL 5 s after SIGTERM
                    "MinJobAge=3600",  # finished jobs stay visible to squeue (no accounting)
                    "MessageTimeout=30",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "InactiveLimit=0",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
                    f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        # slurmd 22.05 reads cgroup.conf even when no cgroup plugin is used.
        (f / "etc" / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n"
        )

    # ------------------------------------------------------------------ daemons

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "w")  # noqa: SIM115 (kept open)
        self.processes.append(
            subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C of the tests does not reach the daemons
            )
        )

    def start(self, timeout: float = 60.0) -> SingleNodeSlurm:
        self._write_config()
        f = self.folder
        self._start(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={f / 'run' / 'munge.sock'}",
                f"--key-file={f / 'munge' / 'munge.key'}",
                f"--log-file={f / 'log' / 'munged.log'}",
                f"--pid-file={f / 'run' / 'munged.pid'}",
                f"--seed-file={f / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(lambda: (f / "run" / "munge.sock").exists(), timeout, "munged")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld")
        self._start("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self.idle, timeout, "slurmd")
        return self

    def _ok(self, command: list[str], expect: str) -> bool:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env)
        return result.returncode == 0 and expect in result.stdout

    def idle(self) -> bool:
        """Whether the node is up and runs nothing."""
        return self._ok(["sinfo", "-h", "-N", "-o", "%T"], "idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise SlurmUnavailable(f"{what} did not start: {self.logs()[-3000:]}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted((self.folder / "log").glob("*"))
        )

    def squeue(self) -> list[str]:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True, env=self.env
        )
        return out.stdout.split("\n")[:-1]

    def stop(self) -> None:
        """Cancel every job, let the daemons clean up after them, stop the daemons, and kill
        whatever of the cluster's is left (every process that carries its SLURM_CONF)."""
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        deadline = time.monotonic() + 30
        while self.processes and self.squeue() and time.monotonic() < deadline:
            time.sleep(0.5)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []
        for pid in self._left_behind():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _left_behind(self) -> list[int]:
        """Processes of this cluster still alive: its step daemons and the jobs' processes."""
        mark = f"SLURM_CONF={self.conf}".encode()
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
            except OSError:
                continue
        return [pid for pid in found if pid != os.getpid()]


if __name__ == "__main__":
    cluster = SingleNodeSlurm().start()
    print(f"export SLURM_CONF={cluster.conf}")
    try:
        signal.pause()
    finally:
        cluster.stop()
