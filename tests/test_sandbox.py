"""The attack sandbox against hostile plug-ins: each route out of the attack's process finds
nothing under ``isolation: sandbox``, and the same plug-in shows the route open under ``process``
or ``in-process`` (the controls), so that every test here can fail.

The plug-ins (``tests/plugins/``) are installed for the module as a real distribution: package
folders and a ``.dist-info`` with their ``leakbench.attacks`` entry points, on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import leakbench.protocol.trial as trial
from leakbench.config import RunConfig
from leakbench.protocol.sandbox import sandbox_unavailable
from leakbench.registry import ATTACKS
from leakbench.runner import run

CHANCE_DB = 15.0  # noise against faces scores far below this; an exact copy above 100 dB

pytestmark = pytest.mark.skipif(
    sandbox_unavailable() is not None,
    reason=f"no attack sandbox on this machine: {sandbox_unavailable()}",
)


@pytest.fixture
def harness_restored():
    """Undo what a control let a hostile plug-in do to this process."""
    ATTACKS.names()  # the built-in attacks are registered before we keep a copy
    items, score = dict(ATTACKS._items), trial.score_trial
    yield
    ATTACKS._items.clear()
    ATTACKS._items.update(items)
    trial.score_trial = score
    for module in ("hostile_probe", "hostile_import", "hostile_hooks"):
        sys.modules.pop(module, None)


def run_probe(tmp_path, isolation, attack="hostile-probe", options=None, **overrides):
    values = dict(
        dataset="lfw-subset",
        model="fcn",
        model_options={"widths": [16]},
        attacks=[attack],
        attack_options={attack: options or {}},
        batch_sizes=[1],
        trials=1,
        covariates=[],
        privacy_metrics=False,
        output_dir=str(tmp_path / "out"),
        run_name="run",
        logger="none",
        threads=1,
        isolation=isolation,
        budget={"max_iterations": None, "max_seconds": 60},
    )
    values.update(overrides)
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    rows = []
    for path in sorted((tmp_path / "out" / "run").glob("trials*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows


def psnrs(rows):
    return [s["psnr"] for r in rows for s in r["metrics"]["samples"]]


def info(rows):
    (row,) = rows
    assert row["status"] == "ok", row["error"]
    return row["attack_info"]


def test_the_harness_never_imports_a_plugin(tmp_path, hostile_site, harness_restored):
    """Import-time code rewires the scoring of every trial in the process that imports it."""
    original = trial.score_trial
    for isolation in ("sandbox", "process"):
        rows = run_probe(tmp_path / isolation, isolation, "hostile-import", trials=2)
        assert [r["isolation"] for r in rows] == [isolation] * 2
        assert max(psnrs(rows)) < CHANCE_DB
        assert "hostile_import" not in sys.modules and trial.score_trial is original
    rows = run_probe(tmp_path / "control", "in-process", "hostile-import")
    assert min(psnrs(rows)) > 100  # the control: imported in the harness, the route works
    assert trial.score_trial is not original


def test_check_model_runs_where_attacks_run(tmp_path, hostile_site, harness_restored):
    original = trial.score_trial
    rows = run_probe(tmp_path / "sandbox", "sandbox", "hostile-check")
    assert max(psnrs(rows)) < CHANCE_DB and trial.score_trial is original
    rows = run_probe(tmp_path / "control", "in-process", "hostile-check")
    assert min(psnrs(rows)) > 100


def test_client_code_cannot_smuggle_the_batch_past_its_declared_state(
    tmp_path, hostile_site, harness_restored
):
    """Client code gets a fresh sandbox of its own: what it stashes is gone when the server's
    attack runs. In worker processes the stash in the shared /tmp hands over the batch."""
    place = Path("/tmp") / f"hostile-stash-{secrets.token_hex(8)}.pt"
    stash, grants = {"stash": str(place)}, {"grants": ["batch_size", "client_code"]}
    try:
        rows = run_probe(tmp_path / "sandbox", "sandbox", "hostile-stash", stash, **grants)
        assert info(rows) == {"from": None} and max(psnrs(rows)) < CHANCE_DB
        rows = run_probe(tmp_path / "control", "process", "hostile-stash", stash, **grants)
        assert info(rows) == {"from": str(place)} and min(psnrs(rows)) > 100
    finally:
        place.unlink(missing_ok=True)


def test_the_environment_and_descriptors_hold_nothing_of_the_harness(tmp_path, hostile_site):
    found = info(run_probe(tmp_path / "sandbox", "sandbox", options={"route": "environ"}))
    assert found["run_dir"] is None and found["wrote"] is None
    own = {k for k in found["env_keys"] if not k.startswith("TORCH")}  # set by torch in there
    assert own <= {"HOME", "LANG", "OMP_WAIT_POLICY", "PATH", "PWD"}
    # The control: a worker process carries the harness's environment (the fork server's copy
    # of it: pytest's own variables, and the run folder where the server started in a run).
    control = info(run_probe(tmp_path / "control", "process", options={"route": "environ"}))
    assert "PYTEST_CURRENT_TEST" in control["env_keys"]

    found = info(run_probe(tmp_path / "fds", "sandbox", options={"route": "descriptors"}))
    channels = {fd: t for fd, t in found["targets"].items() if t.startswith(("pipe:", "socket:"))}
    # Standard output and error are the sandbox's log; one pipe carries the answer; standard
    # input is /dev/null. Nothing leads to the harness's terminal, files or sockets.
    assert found["targets"]["0"] == "/dev/null" and len(channels) == 3
    assert channels["1"] == channels["2"]


def test_files_outside_the_attack_code_are_out_of_sight(tmp_path, hostile_site, monkeypatch):
    import leakbench.metrics

    data, checkpoints, home = tmp_path / "data", tmp_path / "checkpoints", tmp_path / "home"
    for folder in (data, checkpoints, home):
        folder.mkdir()
    (home / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LEAKBENCH_DATA", str(data))
    source = leakbench.metrics.__file__
    paths = [tmp_path / "out", tmp_path / "out" / "run", data, checkpoints, home / ".netrc"]
    options = {"route": "files", "paths": [*map(str, paths), source]}
    extra = {"checkpoint_dir": str(checkpoints)}
    found = info(run_probe(tmp_path, "sandbox", options=options, **extra))
    assert found == {"seen": [source], "writable": []}  # its own code, read-only
    shutil.rmtree(tmp_path / "out")
    control = info(run_probe(tmp_path, "process", options=options, **extra))
    assert set(map(str, paths)) <= set(control["writable"])


def test_no_network_no_harness_process_no_harness_memory(tmp_path, hostile_site):
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    token = secrets.token_hex(16)  # lives in this process's memory
    probes = {
        "network": {"route": "network", "port": server.getsockname()[1]},
        "processes": {"route": "processes", "pid": os.getpid()},
        "memory": {"route": "memory", "token": token},
        "fork-server": {"route": "fork-server"},
    }
    for name, options in probes.items():
        found = info(run_probe(tmp_path / name, "sandbox", options=options))
        if name == "network":
            assert not found["connected"]
        elif name == "processes":
            assert not found["harness_visible"] and not found["signalled_harness"]
            assert found["environ_with_run_dir"] == 0 and found["pids"] == [1]
        elif name == "memory":
            assert found["token_found_in"] == []
        else:
            assert found == {"sockets": [], "connected": []}
    # The controls: a worker process connects, sees and signals the harness, finds the fork
    # server's socket and, as root (CAP_SYS_PTRACE), reads the harness's memory.
    control = {
        name: info(run_probe(tmp_path / f"control-{name}", "process", options=options))
        for name, options in probes.items()
        if name != "fork-server"  # connecting to it could take down the tests' fork server
    }
    assert control["network"]["connected"]
    assert control["processes"]["harness_visible"] and control["processes"]["signalled_harness"]
    if os.geteuid() == 0:
        assert os.getpid() in control["memory"]["token_found_in"]
    server.close()


def test_an_orphan_does_not_outlive_its_job(tmp_path, hostile_site):
    for isolation in ("sandbox", "process"):
        out = tmp_path / isolation
        out.mkdir()
        options = {"route": "orphan", "paths": [str(out)]}
        info(run_probe(out, isolation, options=options))
        time.sleep(2.5)
        written = (out / "orphan-was-here.txt").is_file()
        assert written == (isolation == "process"), isolation


def test_exhausting_memory_or_processes_fails_only_that_trial(tmp_path, hostile_site, monkeypatch):
    monkeypatch.setattr("leakbench.protocol.isolation.SANDBOX_MEMORY_SHARE", 1 / 16)
    cases = {
        "memory-hog": ({"route": "memory-hog"}, "MemoryError"),
        "fork-bomb": ({"route": "fork-bomb", "limit": 100_000}, "fork bomb stopped after"),
    }
    for name, (options, reason) in cases.items():
        rows = run_probe(
            tmp_path / name,
            "sandbox",
            options=options,
            attacks=["hostile-probe", "bias"],
            attack_options={"hostile-probe": options},
        )
        failed = [r for r in rows if r["attack"] == "hostile-probe"]
        assert [r["status"] for r in failed] == ["failed"] and reason in failed[0]["error"]
        (bias,) = [r for r in rows if r["attack"] == "bias"]
        assert bias["status"] == "ok" and min(psnrs([bias])) > 100  # the next job is unharmed


def test_the_harness_is_not_dumpable_after_a_run(tmp_path):
    import ctypes

    run_probe(tmp_path, "in-process", attack="bias")
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE


def test_the_sandbox_works_for_an_ordinary_user(tmp_path):
    """Without privileges (a user namespace in which this process is uid 1000 with no
    capabilities on the host), bubblewrap maps the sandbox's user itself."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux's unshare is not installed")
    script = (
        "import os; from leakbench.protocol.sandbox import SandboxView, Sandbox\n"
        "from leakbench.protocol.jobs import dumps, loads\n"
        "assert os.geteuid() == 1000\n"
        "box = Sandbox(SandboxView.build(forbidden=[]), 'probe')\n"
        "job = {'kind': 'describe', 'target': {'module': 'leakbench.attacks.bias',"
        " 'qualname': 'BiasAttack'}, 'options': {}, 'victim': None}\n"
        "answer, how = box.call(dumps(job), 120)\n"
        "print(loads(answer)['result']['qualname'])\n"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    if "unshare failed" in done.stderr or "Operation not permitted" in done.stderr:
        pytest.skip(f"no user namespaces for this test: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "leakbench.attacks.bias:BiasAttack"


def test_verification_refuses_a_machine_without_a_sandbox(tmp_path, monkeypatch):
    """Verification never falls back: without a sandbox it refuses, saying why."""
    from leakbench.leaderboard import verify

    entry = next((Path(__file__).parents[1] / "leaderboards" / "entries").glob("*/*.json"))
    monkeypatch.setattr(verify, "load_entry", lambda *a, **k: json.loads(entry.read_text()))
    monkeypatch.setattr(verify, "require_attack", lambda entry: None)
    monkeypatch.setattr("leakbench.protocol.sandbox._STATUS", ["no bubblewrap binary: install it"])
    with pytest.raises(verify.EntryError, match="in the sandbox, which this machine lacks: no bub"):
        verify.verify_entry(entry, check_only=True, echo=lambda _: None)


def test_verification_refuses_a_distribution_that_runs_code_everywhere(tmp_path, monkeypatch):
    """A .pth file runs in every Python process of the environment, the harness's too."""
    from leakbench.leaderboard.entry import EntryError
    from leakbench.leaderboard.verify import _refuse_intrusive_distribution

    site = tmp_path / "site"
    (site / "sneaky").mkdir(parents=True)
    (site / "sneaky" / "__init__.py").write_text("")
    (site / "sneaky-init.pth").write_text("import sneaky\n")
    dist = site / "sneaky-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sneaky\nVersion: 1.0\n")
    (dist / "top_level.txt").write_text("sneaky\n")
    (dist / "RECORD").write_text(
        "sneaky/__init__.py,,\nsneaky-init.pth,,\nsneaky-1.0.dist-info/RECORD,,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(EntryError, match=r"installs sneaky-init.pth, which runs code in every"):
        _refuse_intrusive_distribution("sneaky")
    (site / "sneaky-init.pth").unlink()
    (site / "leakbench").mkdir()
    (dist / "RECORD").write_text("sneaky/__init__.py,,\nleakbench/metrics.py,,\n")
    with pytest.raises(EntryError, match=r"installs leakbench/metrics.py outside its own packages"):
        _refuse_intrusive_distribution("sneaky")
