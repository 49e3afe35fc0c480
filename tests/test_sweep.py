"""Grids of runs (``leakbench sweep``): expansion and names, bad input, launching through
submitit's local executor, a grid killed part-way and re-launched, status and collect, a changed
grid refused, the SLURM job array up to sbatch, and the W&B group of a grid's runs."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from leakbench import cli, leaderboard, sweep
from leakbench.config import ConfigError

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("sweep")

# Tiny runs: synthetic images, a small FCN, attacks in the harness's process, one thread.
BASE = {
    "dataset": "synthetic-uniform",
    "model": "fcn",
    "model_options": {"widths": [16]},
    "attacks": ["dlg"],
    "attack_options": {"dlg": {"iterations": 100}},  # ~0.3 s a trial: a kill lands mid-run
    "batch_sizes": [1],
    "trials": 4,
    "logger": "none",
    "threads": 1,
    "accelerator": "cpu",
    "isolation": "in-process",
}
RUN_NAMES = ["b1__seed0", "b1__seed1", "b2__seed0", "b2__seed1"]
KILLED_RUNS = ["seed0", "seed1"]  # the track's grid, killed part-way and re-launched
TRACK = {"name": "tiny-track", "kind": "attack", "free": ["attacks", "attack_options"]}


def write_grid(folder: Path, name: str = "grid", **grid) -> Path:
    grid = {"name": name, "set": BASE, "output_dir": str(folder / "out"), **grid}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def two_by_two(folder: Path, **extra) -> Path:
    return write_grid(folder, axes={"seeds": [0, 1], "batch_sizes": [1, 2]}, **extra)


def track_grid(folder: Path) -> Path:
    """Two seeds on a tiny track of its own (``tracks/tiny-track.yaml``): the track's seed and
    another one."""
    (folder / "tracks").mkdir()
    (folder / "tracks" / "tiny-track.yaml").write_text(yaml.safe_dump({"track": TRACK, **BASE}))
    return write_grid(folder, base="tracks/tiny-track.yaml", set={}, axes={"seeds": [0, 1]})


def records(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(run_dir.glob("trials*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def leakbench(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- expansion


def test_a_two_by_two_grid_expands_to_four_deterministically_named_runs(tmp_path):
    path = write_grid(
        tmp_path,
        name="names",
        axes={
            "attacks": ["bias", {"name": "dlg", "options": {"iterations": 5}, "label": "dlg5"}],
            "batch_sizes": [1, [1, 2]],
        },
    )
    grid = sweep.load_grid(path)
    names = [run.name for run in grid.runs]
    assert names == ["bias__b1", "bias__b1-2", "dlg5__b1", "dlg5__b1-2"]
    assert [run.name for run in sweep.load_grid(path).runs] == names  # the same every time
    by_name = {run.name: run.config for run in grid.runs}
    assert by_name["bias__b1"].attacks == ["bias"]
    assert by_name["bias__b1"].attack_options == {}  # the base's dlg options left with dlg
    assert by_name["dlg5__b1-2"].attack_options == {"dlg": {"iterations": 5}}
    assert by_name["dlg5__b1-2"].batch_sizes == [1, 2]
    for name, config in by_name.items():
        assert config.run_name == name
        assert Path(config.output_dir) == tmp_path / "out"
        assert (config.wandb_group, config.wandb_job_type) == ("names", "names")


def test_tracks_all_is_every_track_with_a_job_type_per_track(tmp_path):
    path = write_grid(tmp_path, name="tracks", set={"trials": 1}, axes={"tracks": "all"})
    grid = sweep.load_grid(path, check=False)  # the expansion; tracks are checked elsewhere
    tracks = sorted(p.stem for p in Path(leaderboard.TRACKS).glob("*.yaml"))
    assert [run.name for run in grid.runs] == tracks
    assert [run.config.wandb_job_type for run in grid.runs] == tracks
    assert {run.config.wandb_group for run in grid.runs} == {"tracks"}
    assert all(run.config.trials == 1 for run in grid.runs)


@pytest.mark.parametrize(
    "grid, fragments",
    [
        ({"axes": {"attack": ["bias"]}}, ["unknown axis 'attack'", "valid axes: attacks"]),
        (
            {"axes": {"attacks": ["bias", "nope"]}},
            ["axes.attacks[1]", "'nope'", "bias, cocktail-party, dlg"],
        ),
        ({"axes": {"defenses": [{"name": "noise", "opts": {}}]}}, ["'opts'", "valid: name"]),
        ({"axes": {"seeds": 0}}, ["axes.seeds must be a non-empty list"]),
        ({"launch": 1}, ["unknown key(s) 'launch'", "valid keys: name"]),
        ({"resources": {"gpus": 1}}, ["unknown resource(s) 'gpus'", "gpus_per_node"]),
        ({"set": {**BASE, "trails": 3}}, ["unknown key(s) 'trails'", "valid keys:"]),
        ({"axes": {"datasets": ["synthetic-uniform", "mnist"]}}, ["unknown dataset 'mnist'"]),
    ],
)
def test_an_unknown_axis_or_value_is_one_line_and_exit_2_before_any_launch(
    tmp_path, capsys, grid, fragments
):
    path = write_grid(tmp_path, **grid)
    code, out, err = leakbench(capsys, "sweep", path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out").exists()  # nothing was launched


def test_a_run_an_attack_cannot_handle_is_refused_before_any_launch(tmp_path, capsys):
    path = write_grid(tmp_path, axes={"models": [{"name": "fcn", "options": {"bias": False}}]})
    grid = yaml.safe_load(path.read_text())
    grid["set"] = {**BASE, "attacks": ["bias"], "attack_options": {}}
    path.write_text(yaml.safe_dump(grid))
    code, _, err = leakbench(capsys, "sweep", path, "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "(run fcn-" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_one_line_per_run_the_total_and_the_resources(tmp_path, capsys):
    path = two_by_two(tmp_path, resources={"partition": "cpu", "mem_gb": 3})
    code, out, _ = leakbench(capsys, "sweep", path, "--dry-run", "--time-min", "7")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 4 + 1
    for name, line in zip(RUN_NAMES, lines[1:5], strict=True):
        assert line.split()[:4] == [name, "missing", "4", "trials"]
        assert "1 task x 1 CPU, 0 GPU, 3 GB, 7 min, partition cpu" in line
    assert lines[-1].startswith("total: 4 runs, 16 trials; 4 to launch")
    assert "4 CPUs, 0 GPUs, 12 GB and 28 job-minutes" in lines[-1]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- launching


def wait_until(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def killed_and_relaunched(tmp_path_factory):
    """The track's grid launched one run at a time, killed (the sweep, submitit's controller and
    the job, all at once) once the first run is done and the second has begun, then re-launched."""
    folder = tmp_path_factory.mktemp("grid")
    path = track_grid(folder)
    out = folder / "out"
    env = {k: v for k, v in os.environ.items() if k != "LEAKBENCH_RUN_DIR"}
    process = subprocess.Popen(
        [sys.executable, "-m", "leakbench.cli", "sweep", str(path), "--jobs", "1"],
        env=env,
        start_new_session=True,  # its own process group: the kill takes every process of it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    first, second = KILLED_RUNS

    def first_done_and_second_begun() -> bool:
        if process.poll() is not None:
            return True
        if not (out / first / "summary.json").is_file():
            return False
        return (out / second / "trials.jsonl").is_file() and bool(records(out / second))

    wait_until(first_done_and_second_begun)
    assert process.poll() is None, process.stdout.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    wait_until(lambda: not group_alive(process.pid), timeout=30)
    grid = sweep.load_grid(path, check=False)
    after_kill = {run.name: sweep.run_status(run) for run in grid.runs}
    code = cli.main(["sweep", str(path), "--jobs", "2"])
    return {"path": path, "out": out, "after_kill": after_kill, "code": code}


def test_a_killed_grid_is_finished_by_a_relaunch_with_every_trial_exactly_once(
    killed_and_relaunched,
):
    after_kill = killed_and_relaunched["after_kill"]
    print({name: (s.state, s.recorded) for name, s in after_kill.items()})  # shown on failure
    first, second = (after_kill[name] for name in KILLED_RUNS)
    assert first.state == "done"
    # The kill stopped the second run part-way: recorded, not done, and not said to be running.
    assert 0 < second.recorded < 4
    assert second.state == "failed" and "stopped after" in second.note
    assert killed_and_relaunched["code"] == 0
    for name in KILLED_RUNS:
        run_dir = killed_and_relaunched["out"] / name
        counts = Counter((r["cell"], r["trial"]) for r in records(run_dir))
        assert sorted(counts) == [("dlg__none__b1", t) for t in range(4)]
        assert set(counts.values()) == {1}, counts
        assert (run_dir / "summary.json").is_file()
        assert not (run_dir / sweep.HEARTBEAT_FILE).exists()


def test_status_and_collect_give_the_expected_tables(killed_and_relaunched, capsys):
    path, out = killed_and_relaunched["path"], killed_and_relaunched["out"]
    code, text, _ = leakbench(capsys, "sweep", "status", path)
    assert code == 0
    lines = text.strip().splitlines()
    assert lines[1].split() == ["run", "state", "trials", "note"]
    assert [line.split() for line in lines[2:4]] == [[name, "done", "4/4"] for name in KILLED_RUNS]
    assert lines[-1] == "2 done, 0 running, 0 queued, 0 failed, 0 missing"

    code, text, _ = leakbench(capsys, "sweep", "collect", path)
    assert code == 0
    rows = (out / "grid.csv").read_text().splitlines()
    assert rows[0].split(",")[:9] == [
        "run",
        "track",
        "dataset",
        "model",
        "attack",
        "defense",
        "B",
        "trials",
        "failed",
    ]
    assert [row.split(",")[:9] for row in rows[1:]] == [
        [name, "tiny-track", "synthetic-uniform", "fcn", "dlg", "none", "1", "4", "0"]
        for name in KILLED_RUNS
    ]
    markdown = (out / "grid.md").read_text()
    assert "2 of 2 runs done" in markdown and markdown in text
    assert sum(line.startswith("| seed") for line in markdown.splitlines()) == 2


def test_collect_feeds_the_leaderboard_commands(killed_and_relaunched, capsys, monkeypatch):
    # The W&B keys are bookkeeping: the leaderboard's protocol check must not count them.
    entry_module = importlib.import_module("leakbench.leaderboard.entry")
    keys = {"wandb_group", "wandb_job_type"}
    monkeypatch.setattr(entry_module, "BOOKKEEPING_KEYS", entry_module.BOOKKEEPING_KEYS | keys)
    path = killed_and_relaunched["path"]
    tracks, entries = path.parent / "tracks", path.parent / "entries"
    code, text, _ = leakbench(
        capsys, "sweep", "collect", path, "--entries-dir", entries, "--tracks-dir", tracks
    )
    assert code == 0
    # Only the run that kept the track's protocol is an entry; the other is refused by name.
    (written,) = [p for p in entries.glob("*/*.json")]
    assert written == entries / "tiny-track" / "dlg-b1.json"
    entry = json.loads(written.read_text())
    assert entry["track"] == "tiny-track" and entry["results"]["trials"] == 4
    (refused,) = [line for line in text.splitlines() if line.startswith("no entry for")]
    assert refused.startswith("no entry for seed1 dlg__none__b1: ") and refused.endswith(": seed")
    # On the board, unranked until the board's own verification has run it.
    (row,) = [
        r for r in leaderboard.render(entries, tracks)["tiny-track.md"].splitlines() if "dlg" in r
    ]
    assert row.startswith("| - | dlg | dlg | A | none | 1 |") and row.endswith("| unverified |")


def test_a_relaunch_of_a_finished_grid_launches_nothing(killed_and_relaunched, capsys):
    code, text, _ = leakbench(capsys, "sweep", killed_and_relaunched["path"])
    assert code == 0
    assert "grid grid: 0 of 2 runs to launch (local)" in text
    assert text.count("skipped") == 2


def test_a_run_whose_config_changed_is_refused_not_merged(killed_and_relaunched, capsys):
    path, out = killed_and_relaunched["path"], killed_and_relaunched["out"]
    before = {name: records(out / name) for name in KILLED_RUNS}
    changed = path.with_name("changed.yaml")
    grid = yaml.safe_load(path.read_text())
    grid["set"] = {**grid["set"], "trials": 5}
    changed.write_text(yaml.safe_dump(grid))
    code, _, err = leakbench(capsys, "sweep", changed)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "another configuration" in err and "seed0 (trials)" in err
    assert {name: records(out / name) for name in KILLED_RUNS} == before
    code, text, _ = leakbench(capsys, "sweep", "status", changed)
    assert "2 failed" in text and "differs in: trials" in text


# --------------------------------------------------------------------------- ranks and signals

# Rank 1 of a local job finds its disk full when it records its first trial (a fault injected
# into the job's processes through sitecustomize, which Python imports at start-up).
DISK_FULL = """
import os
if os.environ.get("SUBMITIT_LOCAL_GLOBALID") == "1" and not os.environ.get("HEALED"):
    import leakbench.results

    def append_trial(self, record, rank=0):
        raise OSError(28, "No space left on device")

    leakbench.results.RunDirectory.append_trial = append_trial
"""


@pytest.mark.slow  # two launches of two ranks (40 s); tests/test_slurm.py runs two ranks in CI
def test_the_error_file_names_the_failing_rank_and_a_relaunch_finishes_with_one_rank_done(
    tmp_path, capsys, monkeypatch
):
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(DISK_FULL)
    monkeypatch.setenv("PYTHONPATH", f"{faults}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    path = write_grid(tmp_path, axes={"seeds": [0]}, set={**BASE, "devices": 2, "trials": 2})
    run_dir = tmp_path / "out" / "seed0"
    code, text, _ = leakbench(capsys, "sweep", path)
    assert code == 1 and "failed   seed0" in text
    # Rank 0 ran its trial, then lost rank 1 at the next collective: the cause is rank 1's.
    assert [(r["trial"], r["status"]) for r in records(run_dir)] == [(0, "ok")]
    failure = json.loads((run_dir / sweep.FAILED_FILE).read_text())
    assert failure["rank"] == 1
    assert failure["error"] == "OSError: [Errno 28] No space left on device"
    code, text, _ = leakbench(capsys, "sweep", "status", path)
    (line,) = [line for line in text.splitlines() if line.startswith("seed0")]
    assert line.split(maxsplit=3) == [
        "seed0",
        "failed",
        "1/2",
        "rank 1: OSError: [Errno 28] No space left on device",
    ]

    # Resumed: rank 0's shard is done, rank 1 has its trial left; one launch finishes it.
    monkeypatch.setenv("HEALED", "1")
    code, text, _ = leakbench(capsys, "sweep", path)
    assert code == 0, text
    counts = Counter((r["cell"], r["trial"]) for r in records(run_dir))
    assert counts == {("dlg__none__b1", 0): 1, ("dlg__none__b1", 1): 1}
    assert (run_dir / "summary.json").is_file() and not (run_dir / sweep.FAILED_FILE).exists()


@pytest.mark.slow
def test_sigterm_to_a_local_sweep_ends_its_jobs_and_a_relaunch_finishes(tmp_path, capsys):
    settings = {**BASE, "trials": 6, "isolation": "process", "privacy_metrics": False}
    path = write_grid(tmp_path, axes={"seeds": [0]}, set=settings)
    run_dir = tmp_path / "out" / "seed0"
    env = {k: v for k, v in os.environ.items() if k != "LEAKBENCH_RUN_DIR"}
    process = subprocess.Popen(
        [sys.executable, "-m", "leakbench.cli", "sweep", str(path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: process.poll() is not None or bool(records(run_dir)), timeout=600)
    assert process.poll() is None, process.stdout.read()
    os.kill(process.pid, signal.SIGTERM)  # the sweep alone: it ends its jobs
    assert process.wait(timeout=60) == 143
    output = process.stdout.read()
    assert "interrupted by SIGTERM; re-launch the grid to finish what is missing" in output
    wait_until(lambda: not group_alive(process.pid), timeout=30)
    kept = records(run_dir)
    assert 1 <= len(kept) < 6 and {r["status"] for r in kept} == {"ok"}
    assert not (run_dir / sweep.FAILED_FILE).exists()
    assert sweep.run_status(sweep.load_grid(path, check=False).runs[0]).state == "failed"
    code, text, _ = leakbench(capsys, "sweep", path)
    assert code == 0, text
    counts = Counter((r["cell"], r["trial"]) for r in records(run_dir))
    assert sorted(counts) == [("dlg__none__b1", t) for t in range(6)]
    assert set(counts.values()) == {1}


# --------------------------------------------------------------------------- status details


def test_a_run_is_running_only_while_its_heartbeat_is_fresh_and_its_process_alive(tmp_path):
    grid = sweep.load_grid(two_by_two(tmp_path), check=False)
    run = grid.runs[0]
    run.path.mkdir(parents=True)
    beat = run.path / sweep.HEARTBEAT_FILE

    def state(host: str, pid: int, age: float = 0.0) -> str:
        beat.write_text(json.dumps({"host": host, "pid": pid, "job_id": "7"}))
        stamp = time.time() - age
        os.utime(beat, (stamp, stamp))
        return sweep.run_status(run).state

    here = socket.gethostname()
    assert state(here, os.getpid()) == "running"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert state(here, dead.pid) == "missing"  # killed: the file outlived its process
    assert state("node-17", 1) == "running"  # another host: the heartbeat's age decides
    stale = sweep.STALE_AFTER_HEARTBEATS * sweep.HEARTBEAT_S + 5
    assert state("node-17", 1, age=stale) == "missing"


# --------------------------------------------------------------------------- SLURM


def fake_slurm(folder: Path) -> tuple[Path, Path]:
    """``srun``, an ``sbatch`` that keeps what it was given and answers like SLURM, and a
    ``squeue`` and ``sacct`` that print what the test puts in ``squeue.out`` / ``sacct.out``
    (``squeue.err`` instead: squeue fails with that message)."""
    bin_dir, kept = folder / "bin", folder / "sbatch-files"
    bin_dir.mkdir()
    kept.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 1\n",
        "sbatch": f'#!/bin/sh\nfor a; do f="$a"; done\ncp "$f" {kept}/\n'
        'echo "Submitted batch job 4242"\n',
        "squeue": f"#!/bin/sh\nif [ -f {bin_dir}/squeue.err ]; then cat {bin_dir}/squeue.err >&2; "
        f"exit 1; fi\ncat {bin_dir}/squeue.out 2>/dev/null\n",
        "sacct": f"#!/bin/sh\ncat {bin_dir}/sacct.out 2>/dev/null\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir, kept


def test_slurm_submits_one_array_per_resource_shape_with_the_grid_resources(
    tmp_path, capsys, monkeypatch
):
    path = write_grid(
        tmp_path,
        axes={"seeds": [0, 1], "batch_sizes": [1, 2], "models": ["fcn"]},
        resources={"partition": "gpu", "mem_gb": 6, "array_parallelism": 2, "account": "lab"},
    )
    bin_dir, kept = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, text, err = leakbench(
        capsys, "sweep", path, "--launcher", "slurm", "--time-min", "30", "--cpus-per-task", "3"
    )
    assert code == 0, err
    assert "submitted array 4242: 4 runs, each 1 task x 3 CPU" in text
    (script,) = kept.iterdir()
    lines = script.read_text().splitlines()
    for expected in (
        "#SBATCH --array=0-3%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=30",
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --mem=6GB",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --job-name=grid",
    ):
        assert expected in lines, (expected, lines)
    # One pickled call per array task, each a run of the grid; nothing ran here.
    assert len(list((tmp_path / "out" / ".submitit").glob("*_submitted.pkl"))) == 4
    assert not any((tmp_path / "out" / name).exists() for name in RUN_NAMES)


def test_a_run_alone_in_its_resource_shape_is_a_plain_job_not_an_array(
    tmp_path, capsys, monkeypatch
):
    bin_dir, kept = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, text, err = leakbench(
        capsys, "sweep", write_grid(tmp_path, axes={"seeds": [0]}), "--launcher", "slurm"
    )
    assert code == 0, err
    assert "submitted job 4242: 1 run, 1 task x 1 CPU" in text and "array" not in text
    (script,) = kept.iterdir()
    assert not [line for line in script.read_text().splitlines() if "--array" in line]
    launch = json.loads((tmp_path / "out" / "seed0" / sweep.LAUNCHES_FILE).read_text())
    assert (launch["launcher"], launch["job_id"]) == ("slurm", "4242")


@pytest.fixture
def submitted(tmp_path, capsys, monkeypatch):
    """The 2 x 2 grid submitted to a fake SLURM as array 4242 (tasks 4242_0 ... 4242_3)."""
    bin_dir, kept = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = two_by_two(tmp_path)
    code, text, err = leakbench(capsys, "sweep", path, "--launcher", "slurm")
    assert code == 0 and "submitted array 4242: 4 runs" in text, err
    return {"path": path, "bin": bin_dir, "kept": kept}


def test_status_asks_slurm_and_a_relaunch_submits_only_what_is_not_queued_or_running(
    submitted, capsys
):
    path, bin_dir, kept = submitted["path"], submitted["bin"], submitted["kept"]
    (bin_dir / "squeue.out").write_text(
        "4242_0|PENDING|Resources\n4242_1|RUNNING|None\n4242_2|CANCELLED|None\n"
    )
    (bin_dir / "sacct.out").write_text("4242_3|OUT_OF_MEMORY\n")  # squeue forgot it
    code, text, _ = leakbench(capsys, "sweep", "status", path)
    assert code == 0
    rows = {line.split()[0]: line for line in text.splitlines()[2:6]}
    assert rows["b1__seed0"].split()[1:] == [
        "queued",
        "0/4",
        *"SLURM job 4242_0 PENDING".split(),
    ] + ["(Resources)"]
    assert rows["b1__seed1"].split()[1:] == ["running", "0/4", "SLURM", "job", "4242_1", "RUNNING"]
    assert rows["b2__seed0"].split()[1] == "failed"
    assert rows["b2__seed0"].endswith("SLURM job 4242_2 CANCELLED; a re-launch finishes it")
    assert rows["b2__seed1"].endswith("SLURM job 4242_3 OUT_OF_MEMORY; a re-launch finishes it")
    assert text.splitlines()[-1] == "0 done, 1 running, 1 queued, 2 failed, 0 missing"

    code, text, _ = leakbench(capsys, "sweep", path, "--launcher", "slurm")
    assert code == 0
    assert "skipped  b1__seed0: queued SLURM job 4242_0 PENDING (Resources)" in text
    assert "skipped  b1__seed1: running SLURM job 4242_1 RUNNING" in text
    assert "grid grid: 2 of 4 runs to launch (slurm)" in text
    assert "submitted array 4242: 2 runs, each 1 task x 1 CPU" in text
    assert text.split("submitted")[1].splitlines()[0].endswith(": b2__seed0, b2__seed1")
    assert len(list(kept.iterdir())) == 2  # the first array, then the second; nothing else


def test_a_launch_guesses_nothing_when_slurm_cannot_be_asked(submitted, capsys):
    path, bin_dir, kept = submitted["path"], submitted["bin"], submitted["kept"]
    (bin_dir / "squeue.err").write_text("slurm_load_jobs error: Unable to contact slurm controller")
    code, _, err = leakbench(capsys, "sweep", path, "--launcher", "slurm")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot tell which runs are still queued or running: squeue failed: " in err
    assert "Unable to contact slurm controller; nothing launched" in err
    code, _, err = leakbench(capsys, "sweep", path)  # nor locally
    assert code == 2 and "nothing launched" in err
    assert len(list(kept.iterdir())) == 1
    code, text, _ = leakbench(capsys, "sweep", "status", path)  # the folders still tell
    assert code == 0 and "0 done, 0 running, 0 queued, 0 failed, 4 missing" in text
    assert "(SLURM not asked: squeue failed: slurm_load_jobs error: Unable to contact" in text


def test_a_refusal_of_sbatch_is_said_in_one_line_and_nothing_is_recorded(
    tmp_path, capsys, monkeypatch
):
    bin_dir, _ = fake_slurm(tmp_path)
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2\nexit 1\n"
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, _, err = leakbench(capsys, "sweep", two_by_two(tmp_path), "--launcher", "slurm")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "leakbench: error: sbatch failed: sbatch: error: Batch job submission failed: "
        "Invalid account"
    )
    assert not list((tmp_path / "out").glob(f"*/{sweep.LAUNCHES_FILE}"))


def test_a_sharded_run_is_one_array_task_of_one_rank_per_task_on_one_node(tmp_path, monkeypatch):
    bin_dir, _ = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    grid = sweep.load_grid(
        write_grid(tmp_path, axes={"seeds": [0]}, set={**BASE, "devices": 2}), check=False
    )
    resources = sweep.run_resources(grid.runs[0], {"gpus_per_node": 2})
    executor = sweep.slurm_executor(tmp_path / "s", resources, "g", parallelism=4)
    parameters = executor._executor.parameters  # what submitit will write into the sbatch file
    assert parameters["ntasks_per_node"] == 2 and parameters["nodes"] == 1
    assert parameters["gpus_per_node"] == 2 and parameters["array_parallelism"] == 4
    assert parameters["time"] == resources.time_min == 10 + 2  # 4 trials x 60 s / 2 ranks
    assert parameters["signal_delay_s"] == 90  # SIGUSR2 90 s before the limit: requeue


def test_an_unavailable_launcher_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere
    code, _, err = leakbench(capsys, "sweep", two_by_two(tmp_path), "--launcher", "slurm")
    assert code == 2
    assert err.strip().splitlines() == [
        "leakbench: error: no SLURM on this machine (srun not found); use --launcher local, "
        "or --dry-run to see the plan"
    ]
    with pytest.raises(ConfigError):
        sweep.check_slurm()


# --------------------------------------------------------------------------- W&B


def test_the_runs_of_a_grid_share_a_wandb_group_with_a_job_type_per_track(tmp_path):
    from leakbench.runner import make_loggers

    path = write_grid(tmp_path, set={"trials": 1, "logger": "wandb"}, axes={"tracks": "all"})
    run = sweep.load_grid(path, check=False).runs[0]
    loggers = make_loggers(run.config, run.config.to_dict(), tmp_path / "run")
    (wandb,) = [logger for logger in loggers if type(logger).__name__ == "WandbLogger"]
    assert wandb._wandb_init["group"] == "grid"
    assert wandb._wandb_init["job_type"] == run.config.track["name"] == run.name
