"""Collecting the summaries of a grid's finished runs (``leakbench sweep collect``): one row per
cell, as CSV and Markdown, and optionally a leaderboard entry per cell of each track run."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leakbench.sweep.grid import Grid
from leakbench.sweep.status import RunStatus, grid_status

COLLECT_COLUMNS = (
    "run",
    "track",
    "dataset",
    "model",
    "attack",
    "defense",
    "B",
    "trials",
    "failed",
    "PSNR median",
    "PSNR mean",
    "PSNR worst",
    "SSIM median",
    "success",
    "label acc",
    "time median (s)",
    "cell",
    "run_dir",
)


def _round(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def collect_rows(grid: Grid) -> tuple[list[list[Any]], list[RunStatus]]:
    """One row per cell of every finished run, and the status of the runs left out."""
    rows: list[list[Any]] = []
    left_out = []
    for run, status in zip(grid.runs, grid_status(grid.runs, strict=False), strict=True):
        if status.state != "done":
            left_out.append(status)
            continue
        summary = json.loads((run.path / "summary.json").read_text())
        track = (run.config.track or {}).get("name", "")
        for cell_name, cell in summary["cells"].items():
            rows.append(
                [
                    run.name,
                    track,
                    summary["dataset"],
                    summary["model"],
                    cell["attack"],
                    cell["defense"],
                    cell["batch_size"],
                    cell["trials"],
                    cell["failed"],
                    _round(cell["psnr"]["median"]),
                    _round(cell["psnr"]["mean"]),
                    _round(cell["psnr"]["worst"]),
                    _round(cell["ssim"]["median"], 3),
                    _round(cell["success_rate"], 2),
                    _round(cell["label_accuracy"], 2),
                    _round(cell["time_s"]["median"], 3),
                    cell_name,
                    str(run.path),
                ]
            )
    return rows, left_out


def render_collected(
    grid: Grid, rows: list[list[Any]], left_out: list[RunStatus]
) -> dict[str, str]:
    """The collected table as {"csv": ..., "md": ...}."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLLECT_COLUMNS)
    writer.writerows(rows)
    shown = COLLECT_COLUMNS[:-1]  # the Markdown table leaves out the long run_dir column
    lines = [
        f"# sweep {grid.name}",
        "",
        f"{len(grid.runs) - len(left_out)} of {len(grid.runs)} runs done; grid file `{grid.path}`.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(str(c) for c in row[: len(shown)]) + " |" for row in rows]
    if left_out:
        lines += ["", "Not in the table:", ""]
        lines += [f"- {s.name}: {s.state} {s.note}".rstrip() for s in left_out]
    return {"csv": buffer.getvalue(), "md": "\n".join(lines) + "\n"}


def write_entries(
    rows: list[list[Any]],
    entries_dir: Path,
    tracks_dir: Path,
    echo: Callable[[str], None],
    replace: bool = False,
) -> int:
    """Leaderboard entries for every cell of the track runs (what ``leakbench submit`` writes);
    a cell the leaderboard refuses (e.g. a smoke run with fewer trials than its track) is
    reported, not written. Returns the number written."""
    from leakbench.leaderboard import write_entry

    written = 0
    track_column, cell_column = COLLECT_COLUMNS.index("track"), COLLECT_COLUMNS.index("cell")
    for row in rows:
        if not row[track_column]:
            continue
        run_dir, cell = row[-1], row[cell_column]
        try:
            path = write_entry(run_dir, cell, entries_dir, replace=replace, tracks_dir=tracks_dir)
        except ValueError as exc:  # the leaderboard's refusals are ValueErrors with a reason
            echo(f"no entry for {Path(run_dir).name} {cell}: {exc}")
            continue
        echo(f"wrote {path}")
        written += 1
    return written
