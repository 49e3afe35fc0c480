"""The results folder of a run, shared by every process (rank) of the run.

    <run>/config.yaml          the resolved configuration
    <run>/trials.jsonl         one JSON record per trial (``trials-rank<k>.jsonl`` on rank k > 0)
    <run>/summary.json         aggregates per cell
    <run>/figures/<cell>.png   ground truth above matched reconstructions, with their scores
    <run>/report.html          the run as one page (``leakbench report``)

Whole files are written atomically (temporary file + rename). Trial records are appended, one
line each, flushed and synced, so appending never rewrites the file. A process killed mid-write
leaves at most a truncated last line: :meth:`RunDirectory.repair` reports it and cuts it off, so
that the trial runs again on resume instead of being merged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file for its owner only; a results folder shared with a group
        # (a cluster's) must get the permissions the user's umask gives any new file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def cell_key(attack: str, defense: str, batch_size: int) -> str:
    return f"{attack}__{defense}__b{batch_size}"


class DamagedRecordsError(ValueError):
    """A records file holds a line that is not a record, other than a truncated last one."""


def records_file(rank: int) -> str:
    return "trials.jsonl" if rank == 0 else f"trials-rank{rank}.jsonl"


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any] | None:
        path = self.path / "config.yaml"
        return yaml.safe_load(path.read_text()) if path.is_file() else None

    def append_trial(self, record: dict[str, Any], rank: int = 0) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.path / records_file(rank), "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def repair(self) -> list[str]:
        """Cut off truncated last records (a process killed mid-write); say what was cut."""
        notes = []
        for path in sorted(self.path.glob("trials*.jsonl")):
            data = path.read_bytes()
            if not data or data.endswith(b"\n"):
                continue
            keep = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(keep)
            notes.append(
                f"{path.name}: its last record was cut short ({len(data) - keep} bytes, "
                "a process stopped mid-write); dropped, its trial runs again"
            )
        return notes

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete trial record of the run, from every rank's file, each trial once."""
        seen: set[tuple[str, int]] = set()
        for path in sorted(self.path.glob("trials*.jsonl")):
            lines = path.read_text(encoding="utf-8").split("\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # truncated last line: never merged
                        continue
                    raise DamagedRecordsError(
                        f"{path}: line {number} is not a trial record; repair or remove it"
                    ) from None
                key = (record["cell"], record["trial"])
                if key not in seen:
                    seen.add(key)
                    yield record

    def completed(self) -> set[tuple[str, int]]:
        return {(r["cell"], r["trial"]) for r in self.records()}

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def figure_path(self, cell: str) -> Path:
        """Where the cell's figure (:func:`leakbench.figures.cell_figure`) lies."""
        return self.path / "figures" / f"{cell}.png"

    def write_figure(self, cell: str, png: bytes) -> Path:
        path = self.figure_path(cell)
        atomic_write_bytes(path, png)
        return path
