"""The board: every intact entry of every track, ranked, and the tables made from it.

Entries are loaded through :func:`leakbench.leaderboard.entry.load_entry`, so a tampered one
stops the build with its reason instead of being shown. Within a track, each batch size is its
own table. Entries whose verification failed are listed as failed and get no rank: they are
never ranked silently. Unverified entries are ranked and marked as unverified.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leakbench.leaderboard.entry import TRACKS, load_entry
from leakbench.leaderboard.verify import higher_ranks_first

COLUMNS = (
    "rank",
    "name",
    "attack",
    "defense",
    "B",
    "PSNR median",
    "PSNR mean",
    "PSNR worst",
    "SSIM median",
    "success",
    "failed",
    "time median (s)",
    "verification",
)


@dataclass
class Row:
    entry: dict[str, Any]
    path: Path
    rank: int | None  # None: verification failed, never ranked

    @property
    def status(self) -> str:
        block = self.entry.get("verification")
        if block is None:
            return "unverified"
        return "verified" if block["passed"] else "failed"


@dataclass
class TrackBoard:
    name: str
    config: dict[str, Any]  # the track file: run configuration and track block
    tables: dict[int, list[Row]] = field(default_factory=dict)  # batch size -> rows

    @property
    def meta(self) -> dict[str, Any]:
        return self.config["track"]

    @property
    def ranking(self) -> str:
        return self.meta.get("ranking", "psnr.median")

    @property
    def rows(self) -> list[Row]:
        return [row for b in sorted(self.tables) for row in self.tables[b]]


def metric(entry: dict[str, Any], dotted: str) -> float | None:
    value: Any = entry["results"]
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def rank_rows(rows: list[Row], ranking: str, kind: str) -> list[Row]:
    """Ranked rows first (by ``ranking``, best first; ties by name), failed ones after."""
    sign = -1.0 if higher_ranks_first(kind, ranking) else 1.0

    def key(row: Row) -> tuple[float, str]:
        value = metric(row.entry, ranking)
        return (float("inf") if value is None else sign * value, row.entry["name"])

    ranked = sorted((r for r in rows if r.status != "failed"), key=key)
    failed = sorted((r for r in rows if r.status == "failed"), key=key)
    for position, row in enumerate(ranked, start=1):
        row.rank = position
    for row in failed:
        row.rank = None
    return ranked + failed


def load_board(entries_dir: Path, tracks_dir: Path = TRACKS) -> list[TrackBoard]:
    """Every track (those without entries too) with its ranked tables, in name order."""
    boards = {
        path.stem: TrackBoard(path.stem, yaml.safe_load(path.read_text()))
        for path in sorted(Path(tracks_dir).glob("*.yaml"))
    }
    for path in sorted(Path(entries_dir).glob("*/*.json")):
        entry = load_entry(path, tracks_dir)  # refuses unknown tracks and tampered entries
        b = entry["protocol"]["batch_size"]
        boards[entry["track"]].tables.setdefault(b, []).append(Row(entry, path, None))
    for board in boards.values():
        for b, rows in board.tables.items():
            board.tables[b] = rank_rows(rows, board.ranking, board.meta["kind"])
    return list(boards.values())


def _round(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verification_text(row: Row) -> str:
    block = row.entry.get("verification")
    if block is None:
        return "unverified"
    word = "verified" if block["passed"] else "FAILED"
    return f"{word}: {block['verified']:.1f} on {block['trials']} unseen"


def table_row(row: Row) -> list[Any]:
    e, r = row.entry, row.entry["results"]
    return [
        "-" if row.rank is None else row.rank,
        e["name"],
        e["attack"]["name"],
        e["defense"]["name"],
        e["protocol"]["batch_size"],
        _round(r["psnr"]["median"]),
        _round(r["psnr"]["mean"]),
        _round(r["psnr"]["worst"]),
        _round(r["ssim"]["median"], 3),
        _round(r["success_rate"], 2),
        f"{r['failed']}/{r['trials']}",
        _round(r["time_s"]["median"], 3),
        verification_text(row),
    ]


def render(entries_dir: Path, tracks_dir: Path = TRACKS) -> dict[str, str]:
    """Markdown and CSV text per track with entries: {"<track>.md": ..., "<track>.csv": ...}."""
    tables: dict[str, str] = {}
    for board in load_board(entries_dir, tracks_dir):
        if not board.tables:
            continue
        rows = [table_row(row) for row in board.rows]
        description = " ".join(board.meta.get("description", "").split())
        title = f"# {board.name}\n\n{description}\n\nRanked by {board.ranking}"
        title += " within each batch size; failed verifications are not ranked.\n\n"
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        tables[f"{board.name}.md"] = title + "\n".join(lines) + "\n"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        tables[f"{board.name}.csv"] = buffer.getvalue()
    return tables
