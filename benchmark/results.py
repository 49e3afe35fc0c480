"""The results folder of a run, shared by every process (rank) of the run.

    <run>/config.yaml          the resolved configuration
    <run>/trials.jsonl         one JSON record per trial (``trials-rank<k>.jsonl`` on rank k > 0)
    <run>/summary.json         aggregates per cell
    <run>/figures/<cell>.png   ground truth above matched reconstructions, with their scores
    <run>/report.html          the run as one page (``leakbench report``)

Whole files are written atomically (temporary file + rename). Trial records are appended, one
line each, flushed and synced, so appending never rewrites the file. A process killed mid-write
leaves at most a truncated last line: :meth:`RunDirectory.repair` reports it and cuts it off, so
that the trial runs again on resume instead of being merged. Any other line that is not a trial
record (binary data, JSON of another shape) is refused, naming the file and line, and left as it
is.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# libyaml's parser where PyYAML was built with it: the same safe constructor, about ten times
# faster on the board's track files, which every leaderboard command reads.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, through libyaml where it is available (trusted files the
    board reads many of; user config files go through :func:`leakbench.config.read_yaml`, whose
    errors name file and line)."""
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader


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


def _cut_short(line: bytes) -> bool:
    """Whether ``line`` can be the start of a record whose writing stopped part-way: records
    are ASCII JSON objects (``json.dumps`` of a mapping begins with ``{"``)."""
    return line.startswith(b'{"') and line.isascii()


def _parsed_record(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """The trial record of one line, or None and what the line is instead."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    cell, trial = value.get("cell"), value.get("trial")
    if not isinstance(cell, str) or isinstance(trial, bool) or not isinstance(trial, int):
        return None, "a JSON object without a text 'cell' and an integer 'trial'"
    return value, ""


def records_file(rank: int) -> str:
    return "trials.jsonl" if rank == 0 else f"trials-rank{rank}.jsonl"


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any] | None:
        """The saved configuration, None without one; a file that is not a YAML mapping is
        refused in one line naming it."""
        from leakbench.config import read_yaml

        path = self.path / "config.yaml"
        return read_yaml(path) if path.is_file() else None

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
            keep = data.rfind(b"\n") + 1
            if not data or data.endswith(b"\n") or not _cut_short(data[keep:]):
                continue  # a last line that is no record's start is refused by records()
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
            lines = path.read_bytes().split(b"\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record, what = _parsed_record(line)
                if record is None:
                    if number == len(lines) and _cut_short(line):  # truncated: never merged
                        continue
                    raise DamagedRecordsError(
                        f"{path}: line {number} is {what}, expected a trial record (one JSON "
                        "object per line, as leakbench writes them); repair or remove it"
                    )
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
