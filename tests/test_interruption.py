"""Interruption is not failure (``leakbench.interruption``): Ctrl-C and ``kill`` end a local
``leakbench run`` and every process of it (worker, bubblewrap, the sandbox's zygote and its
jobs), the trial in flight is dropped rather than recorded as failed, and the records resume; an
interruption that passes through the attack's isolation layer ends the attack's worker. A
harness killed outright (SIGKILL) leaves no process behind either: each one dies with its
parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from leakbench import interruption
from leakbench.interruption import RunInterrupted, interruptible
from tests.processes import freeze_the_attack_in_flight, process_table, process_tree, still_there
from tests.test_sweep import BASE, records

CONFIG = {
    **BASE,
    "attack_options": {"dlg": {"iterations": 300}},  # long enough to be caught mid-trial
    "trials": 4,
    "isolation": "sandbox",
    "privacy_metrics": False,
    "run_name": "run",
}
STOP_BOUND_S = 60  # a hang guard only; the time it takes is printed (the target is 2 s)
LEFT_BOUND_S = 2.0  # how long a process of the run may outlive its harness


def leakbench_run(*argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LEAKBENCH_RUN_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "leakbench.cli", "run", "--no-progress", *argv],
        env=env,
        start_new_session=True,  # its own process group, as a shell's job
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_records(process: subprocess.Popen, run_dir: Path, more_than: int) -> None:
    deadline = time.monotonic() + 600
    while len(records(run_dir)) <= more_than:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no trial was recorded"
        time.sleep(0.05)


def stop_run(process: subprocess.Popen, run: dict[int, str], signum: int, group: bool) -> int:
    """Send ``signum`` to the harness's pid (or its process group); assert that none of the
    ``run``'s processes is left 2 s after the harness ended; the harness's exit status."""
    sent = time.monotonic()
    (os.killpg if group else os.kill)(process.pid, signum)
    code = process.wait(timeout=STOP_BOUND_S)
    ended = time.monotonic()
    while still_there(run) and time.monotonic() - ended < LEFT_BOUND_S:
        time.sleep(0.01)
    left = still_there(run)
    for pid in left:  # nothing of the test outlives it either way
        os.kill(pid, signal.SIGKILL)
    print(
        f"{signal.Signals(signum).name}: the harness ended {ended - sent:.2f} s after, every "
        f"process of the run {time.monotonic() - sent:.2f} s after"
    )
    assert not left, f"{len(left)} of the run's {len(run)} processes outlived its harness by 2 s"
    return code


def assert_interrupted(process: subprocess.Popen, run_dir: Path, signum: int) -> None:
    """The run said what it kept, without a traceback; what it kept is whole."""
    output = process.stdout.read()
    name = signal.Signals(signum).name
    assert f"interrupted by {name}: the trial in flight was dropped" in output, output
    assert "Traceback" not in output.split("interrupted by")[1]
    kept = records(run_dir)
    assert {r["status"] for r in kept} == {"ok"}, [r.get("error") for r in kept]
    assert len(kept) < CONFIG["trials"]


def assert_resumes_every_trial_once(run_dir: Path) -> None:
    resumed = leakbench_run("--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    counts = Counter((r["cell"], r["trial"]) for r in records(run_dir))
    assert sorted(counts) == [("dlg__none__b1", t) for t in range(CONFIG["trials"])]
    assert set(counts.values()) == {1}
    assert (run_dir / "summary.json").is_file()


def sandbox_needed() -> None:
    from leakbench.protocol.sandbox import sandbox_unavailable

    if sandbox_unavailable() is not None:
        pytest.skip(f"no attack sandbox on this machine: {sandbox_unavailable()}")


def test_terminated_mid_trial_a_run_leaves_no_process_and_resumes(tmp_path):
    """SIGTERM to the pid of ``leakbench run`` (not its group: a sandbox has a session of its
    own) while its attack runs in the sandbox, frozen so that it cannot end by itself: nothing
    of the run (bubblewrap, the zygote, the attack's process) is left 2 s after the harness
    ended; the records resume, every trial exactly once."""
    sandbox_needed()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path)}))
    run_dir = tmp_path / "run"
    process = leakbench_run("--config", str(config))
    wait_for_records(process, run_dir, more_than=0)
    run = freeze_the_attack_in_flight(process.pid)
    assert stop_run(process, run, signal.SIGTERM, group=False) == 128 + signal.SIGTERM
    assert_interrupted(process, run_dir, signal.SIGTERM)
    assert_resumes_every_trial_once(run_dir)


# A harness with a warm sandbox, and nothing else (no torch: the sandbox imports its own).
SANDBOX_HARNESS = """
import time
from leakbench.protocol.sandbox import SandboxView, warm_sandbox
warm_sandbox(SandboxView.build(forbidden=[]))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_harness_killed_outright_leaves_no_sandbox_behind():
    """SIGKILL to a harness, which can clean up nothing: its bubblewrap dies with it (parent
    death signal), and the sandbox's zygote with bubblewrap, also when it cannot end by itself
    (stopped here: it would otherwise end when it reads the end of its job channel)."""
    sandbox_needed()
    harness = subprocess.Popen(
        [sys.executable, "-c", SANDBOX_HARNESS], stdout=subprocess.PIPE, text=True
    )
    assert harness.stdout.readline() == "ready\n"
    run = process_tree(harness.pid)
    table = process_table()
    (zygote,) = [pid for pid in run if table[pid][0] != harness.pid]  # bubblewrap's child
    os.kill(zygote, signal.SIGSTOP)
    assert stop_run(harness, run, signal.SIGKILL, group=False) == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, group, isolation",
    [
        pytest.param(signal.SIGINT, True, "sandbox", id="ctrl-c to the job (sandbox)"),
        pytest.param(signal.SIGKILL, False, "sandbox", id="kill -KILL of the pid (sandbox)"),
        pytest.param(signal.SIGTERM, False, "process", id="kill -TERM of the pid (worker)"),
    ],
)
def test_a_signal_ends_the_run_and_its_processes_and_the_records_resume(
    tmp_path, signum, group, isolation
):
    """Ctrl-C to a shell's job, ``kill -KILL`` of a run, or ``kill -TERM`` of a run whose attacks
    run in worker processes, with the attack running as it does (not frozen). Fast siblings:
    ``test_terminated_mid_trial_a_run_leaves_no_process_and_resumes`` (SIGTERM to the harness,
    sandbox, resumed), ``test_a_harness_killed_outright_leaves_no_sandbox_behind`` (SIGKILL),
    ``test_a_worker_ends_with_its_fork_server`` and, in the harness's process,
    ``test_an_interruption_passing_through_the_isolation_layer_ends_the_attack_code``."""
    if isolation == "sandbox":
        sandbox_needed()
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({**CONFIG, "isolation": isolation, "output_dir": str(tmp_path)})
    )
    run_dir = tmp_path / "run"
    process = leakbench_run("--config", str(config))
    wait_for_records(process, run_dir, more_than=0)
    time.sleep(0.1)  # into the next trial: its attack code is running
    run = process_tree(process.pid)
    code = stop_run(process, run, signum, group)
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        kept = records(run_dir)
        assert {r["status"] for r in kept} == {"ok"} and len(kept) < CONFIG["trials"]
    else:
        assert code == 128 + signum
        assert_interrupted(process, run_dir, signum)
    assert_resumes_every_trial_once(run_dir)


def test_only_the_first_signal_raises_and_the_handlers_are_restored():
    # SIGINT's handler is Python's default one, or SIG_IGN under a shell's background job.
    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as caught, interruptible():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: the signal raises at once
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # a second signal while unwinding: ignored
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
    assert str(caught.value) == "interrupted by SIGTERM"
    assert interruption.received() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is before_int


def test_an_ignored_signal_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as ``cmd &`` in a script starts it
    try:
        with interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            interruption.take_signals()  # also when a test starts (leakbench.evaluator)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert interruption.received() is None
    finally:
        signal.signal(signal.SIGINT, before)


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used (0 once it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def new_processes(before: dict[int, str]) -> dict[int, str]:
    """The processes below this one that ``before`` does not hold."""
    return {p: t for p, t in process_tree(os.getpid()).items() if before.get(p) != t}


@pytest.mark.parametrize("isolation", ["process", "sandbox"])
def test_an_interruption_passing_through_the_isolation_layer_ends_the_attack_code(
    tmp_path, isolation
):
    """The isolation layer's duty: whatever exception passes through its wait (here the
    interruption), the attack's worker or sandbox ends with it, and every process it started
    (found by parent pid: a sandbox is a session and a PID namespace of its own)."""
    from leakbench.config import RunConfig
    from leakbench.runner import run

    if isolation == "sandbox":
        sandbox_needed()
    values = {**CONFIG, "isolation": isolation, "trials": 1, "output_dir": str(tmp_path)}
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    before = process_tree(os.getpid())  # the fork server or the warm sandbox stays for the next run
    attack: dict[int, str] = {}

    def interrupt_once_the_attack_runs() -> None:
        deadline = time.monotonic() + 120
        while not new_processes(before) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        attack.update(new_processes(before))
        os.kill(os.getpid(), signal.SIGTERM)

    endless = {"dlg": {"iterations": 10**7}}
    values.update(run_name="interrupted", attack_options=endless)
    threading.Thread(target=interrupt_once_the_attack_runs, daemon=True).start()
    with pytest.raises(RunInterrupted):
        run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    deadline = time.monotonic() + 2.0
    while still_there(attack) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = still_there(attack)
    for pid in left:  # the test leaves nothing behind either way
        os.kill(pid, signal.SIGKILL)
    assert attack, "no process ran the attack"
    assert not left, f"the attack's code outlived the interruption by 2 s: {left}"
    assert not records(tmp_path / "interrupted")


def test_a_worker_ends_with_its_fork_server(tmp_path):
    """``isolation: process``: a worker is a child of the fork server, which multiprocessing ends
    when the harness ends, however it ends; the worker ends with the fork server (SIGKILL, as
    its parent-death signal), also in the middle of its attack: a harness killed outright leaves
    no worker running. The trial whose worker died is recorded as failed, with how."""
    from leakbench.config import RunConfig
    from leakbench.runner import run

    before = process_tree(os.getpid())
    worker: dict[int, str] = {}

    def kill_the_fork_server_once_the_attack_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            started = new_processes(before)
            table = process_table()  # read after the tree: it holds every pid found there
            # A worker past its start-up (its parent-death signal is set first thing): the
            # property is about a worker killed mid-attack.
            workers = [
                p
                for p in started
                if p in table and table[p][0] != os.getpid() and cpu_seconds(p) > 0.5
            ]
            if workers:
                worker.update({p: t for p, t in process_tree(os.getpid()).items() if p in workers})
                os.kill(table[workers[0]][0], signal.SIGKILL)
                return
            time.sleep(0.02)

    values = {
        **CONFIG,
        "isolation": "process",
        "trials": 1,
        "output_dir": str(tmp_path),
        "attack_options": {"dlg": {"iterations": 10**7}},
    }
    threading.Thread(target=kill_the_fork_server_once_the_attack_runs, daemon=True).start()
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    deadline = time.monotonic() + 2.0
    while still_there(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = still_there(worker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert worker, "no worker ran the attack"
    assert not left, f"the worker outlived its fork server by 2 s: {left}"
    (record,) = records(tmp_path / "run")
    assert record["status"] != "ok"
    assert "worker process died without answering" in record["error"]
