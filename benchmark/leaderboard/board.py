"""The board: every intact entry of every track, ranked by what the board measured.

Entries are loaded through :func:`leakbench.leaderboard.entry.load_entry`, so a tampered one,
or one whose verification the board did not sign, stops the build with its reason instead of
being shown. Within a track, each batch size is its own table with three parts:

* **ranked**: entries whose signed verification passed, ordered by the verification's own
  figure of the track's statistic (capped at the track's ceiling), never by the submitter's
  claim; then by the verified success rate, then by the verified worst case. Entries equal on
  all three share a rank (a tie at the ceiling is a tie), shown as ``=1``;
* **unverified**: listed apart, by name, with their claims and no rank;
* **failed**: verification did not confirm the claim; listed with both figures, no rank.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakbench.leaderboard.entry import TRACKS, load_entry
from leakbench.leaderboard.verify import higher_ranks_first
from leakbench.results import parse_yaml

COLUMNS = (
    "rank",
    "name",
    "attack",
    "threat model",
    "defense",
    "B",
    "verified statistic",
    "verified success",
    "verified worst",
    "claimed statistic",
    "PSNR median",
    "PSNR worst",
    "SSIM median",
    "success",
    "failed",
    "time median (s)",
    "status",
)
STATUSES = ("verified", "unverified", "failed")


@dataclass
class Row:
    entry: dict[str, Any]
    path: Path
    rank: int | None = None  # None: not ranked (unverified, or verification failed)
    tied: bool = False  # shares its rank with another entry

    @property
    def status(self) -> str:
        block = self.entry.get("verification")
        if block is None:
            return "unverified"
        return "verified" if block["passed"] else "failed"

    @property
    def rank_text(self) -> str:
        if self.rank is None:
            return "-"
        return f"={self.rank}" if self.tied else str(self.rank)

    @property
    def verified(self) -> dict[str, Any] | None:
        return self.entry.get("verification")


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
    def ceiling(self) -> float | None:
        return (self.meta.get("verification") or {}).get("tolerance", {}).get("ceiling")

    @property
    def rows(self) -> list[Row]:
        return [row for b in sorted(self.tables) for row in self.tables[b]]

    def counts(self, rows: list[Row] | None = None) -> dict[str, int]:
        rows = self.rows if rows is None else rows
        return {status: sum(r.status == status for r in rows) for status in STATUSES}


def attack_letter(entry: dict[str, Any]) -> str | None:
    """The SoK letter of the threat model the entry's attack assumed (None: an entry made
    before leakbench recorded letters)."""
    return (entry.get("threat_model") or {}).get("attack")


def track_letter_words(meta: dict[str, Any]) -> str:
    """The track's SoK threat model and the letters it admits, in a sentence ('' if none)."""
    letter = meta.get("threat_model")
    if letter is None:
        return ""
    from leakbench.capabilities import admitted_letters, threat_model_of

    return (
        f"SoK threat model {threat_model_of(letter).describe()} (Carletti et al., USENIX "
        f"Security 2025): it admits attacks of threat models {', '.join(admitted_letters(letter))}."
    )


def metric(entry: dict[str, Any], dotted: str) -> float | None:
    value: Any = entry["results"]
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def rank_rows(rows: list[Row], ranking: str, kind: str) -> list[Row]:
    """Verified rows ranked by their verified figures (ties share a rank), then unverified
    rows by name, then failed ones by name; only the first get a rank."""
    sign = -1.0 if higher_ranks_first(kind, ranking) else 1.0

    def key(row: Row) -> tuple[float, float, float]:
        block = row.verified or {}
        return tuple(
            sign * float(block.get(k) or 0.0) for k in ("verified", "success_rate", "worst")
        )

    verified = sorted(
        (r for r in rows if r.status == "verified"), key=lambda r: (key(r), r.entry["name"])
    )
    for row in verified:
        same = [other for other in verified if key(other) == key(row)]
        row.rank, row.tied = verified.index(same[0]) + 1, len(same) > 1
    rest = {
        status: sorted((r for r in rows if r.status == status), key=lambda r: r.entry["name"])
        for status in ("unverified", "failed")
    }
    for row in rest["unverified"] + rest["failed"]:
        row.rank, row.tied = None, False
    return verified + rest["unverified"] + rest["failed"]


def load_board(
    entries_dir: Path, tracks_dir: Path = TRACKS, keys_dir: Path | None = None
) -> list[TrackBoard]:
    """Every track (those without entries too) with its ranked tables, in name order."""
    boards = {
        path.stem: TrackBoard(path.stem, parse_yaml(path.read_text()))
        for path in sorted(Path(tracks_dir).glob("*.yaml"))
    }
    for path in sorted(Path(entries_dir).glob("*/*.json")):
        entry = load_entry(path, tracks_dir, keys_dir)  # refuses unknown tracks, tampered entries
        b = entry["protocol"]["batch_size"]
        boards[entry["track"]].tables.setdefault(b, []).append(Row(entry, path))
    for board in boards.values():
        for b, rows in board.tables.items():
            board.tables[b] = rank_rows(rows, board.ranking, board.meta["kind"])
    return list(boards.values())


def _round(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verification_text(row: Row) -> str:
    """The entry's status in plain words."""
    block = row.verified
    if block is None:
        return "unverified: the board has not re-measured this claim"
    if not block["passed"]:
        return (
            f"failed verification: measured {block['verified']:.1f} on {block['trials']} unseen "
            f"trials against a claim of {block['claimed']:.1f}"
        )
    return f"verified: {block['verified']:.1f} on {block['trials']} unseen trials, signed"


def table_row(row: Row, board: TrackBoard) -> list[Any]:
    e, r, block = row.entry, row.entry["results"], row.verified or {}
    return [
        row.rank_text,
        e["name"],
        e["attack"]["name"],
        attack_letter(e) or "-",
        e["defense"]["name"],
        e["protocol"]["batch_size"],
        _round(block.get("verified")),
        _round(block.get("success_rate"), 2),
        _round(block.get("worst")),
        _round(metric(e, board.ranking)),
        _round(r["psnr"]["median"]),
        _round(r["psnr"]["worst"]),
        _round(r["ssim"]["median"], 3),
        _round(r["success_rate"], 2),
        f"{r['failed']}/{r['trials']}",
        _round(r["time_s"]["median"], 3),
        row.status,
    ]


def render(
    entries_dir: Path, tracks_dir: Path = TRACKS, keys_dir: Path | None = None
) -> dict[str, str]:
    """Markdown and CSV text per track with entries: {"<track>.md": ..., "<track>.csv": ...}."""
    tables: dict[str, str] = {}
    for board in load_board(entries_dir, tracks_dir, keys_dir):
        if not board.tables:
            continue
        rows = [table_row(row, board) for row in board.rows]
        description = " ".join(board.meta.get("description", "").split())
        counts = board.counts()
        ceiling = "" if board.ceiling is None else f", capped at {board.ceiling:g}"
        letter = track_letter_words(board.meta)
        title = (
            f"# {board.name}\n\n{description}\n\n{letter + ' ' if letter else ''}Ranked within "
            f"each batch size by the verification's own {board.ranking}{ceiling} (ties share a "
            "rank, shown =N; then by verified success rate and worst case). Unverified and failed "
            f"entries are listed apart, unranked. {counts['verified']} verified, "
            f"{counts['unverified']} unverified, {counts['failed']} failed. Claimed columns are "
            "the submitter's run on the public trials; the threat model column is the SoK letter "
            "the entry's attack assumes.\n\n"
        )
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        tables[f"{board.name}.md"] = title + "\n".join(lines) + "\n"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        tables[f"{board.name}.csv"] = buffer.getvalue()
    return tables
