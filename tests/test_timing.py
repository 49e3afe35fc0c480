"""The speed commands: `leakbench timing cli` rebuilds finished runs from entries and the
commands that read JSON import no torch; `leakbench timing attacks` prints per-step figures.
(The figures themselves are benchmark output, never asserted: tests do not time.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leakbench.cli import main
from leakbench.leaderboard.entry import LEADERBOARDS, TRACKS
from leakbench.timing import HEAVY_MODULES, PROBE, board_runs

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("timing")

ENTRIES = LEADERBOARDS / "entries"
TRACK = "lfw-subset-fcn-analytic"


def probe(argv: list[str]) -> dict:
    """Run ``leakbench ARGV`` in a fresh process; its exit code and heavy imports."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> dict[str, Path]:
    """One shipped track's entries, the finished runs rebuilt from their records, their grid,
    and the entries ``submit`` makes of them (against the tracks the runs were rebuilt with)."""
    folder = tmp_path_factory.mktemp("timing")
    entries = folder / "entries"
    shutil.copytree(ENTRIES / TRACK, entries / TRACK)
    grid, tracks, runs = board_runs(folder, entries, TRACKS)
    submitted = folder / "submitted"
    assert main(["submit", str(runs[0]), "--entries-dir", str(submitted)]
                + ["--tracks-dir", str(tracks)]) == 0  # fmt: skip
    return {
        "folder": folder,
        "grid": grid,
        "tracks": tracks,
        "run": runs[0],
        "submitted": submitted,
    }


def test_rebuilt_runs_are_finished_runs_that_sweep_and_submit_accept(board, capsys):
    assert main(["sweep", "status", str(board["grid"])]) == 0
    assert "1 done, 0 running, 0 queued, 0 failed, 0 missing" in capsys.readouterr().out
    written = sorted(p.name for p in (board["submitted"] / TRACK).glob("*.json"))
    shipped = sorted(p.name for p in (ENTRIES / TRACK).glob("*.json"))
    assert written == shipped
    for name in written:  # the same records
        ours = json.loads((board["submitted"] / TRACK / name).read_text())
        theirs = json.loads((ENTRIES / TRACK / name).read_text())
        assert ours["records"]["sha256"] == theirs["records"]["sha256"]


@pytest.mark.parametrize(
    "command",
    ["render", "build", "submit", "sweep status", "sweep collect"],
)
def test_commands_that_read_json_import_no_torch(board, command):
    folder, shown = board["folder"], ["--entries-dir", str(board["submitted"])]
    shown += ["--tracks-dir", str(board["tracks"])]
    argv = {
        "render": ["leaderboard", "render", *shown, "--out-dir", str(folder / "tables")],
        "build": ["leaderboard", "build", *shown, "--out-dir", str(folder / "site")],
        "submit": ["submit", str(board["run"]), "--entries-dir", str(folder / "again")]
        + ["--tracks-dir", str(board["tracks"])],
        "sweep status": ["sweep", "status", str(board["grid"])],
        "sweep collect": ["sweep", "collect", str(board["grid"]), "--out", str(folder / "c")],
    }[command]
    result = probe(argv)
    assert result["code"] == 0
    assert result["heavy"] == [], f"{command} imported {result['heavy']} of {HEAVY_MODULES}"


def test_timing_attacks_prints_per_step_figures_with_the_load(tmp_path, capsys):
    output = tmp_path / "attacks.json"
    code = main(
        ["timing", "attacks", "--attacks", "[idlg]", "--steps", "1", "--trials", "0"]
        + ["--output", str(output)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "idlg lenet-zhu B=1" in out and "ms CPU" in out and "load" in out
    result = json.loads(output.read_text())
    (line,) = result["results"]
    assert line["step_cpu_ms"] > 0 and line["evaluations_per_step"] >= 1
    assert result["threads"] == 1


def test_timing_commands_refuse_bad_input(capsys):
    assert main(["timing", "attacks", "--attacks", "[bias]"]) == 2
    assert "attacks: got bias, expected some of" in capsys.readouterr().err
    assert main(["timing", "cli", "--repeats", "0"]) == 2
    assert "repeats: got 0, expected at least 1" in capsys.readouterr().err
