"""``leakbench timing cli`` and ``leakbench timing attacks``: the commands that print the speed
figures of leakbench's targets, each next to the machine's load.

``timing cli`` runs every command that must answer at once in a fresh process
(``python -m leakbench.cli``, the way a user runs it) ``repeats`` times and prints the median
wall time and which heavy libraries (torch, torchmetrics, Lightning, W&B, SciPy) the command
imported. The commands that read JSON and write text (``leaderboard render``, ``leaderboard
build``, ``submit``, ``sweep status``, ``sweep collect``) run on the shipped board: ``submit``
and the sweep commands on finished run folders rebuilt from the shipped entries' own records
(:func:`board_runs`), in a temporary folder; nothing is written into the leaderboard.

``timing attacks`` (:mod:`leakbench.analysis.attack_timing`) times the optimisation attacks
per step and per trial on fixed victims and gradients.

This module imports no torch: it is one of :data:`leakbench.cli.COMMAND_MODULES`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from leakbench.commands import command

HEAVY_MODULES = ("torch", "torchmetrics", "lightning", "wandb", "scipy")
TARGET_SECONDS = 3.0  # every timed command, on a quiet machine (issue 22)

# Runs the command as ``leakbench`` would, then reports on its last line what it imported.
PROBE = f"""
import json, sys
from leakbench.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))
"""


def load_text() -> str:
    """The machine's load averages (1, 5, 15 min) and its core count, as one phrase."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def board_runs(folder: Path, entries_dir: Path, tracks_dir: Path) -> tuple[Path, Path, list[Path]]:
    """A sweep grid over the tracks that have entries, and its finished run folders, rebuilt
    under ``folder`` from the entries' records: the grid file, its tracks folder and the runs.

    Each run is its track as the grid expands it (from a copy of the tracks whose ``trials``
    is the entries' number of records, where an old entry has fewer than its track now asks);
    its folder holds what a finished run holds (``config.yaml`` with the recorded environment
    and the attacks' hyperparameters and code, ``trials.jsonl``, ``summary.json`` by the
    canonical aggregate, the cells' grids) for every entry whose cell the run has.
    """
    from leakbench.client import protocol_from_spec
    from leakbench.metrics import aggregate
    from leakbench.protocol.attack import attack_code
    from leakbench.registry import ATTACKS
    from leakbench.results import RunDirectory, cell_key
    from leakbench.sweep.grid import load_grid

    entries: dict[str, list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]] = {}
    for path in sorted(Path(entries_dir).glob("*/*.json")):
        entry = json.loads(path.read_text())
        records_path = path.with_name(path.stem + ".records.jsonl")
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        entries.setdefault(entry["track"], []).append((path, entry, records))
    if not entries:
        raise FileNotFoundError(f"no leaderboard entries in {entries_dir}: nothing to time on")
    tracks = folder / "tracks"
    shutil.copytree(tracks_dir, tracks, dirs_exist_ok=True)
    for track, made in entries.items():
        config = yaml.safe_load((tracks / f"{track}.yaml").read_text())
        config["trials"] = len(made[0][2])
        (tracks / f"{track}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    grid_path = folder / "board-grid.yaml"
    grid_path.write_text(
        yaml.safe_dump(
            {
                "name": "timing-board",
                "output_dir": str(folder / "runs"),
                "axes": {"tracks": [str(tracks / f"{t}.yaml") for t in entries]},
            }
        )
    )
    runs = []
    for run in load_grid(grid_path, check=False).runs:
        config = run.config
        track = (config.track or {}).get("name")
        by_cell = {}
        for path, entry, records in entries.get(track, []):
            cell = cell_key(
                entry["attack"]["name"], config.defense, entry["protocol"]["batch_size"]
            )
            if (
                entry["attack"]["name"] in config.attacks
                and entry["defense"]["name"] == config.defense
                and len(records) == config.trials
                and {r["cell"] for r in records} == {cell}
            ):
                by_cell[cell] = (path, entry, records)
        if not by_cell:
            continue
        run_dir = RunDirectory(run.path)
        first = next(iter(by_cell.values()))[1]
        ran = {}
        protocol = protocol_from_spec(config.client_protocol).names()
        for name in config.attacks:
            cls = ATTACKS.get(name)
            options = config.attack_options.get(name, {})
            ran[name] = {
                "hparams": dict(cls(**options).hparams),
                "code": attack_code(cls),
                "threat_letter": cls.sok_threat_model(protocol).letter,
            }
        run_dir.write_config(
            {
                **config.to_dict(),
                "environment": first["environment"],
                "datamodule": first.get("datamodule"),
                "attacks_run": ran,
            }
        )
        cells = {}
        for cell, (path, entry, records) in by_cell.items():
            for record in records:
                run_dir.append_trial(record)
            grid_png = path.with_name(path.stem + ".grid.png")
            if grid_png.is_file():
                run_dir.write_figure(cell, grid_png.read_bytes())
            cells[cell] = {
                "attack": entry["attack"]["name"],
                "defense": entry["defense"]["name"],
                "batch_size": entry["protocol"]["batch_size"],
                **aggregate(records),
            }
        run_dir.write_summary(
            {
                "dataset": config.dataset,
                "model": config.model,
                "success_psnr": config.success_psnr,
                "cells": cells,
                "skipped": {},
            }
        )
        runs.append(run.path)
    return grid_path, tracks, runs


def timed_commands(
    folder: Path, entries_dir: Path | None, tracks_dir: Path | None
) -> tuple[list[tuple[str, list[str]]], str]:
    """(label, argv) of every timed command (the board's ones work in ``folder``), and which
    board ``render`` and ``build`` read.

    ``render`` and ``build`` read the shipped board; where its entries no longer match their
    tracks (made under an older track file), the board ``submit`` makes from the rebuilt runs.
    """
    from leakbench.leaderboard import submit
    from leakbench.leaderboard.board import load_board
    from leakbench.leaderboard.entry import LEADERBOARDS, TRACKS, EntryError

    entries = Path(entries_dir) if entries_dir else LEADERBOARDS / "entries"
    tracks = Path(tracks_dir) if tracks_dir else TRACKS
    grid, copied, runs = board_runs(folder, entries, tracks)
    board, board_tracks, which = entries, tracks, f"the shipped entries ({entries})"
    try:
        load_board(entries, tracks)
    except EntryError as exc:
        board, board_tracks = folder / "board", copied
        for run in runs:
            submit(run, None, board, tracks_dir=copied)
        which = (
            f"entries submit made from the shipped records, as the shipped ones are refused "
            f"({str(exc)[:120]})"
        )
    # The run with the most cells: submit checks and writes an entry for each.
    run = max(runs, key=lambda p: len(json.loads((p / "summary.json").read_text())["cells"]))
    shown = ["--entries-dir", str(board), "--tracks-dir", str(board_tracks)]
    return [
        ("--help", ["--help"]),
        ("list", ["list"]),
        ("run --attack nope (refused)", ["run", "--attack", "nope"]),
        ("leaderboard render", ["leaderboard", "render", *shown, "--out-dir", str(folder / "t")]),
        ("leaderboard build", ["leaderboard", "build", *shown, "--out-dir", str(folder / "s")]),
        (
            f"submit ({run.name})",
            ["submit", str(run), "--entries-dir", str(folder / "e"), "--replace"]
            + ["--tracks-dir", str(copied)],
        ),
        ("sweep status", ["sweep", "status", str(grid)]),
        ("sweep collect", ["sweep", "collect", str(grid), "--out", str(folder / "c")]),
    ], which


def time_command(argv: Sequence[str], repeats: int) -> dict[str, Any]:
    """Wall times of ``repeats`` fresh processes running ``leakbench ARGV``, its exit code and
    the heavy modules it imported (from the last run)."""
    times, report = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False
        )
        times.append(time.perf_counter() - start)
        lines = done.stdout.strip().splitlines()
        try:
            report = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            report = {"code": done.returncode, "heavy": None, "error": error}
    return {"times": times, **report}


@command("timing cli")
def timing_cli_command(
    *, repeats: int = 5, entries_dir: str | None = None, tracks_dir: str | None = None
) -> int:
    """Print the wall time of the commands that must answer at once, with the machine's load.

    `leakbench --help`, `list`, an unknown-name refusal, `leaderboard render`, `leaderboard
    build`, `submit`, `sweep status` and `sweep collect`, each a fresh process; the board's
    commands on the shipped entries (submit and sweep on run folders rebuilt from their
    records, in a temporary folder). Target: under 3 s each on a quiet machine.

    Args:
        repeats: Runs of each command (the median is printed).
        entries_dir: Folder of the entries to time on (default: the leaderboard's).
        tracks_dir: Folder of the track files (default: the package's).
    """
    if repeats < 1:
        raise ValueError(f"repeats: got {repeats}, expected at least 1")
    print(f"before: {load_text()}")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="leakbench-timing-") as tmp:
        folder = Path(tmp)
        commands, which = timed_commands(
            folder,
            Path(entries_dir) if entries_dir else None,
            Path(tracks_dir) if tracks_dir else None,
        )
        print(f"leaderboard render and build read {which}")
        width = max(len(label) for label, _ in commands) + 2
        for label, argv in commands:
            result = time_command(argv, repeats)
            times = result["times"]
            median = statistics.median(times)
            heavy = result.get("heavy")
            imports = "?" if heavy is None else (", ".join(heavy) or "none of them")
            status = "" if result.get("code") in (0, 2) else f"; FAILED: {result.get('error')}"
            failed += bool(status)
            over = " (over the 3 s target)" if median > TARGET_SECONDS else ""
            print(
                f"leakbench {label:<{width}} median {median:6.3f} s{over} (min {min(times):.3f}, "
                f"max {max(times):.3f}, {repeats} runs); heavy imports: {imports}{status}"
            )
    print(f"after:  {load_text()}")
    return 1 if failed else 0


@command("timing attacks")
def timing_attacks_command(
    *,
    attacks: list[str] | None = None,
    steps: int = 20,
    trials: int = 1,
    restarts: int = 4,
    threads: int | None = None,
    output: str | None = None,
) -> int:
    """Print each optimisation attack's time per step and per trial on fixed victims and
    gradients, with the machine's load.

    Args:
        attacks: Attacks to time (default: [dlg,idlg,inverting-gradients]; gradinversion is
            timed on ResNet-18 at B = 8 to 48).
        steps: Steps timed per setting (after 2 warm-up steps).
        trials: Whole trials per setting at the attack's default iterations (0: none).
        restarts: Restarts of Inverting Gradients in its restart settings (1: none).
        threads: Intra-op threads (default: 1, as the side-by-side comparisons).
        output: Also write the figures as JSON to this file.
    """
    from leakbench.analysis.attack_timing import timing_attacks

    return timing_attacks(
        attacks=attacks,
        steps=steps,
        trials=trials,
        restarts=restarts,
        threads=threads,
        output=Path(output) if output else None,
    )
