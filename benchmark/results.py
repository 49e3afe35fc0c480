"""The results folder of a run. Every file is written atomically (temporary file + rename), so a
crash never leaves a half-written record and a resumed run skips what is already there.

    <run>/config.yaml          the resolved configuration
    <run>/trials.jsonl         one JSON record per trial (``trials-rank<k>.jsonl`` on rank k > 0)
    <run>/summary.json         aggregates per cell
    <run>/grid-<cell>.png      ground truth (odd columns) next to matched reconstructions
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


class RunDirectory:
    def __init__(self, path: str | Path, rank: int = 0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        name = "trials.jsonl" if rank == 0 else f"trials-rank{rank}.jsonl"
        self.trials_path = self.path / name
        self._lines = self.trials_path.read_text().splitlines() if self.trials_path.exists() else []

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def append_trial(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record, allow_nan=False))
        atomic_write_text(self.trials_path, "\n".join(self._lines) + "\n")

    def records(self) -> Iterator[dict[str, Any]]:
        """All trial records of the run, from every rank's file."""
        for path in sorted(self.path.glob("trials*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)

    def completed(self) -> set[tuple[str, int]]:
        return {(r["cell"], r["trial"]) for r in self.records()}

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def write_grid(self, cell: str, pairs: list[tuple[Tensor, Tensor]]) -> Path:
        """Save ground-truth / reconstruction pixel pairs (C, H, W in [0, 1]) as one PNG."""
        tiles = [t for pair in pairs for t in pair]
        grid = make_grid(
            [t.float() for t in tiles], nrow=min(len(tiles), 8), padding=1, pad_value=1.0
        )
        array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        path = self.path / f"grid-{cell}.png"
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        with tempfile.SpooledTemporaryFile() as buffer:
            image.save(buffer, format="PNG")
            buffer.seek(0)
            atomic_write_bytes(path, buffer.read())
        return path
