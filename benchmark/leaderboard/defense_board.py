"""The defense board: every intact defense entry of every defense track, for the site.

Entries are loaded through :func:`leakbench.leaderboard.defense_entry.load_defense_entry`, so a
tampered one, or one whose verification the board did not sign, stops the build with its
reason. Per track, the rows are the settings: verified ones first, ordered by the verified
per-sample worst case (least leakage first), then unverified ones by their claim, then the
ones that failed verification. Each row's privacy figure is the verification's where there is
one, else the claim; the scatter plots it against the setting's accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leakbench.leaderboard.board import STATUSES
from leakbench.leaderboard.defense_entry import DEFENSE_TRACKS, load_defense_entry

# The scatter's drawing area, in SVG user units.
WIDTH, HEIGHT, MARGIN = 640, 360, 48
STATUS_ORDER = {status: i for i, status in enumerate(STATUSES)}


@dataclass
class DefenseRow:
    entry: dict[str, Any]
    path: Path

    @property
    def status(self) -> str:
        block = self.entry.get("verification")
        if block is None:
            return "unverified"
        return "verified" if block["passed"] else "failed"

    @property
    def privacy(self) -> float | None:
        """The per-sample worst case's median PSNR: verified where verified, else claimed."""
        block = self.entry.get("verification")
        if block is not None:
            return float(block["verified"])
        return self.entry["privacy"]["per_sample"]["psnr_max_median"]

    @property
    def accuracy(self) -> float | None:
        return self.entry["utility"]["accuracy"]

    @property
    def worst_attack(self) -> dict[str, Any]:
        """The strongest attack by median PSNR, its budget and whether it adapts to the defense."""
        privacy = self.entry["privacy"]
        name = privacy["worst_attack"]
        attack = self.entry["attacks"].get(name or "", {})
        return {
            "name": name,
            "psnr_median": privacy["worst_attack_psnr_median"],
            "adaptive": bool(privacy["worst_attack_adaptive"]),
            "budget": attack.get("budget", "-"),
        }

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Per attack with failed trials: how many, of how many, and why."""
        return [
            {
                "attack": name,
                "failed": a["failed"],
                "trials": a["trials"],
                "reasons": a["failure_reasons"],
            }
            for name, a in sorted(self.entry["privacy"]["attacks"].items())
            if a["failed"]
        ]


@dataclass
class DefenseTrackBoard:
    name: str
    config: dict[str, Any]
    rows: list[DefenseRow] = field(default_factory=list)

    @property
    def meta(self) -> dict[str, Any]:
        return self.config["track"]

    @property
    def undefended_accuracy(self) -> float | None:
        """The accuracy of the track's undefended setting, where it has an entry."""
        for row in self.rows:
            setting = row.entry["setting"]
            if setting["defense"] == "none" and not setting["client_protocol"]:
                return row.accuracy
        return None

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.rows) for status in STATUSES}


def load_defense_board(
    entries_dir: Path, tracks_dir: Path = DEFENSE_TRACKS, keys_dir: Path | None = None
) -> list[DefenseTrackBoard]:
    """Every defense track (those without entries too) with its ordered rows, in name order."""
    boards = {
        path.stem: DefenseTrackBoard(path.stem, yaml.safe_load(path.read_text()))
        for path in sorted(Path(tracks_dir).glob("*.yaml"))
    }
    for path in sorted(Path(entries_dir).glob("*/*.json")):
        entry = load_defense_entry(path, tracks_dir, keys_dir)
        boards[entry["track"]].rows.append(DefenseRow(entry, path))
    for board in boards.values():
        board.rows.sort(
            key=lambda r: (
                STATUS_ORDER[r.status],
                math.inf if r.privacy is None else r.privacy,
                r.entry["name"],
            )
        )
    return list(boards.values())


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def scatter(board: DefenseTrackBoard, ceiling: float = 60.0) -> dict[str, Any]:
    """The privacy–utility scatter's geometry: one point per setting with both figures (x:
    accuracy, y: the per-sample worst case's median PSNR capped at ``ceiling``, lower is more
    private), axes and ticks; the template draws it as inline SVG."""
    plotted = [r for r in board.rows if r.privacy is not None and r.accuracy is not None]
    x_low = min([0.0, *(r.accuracy for r in plotted)])
    y_high = max([ceiling, *(min(r.privacy, ceiling) for r in plotted)])

    def x(value: float) -> float:
        return round(MARGIN + (value - x_low) / (1.0 - x_low) * (WIDTH - 2 * MARGIN), 2)

    def y(value: float) -> float:
        return round(HEIGHT - MARGIN - min(value, ceiling) / y_high * (HEIGHT - 2 * MARGIN), 2)

    points = [
        {
            "x": x(row.accuracy),
            "y": y(row.privacy),
            "label": row.entry["name"],
            "status": row.status,
            "adaptive": row.worst_attack["adaptive"],
            "title": (
                f"{row.entry['name']}: accuracy {row.accuracy:.3f}, per-sample worst case "
                f"{row.privacy:.1f} dB ({row.status}); worst attack {row.worst_attack['name']}"
            ),
        }
        for row in plotted
    ]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "margin": MARGIN,
        "points": points,
        "x_ticks": [{"at": x(v), "label": f"{v:.2f}"} for v in _ticks(x_low, 1.0)],
        "y_ticks": [{"at": y(v), "label": f"{v:.0f}"} for v in _ticks(0.0, y_high)],
        "ceiling": ceiling,
        "undefended_x": (
            None if board.undefended_accuracy is None else x(board.undefended_accuracy)
        ),
    }
