"""Interruption is not failure (``leakbench.interruption``): Ctrl-C and ``kill`` end a local
``leakbench run`` and every process of it, the trial in flight is dropped rather than recorded as
failed, and the records resume; an interruption that passes through the attack's isolation layer
ends the attack's worker."""

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
from tests.test_sweep import BASE, records

CONFIG = {
    **BASE,
    "attack_options": {"dlg": {"iterations": 300}},
    "trials": 6,
    "isolation": "process",  # the attack in a worker, or a sandbox: either ends with the run
    "privacy_metrics": False,
    "run_name": "run",
}
STOP_BOUND_S = 60  # a hang guard only; the time it takes is printed (the target is 2 s)


def living(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are alive (zombies waiting for a parent are not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def leakbench_run(tmp_path: Path, *argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LEAKBENCH_RUN_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "leakbench.cli", "run", "--no-progress", *argv],
        env=env,
        start_new_session=True,  # its own process group, as a shell's job
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    "signum, target, isolation",
    [
        pytest.param(signal.SIGINT, "group", "sandbox", id="ctrl-c to the job (sandbox)"),
        pytest.param(
            signal.SIGTERM,
            "process",
            "process",
            id="kill -TERM of the run's pid (worker process)",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_signal_ends_the_run_and_its_processes_and_the_records_resume(
    tmp_path, signum, target, isolation
):
    config = tmp_path / "run.yaml"
    values = {**CONFIG, "isolation": isolation, "output_dir": str(tmp_path)}
    config.write_text(yaml.safe_dump(values))
    run_dir = tmp_path / "run"
    process = leakbench_run(tmp_path, "--config", str(config))
    deadline = time.monotonic() + 600
    while not (run_dir.is_dir() and records(run_dir)):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no trial was recorded"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next trial: its attack code is running
    if target == "group":
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    sent = time.monotonic()
    assert process.wait(timeout=STOP_BOUND_S) == 128 + signum
    while living(process.pid) and time.monotonic() - sent < STOP_BOUND_S:
        time.sleep(0.01)
    print(
        f"{signal.Signals(signum).name}: every process ended {time.monotonic() - sent:.2f} s after"
    )
    assert not living(process.pid)
    output = process.stdout.read()
    assert (
        f"interrupted by {signal.Signals(signum).name}: the trial in flight was dropped" in output
    )
    assert "Traceback" not in output.split("interrupted by")[1]
    kept = records(run_dir)
    assert {r["status"] for r in kept} == {"ok"}, [r.get("error") for r in kept]
    assert len(kept) < 6

    resumed = leakbench_run(tmp_path, "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    counts = Counter((r["cell"], r["trial"]) for r in records(run_dir))
    assert sorted(counts) == [("dlg__none__b1", t) for t in range(6)]
    assert set(counts.values()) == {1}
    assert (run_dir / "summary.json").is_file()


def test_only_the_first_signal_raises_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
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
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as ``cmd &`` in a script starts it
    try:
        with interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            interruption.take_signals()  # also when a test starts (leakbench.evaluator)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert interruption.received() is None
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def descendants() -> set[int]:
    return set(interruption._descendants(os.getpid()))


@pytest.mark.parametrize("isolation", ["process", "sandbox"])
def test_an_interruption_passing_through_the_isolation_layer_ends_the_attack_code(
    tmp_path, isolation
):
    """The isolation layer's duty: whatever exception passes through its wait (here the
    interruption), the attack's worker or sandbox ends with it."""
    from leakbench.config import RunConfig
    from leakbench.protocol.sandbox import sandbox_unavailable
    from leakbench.runner import run

    if isolation == "sandbox" and sandbox_unavailable() is not None:
        pytest.skip(f"no attack sandbox on this machine: {sandbox_unavailable()}")
    values = {**CONFIG, "isolation": isolation, "trials": 1, "output_dir": str(tmp_path)}
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    before = descendants()  # the fork server or the warm sandbox stays for the next run

    def interrupt_once_the_attack_runs() -> None:
        deadline = time.monotonic() + 120
        while not descendants() - before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    endless = {"dlg": {"iterations": 10**7}}
    values.update(run_name="interrupted", attack_options=endless)
    threading.Thread(target=interrupt_once_the_attack_runs, daemon=True).start()
    with pytest.raises(RunInterrupted):
        run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    deadline = time.monotonic() + 2.0
    while descendants() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    left = descendants() - before
    for pid in left:  # the test leaves nothing behind either way
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the attack's code outlived the interruption by 2 s: {sorted(left)}"
    assert not records(tmp_path / "interrupted")
