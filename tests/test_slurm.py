"""Grids on a real SLURM (munged, slurmctld and slurmd of Debian's packages, one node sized from
this machine; ``tests/slurm/cluster.py``): launched and collected; re-launched while queued behind
a job that holds the node, submitting nothing twice; cancelled mid-run with ``scancel`` and
re-launched; requeued by SLURM's warning signal (SIGUSR2) mid-run, sent by hand, and (nightly,
``slow``) by its own time limit; sharded over more ranks than it has trials. Each asserts every
(cell, trial) recorded exactly once across every rank file, and no trial failed by the scheduler.

Mid-run means mid-trial: the attack of the trial in flight is stopped (SIGSTOP) in the job's
sandbox before the signal, so that the job cannot end first however fast the node runs, and the
work of each run can be tiny."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from leakbench import cli, sweep
from tests.processes import command_name, freeze_the_attack_in_flight
from tests.slurm.cluster import PACKAGES, SingleNodeSlurm, missing_commands
from tests.test_sweep import BASE as SWEEP_BASE
from tests.test_sweep import records

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("slurm")

if missing_commands():
    pytest.skip(
        f"no SLURM here: install Debian's {PACKAGES} (missing: {', '.join(missing_commands())})",
        allow_module_level=True,
    )
if os.geteuid() != 0:
    pytest.skip("the SLURM test cluster needs root (slurmd starts jobs)", allow_module_level=True)

WAIT_S = 900  # a generous bound on any one wait
SETTINGS = {  # tiny runs (tests.test_sweep's), without the privacy references' training
    **SWEEP_BASE,
    "attack_options": {"dlg": {"iterations": 50}},
    "trials": 2,
    "privacy_metrics": False,
}
# A run to stop mid-trial: its attacks run in the sandbox (the default), which SLURM signals
# along with the harness, and where the test freezes the attack of the trial in flight (long
# enough, about 0.5 s, to be caught).
STOPPED = {"trials": 3, "isolation": "sandbox", "attack_options": {"dlg": {"iterations": 300}}}
CELL = "dlg__none__b1"


@pytest.fixture(scope="module")
def slurm():
    cluster = SingleNodeSlurm().start()
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(cluster.conf))  # sbatch and squeue, here and in the jobs
    yield cluster
    patch.undo()
    cluster.stop()


def write_grid(folder: Path, name: str, settings: dict, resources: dict, seeds=(0,)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    grid = {
        "name": name,
        "set": {**SETTINGS, **settings},
        "axes": {"seeds": list(seeds)},
        "output_dir": str(folder / "out"),
        "resources": {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10, **resources},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def leakbench(capsys, *argv) -> str:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out


def launches(run_dir: Path) -> list[dict]:
    path = run_dir / sweep.LAUNCHES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def states(job_ids) -> dict[str, str]:
    return {job: state.state for job, state in sweep.job_states(job_ids).items()}


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.5)


def wait_for_end(job_ids) -> dict[str, str]:
    job_ids = list(job_ids)
    wait_until(
        lambda: (
            all(sweep.JobState(j, s).kind == "ended" for j, s in states(job_ids).items())
            and len(states(job_ids)) == len(job_ids)
        ),
        f"jobs {job_ids} end",
    )
    return states(job_ids)


def assert_exactly_once(run_dir: Path, trials: int) -> None:
    """Every trial of the cell once, across every rank's file, and none failed by the scheduler."""
    found = records(run_dir)
    counts = Counter((r["cell"], r["trial"]) for r in found)
    assert sorted(counts) == [(CELL, t) for t in range(trials)], sorted(counts)
    assert set(counts.values()) == {1}, counts
    assert_failures_are_the_attacks_own(run_dir, found)
    assert (run_dir / "summary.json").is_file()
    assert not (run_dir / sweep.FAILED_FILE).exists()


def assert_failures_are_the_attacks_own(run_dir: Path, found: list[dict]) -> None:
    """A failed trial (DLG's loss can turn NaN) fails again, alike, when it runs alone here,
    undisturbed: same seed, same result. Rerun by resuming a copy that lacks just those trials."""
    from leakbench.runner import run, saved_config

    failed = {r["trial"]: (r["status"], r["error"]) for r in found if r["status"] != "ok"}
    if not failed:
        return
    copy = run_dir.parent / f"{run_dir.name}-undisturbed"
    copy.mkdir()
    shutil.copy(run_dir / "config.yaml", copy)
    kept = [r for r in found if r["trial"] not in failed]
    (copy / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run(saved_config(copy), resume=copy, progress=False, echo=lambda _: None)
    again = {r["trial"]: (r["status"], r["error"]) for r in records(copy) if r["trial"] in failed}
    assert again == failed


def job_harness(job: str) -> int:
    """The pid of the Python process that runs the job's task (submitit's, under srun)."""
    mark = f"SLURM_JOB_ID={job}".encode()
    found: list[int] = []

    def running() -> bool:
        for environ in Path("/proc").glob("[0-9]*/environ"):
            pid = int(environ.parent.name)
            try:
                if mark in environ.read_bytes().split(b"\0") and "submitit.core._submit" in (
                    Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                ):
                    found.append(pid)
            except OSError:
                continue  # it ended meanwhile
        found[:] = [pid for pid in found if (command_name(pid) or "").startswith("python")]
        return bool(found)

    wait_until(running, f"job {job} runs its task")
    return found[0]


def freeze_mid_trial(job: str, run_dir: Path, recorded: int) -> None:
    """Once the job recorded more than ``recorded`` trials, stop the attack of the next one."""
    wait_until(lambda: len(records(run_dir)) > recorded, f"job {job} records a trial")
    freeze_the_attack_in_flight(job_harness(job))


def status_lines(text: str) -> list[str]:
    """The lines of ``leakbench sweep status`` that show a run."""
    return [line for line in text.splitlines() if line.startswith("seed")]


def submitit_log(grid_path: Path, job_id: str, rank: int = 0) -> str:
    folder = grid_path.parent / "out" / ".submitit"
    return "\n".join(
        path.read_text(errors="replace") for path in sorted(folder.glob(f"{job_id}_{rank}_log.*"))
    )


# --------------------------------------------------------------------------- the time limit

# The time-limited run's trials, in seconds of this machine: more than its 2-minute limit, so
# that it cannot finish before SLURM's warning however fast the node runs them.
LIMIT_WORK_S = 150


def seconds_per_trial(settings: dict, folder: Path) -> float:
    """This machine's time for one trial of ``settings`` (two trials, here, the faster: the
    trial count it gives errs towards more work)."""
    from leakbench.config import RunConfig
    from leakbench.runner import run

    values = {**SETTINGS, **settings, "trials": 2, "output_dir": str(folder), "run_name": "timing"}
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    return min(r["time_s"] for r in records(folder / "timing"))


# --------------------------------------------------------------------------- the tests


def test_a_relaunch_while_queued_submits_nothing_twice_and_the_grid_is_collected(
    slurm, tmp_path, capsys
):
    path = write_grid(tmp_path, "queued", {}, {}, seeds=(0, 1))
    out = tmp_path / "out"
    blocker = subprocess.run(
        ["sbatch", "--parsable", f"--cpus-per-task={slurm.cpus}", "--mem=100", "-o", "/dev/null"]
        + ["--wrap", "sleep 600"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        wait_until(
            lambda: states([blocker]).get(blocker) == "RUNNING", "the blocker holds the node"
        )
        text = leakbench(capsys, "sweep", path, "--launcher", "slurm")
        (array,) = [line.split()[2][:-1] for line in text.splitlines() if "submitted" in line]
        assert f"submitted array {array}: 2 runs, each 1 task x 1 CPU" in text
        status = leakbench(capsys, "sweep", "status", path)
        for seed, line in enumerate(status_lines(status)):
            assert line.split()[:3] == [f"seed{seed}", "queued", "0/2"]
            assert f"SLURM job {array}_{seed} PENDING" in line  # with SLURM's reason, once given
        assert "0 done, 0 running, 2 queued, 0 failed, 0 missing" in status

        again = leakbench(capsys, "sweep", path, "--launcher", "slurm")
        assert "grid queued: 0 of 2 runs to launch (slurm)" in again
        assert f"skipped  seed0: queued SLURM job {array}_0 PENDING" in again
        assert "submitted" not in again
    finally:
        subprocess.run(["scancel", blocker], check=True)
    jobs = [f"{array}_{seed}" for seed in (0, 1)]
    assert set(wait_for_end(jobs).values()) == {"COMPLETED"}
    for seed in (0, 1):
        assert [launch["job_id"] for launch in launches(out / f"seed{seed}")] == [jobs[seed]]
        assert_exactly_once(out / f"seed{seed}", trials=2)
    status = leakbench(capsys, "sweep", "status", path)
    assert "2 done, 0 running, 0 queued, 0 failed, 0 missing" in status
    leakbench(capsys, "sweep", "collect", path)
    rows = (out / "queued.csv").read_text().splitlines()
    assert [row.split(",")[:9] for row in rows[1:]] == [
        [f"seed{seed}", "", "synthetic-uniform", "fcn", "dlg", "none", "1", "2", "0"]
        for seed in (0, 1)
    ]


def test_scancel_mid_run_fails_no_trial_and_a_relaunch_finishes_the_run(slurm, tmp_path, capsys):
    path = write_grid(tmp_path, "cancel", STOPPED, {})
    run_dir = tmp_path / "out" / "seed0"
    text = leakbench(capsys, "sweep", path, "--launcher", "slurm")
    (job,) = [entry["job_id"] for entry in launches(run_dir)]
    assert f"submitted job {job}: 1 run, 1 task x 1 CPU" in text  # a plain job, not an array
    freeze_mid_trial(job, run_dir, recorded=0)
    subprocess.run(["scancel", job], check=True)
    assert wait_for_end([job]) == {job: "CANCELLED"}
    kept = records(run_dir)
    assert 1 <= len(kept) < 3 and {r["status"] for r in kept} == {"ok"}
    assert not (run_dir / sweep.FAILED_FILE).exists()  # interrupted, not failed
    assert "interrupted by SIGTERM: the trial in flight was dropped" in submitit_log(path, job)
    (line,) = status_lines(leakbench(capsys, "sweep", "status", path))
    assert line.split()[:3] == ["seed0", "failed", f"{len(kept)}/3"]
    assert line.endswith(
        f"stopped after {len(kept)} of 3 trials; SLURM job {job} CANCELLED; a re-launch finishes it"
    )

    text = leakbench(capsys, "sweep", path, "--launcher", "slurm")
    assert "grid cancel: 1 of 1 runs to launch (slurm)" in text
    second = launches(run_dir)[-1]["job_id"]
    assert second != job
    assert wait_for_end([second]) == {second: "COMPLETED"}
    assert_exactly_once(run_dir, trials=3)


def test_slurms_warning_signal_mid_run_requeues_the_job_which_finishes_from_its_records(
    slurm, tmp_path, capsys
):
    """SIGUSR2, which SLURM sends ahead of a job's time limit (and of a preemption), here sent
    by hand mid-trial: the job drops its trial in flight, submitit requeues it, and it finishes
    from its records, in one launch. The fast sibling of the nightly
    ``test_a_time_limit_requeues_the_job_which_finishes_from_its_records``."""
    path = write_grid(tmp_path, "requeue", STOPPED, {})
    run_dir = tmp_path / "out" / "seed0"
    leakbench(capsys, "sweep", path, "--launcher", "slurm")
    (job,) = [entry["job_id"] for entry in launches(run_dir)]
    freeze_mid_trial(job, run_dir, recorded=0)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_for_end([job]) == {job: "COMPLETED"}
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    log = submitit_log(path, job)
    assert int(shown.stdout.split("Restarts=")[1].split()[0]) >= 1, log
    assert "interrupted by SIGUSR2: the trial in flight was dropped" in log
    assert f"Requeued job {job}" in log
    assert [entry["job_id"] for entry in launches(run_dir)] == [job]  # one launch, requeued
    assert_exactly_once(run_dir, trials=3)


def test_fewer_trials_than_ranks_start_and_finish_in_one_launch(slurm, tmp_path, capsys):
    path = write_grid(tmp_path, "ranks", {"trials": 1, "devices": 2}, {})
    run_dir = tmp_path / "out" / "seed0"
    text = leakbench(capsys, "sweep", path, "--launcher", "slurm")
    assert "1 run, 2 tasks x 1 CPU" in text
    (job,) = [entry["job_id"] for entry in launches(run_dir)]
    assert wait_for_end([job]) == {job: "COMPLETED"}, submitit_log(path, job, 1)
    assert_exactly_once(run_dir, trials=1)  # trial 0 is rank 0's; rank 1 had none


@pytest.mark.slow
def test_a_time_limit_requeues_the_job_which_finishes_from_its_records(slurm, tmp_path, capsys):
    """A run of at least 150 s of trials under a 2-minute limit: SLURM warns it (SIGUSR2, 30 s
    before the limit, but up to a minute earlier: it looks every 30 s); it must requeue itself
    and finish from its records. Slow: SLURM's time limits are whole minutes. Fast sibling (the
    same signal, sent by hand mid-trial):
    ``test_slurms_warning_signal_mid_run_requeues_the_job_which_finishes_from_its_records``."""
    settings = {"attack_options": {"dlg": {"iterations": 300}}}
    trials = max(20, int(LIMIT_WORK_S / seconds_per_trial(settings, tmp_path / "timing")))
    path = write_grid(tmp_path, "limit", {**settings, "trials": trials}, {})
    cli.main(["sweep", str(path), "--launcher", "slurm", "--time-min", "2"])
    run_dir = tmp_path / "out" / "seed0"
    (job,) = [entry["job_id"] for entry in launches(run_dir)]
    assert wait_for_end([job]) == {job: "COMPLETED"}
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    restarts = int(shown.stdout.split("Restarts=")[1].split()[0])
    log = submitit_log(path, job)
    assert restarts >= 1, log
    assert "this job is timed-out" in log and f"Requeued job {job}" in log
    assert [entry["job_id"] for entry in launches(run_dir)] == [job]  # one launch, requeued
    assert_exactly_once(run_dir, trials=trials)
    status = leakbench(capsys, "sweep", "status", path)
    assert "1 done, 0 running, 0 queued, 0 failed, 0 missing" in status
