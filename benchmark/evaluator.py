"""The Lightning adapter of the trial protocol: ``Trainer.test(inference_mode=False)`` drives
which trials run on which process; :func:`leakbench.protocol.run_trial` says what a trial is.

One test item is one trial. The evaluator runs it, appends its record to this rank's records
file, keeps the first samples (pixels and scores) for the cell's figure, advances the progress
bar and logs the trial's scalars to the file loggers (CSV). W&B gets the run once, at its end
(:func:`log_run_to_wandb`): per-trial W&B logging left the run summary holding the last trial's
values instead of the cell aggregates. It holds no part of the protocol itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from leakbench.figures import MAX_TILES, Tile, tiles_of
from leakbench.interfaces import Defense
from leakbench.progress import Progress
from leakbench.protocol import PreparedAttack, TrialSetting, Victim, run_trial
from leakbench.results import RunDirectory

# One row per ground-truth sample in the W&B table of a cell.
SAMPLE_COLUMNS = (
    "sample_id",
    "matched_reconstruction",
    "mse",
    "psnr",
    "ssim",
    "psnr_scale_aligned",
    "label_correct",
    "success",
)
RECORD_FILES = ("trials*.jsonl", "summary.json", "config.yaml")


class Evaluator(LightningModule):
    def __init__(
        self,
        victim: Victim,
        attack: PreparedAttack,
        defense: Defense,
        setting: TrialSetting,
        run_dir: RunDirectory,
        gallery_size: int = MAX_TILES,
        progress: Progress | None = None,
        collect: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.collect = collect
        self.victim = victim
        self.attack = attack
        self.defense = defense
        self.setting = setting
        self.run_dir = run_dir
        self.gallery_size = gallery_size
        self.gallery: list[Tile] = []
        self.progress = progress

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        trial = f"{self.setting.cell} trial {int(batch['trial'])}"
        if self.progress is not None:
            self.progress.now(trial)
        with torch.enable_grad():
            outcome = run_trial(self.victim, self.attack, self.defense, self.setting, batch)
        self.run_dir.append_trial(outcome.record, self.global_rank)
        if self.collect is not None:
            self.collect.append(outcome.record)
        if len(self.gallery) < self.gallery_size:
            limit = self.gallery_size - len(self.gallery)
            self.gallery.extend(tiles_of(outcome.record, outcome.pairs, limit))
        self._log(outcome.record)
        if self.progress is not None:
            self.progress.step(trial)

    def _log(self, record: dict[str, Any]) -> None:
        samples = record["metrics"]["samples"]
        cell = record["cell"]
        scalars = {
            f"{cell}/psnr_median": float(np.median([r["psnr"] for r in samples])),
            f"{cell}/ssim_mean": float(np.mean([r["ssim"] for r in samples])),
            f"{cell}/success_rate": record["metrics"]["success_rate"],
            f"{cell}/failed": float(record["status"] != "ok"),
            f"{cell}/time_s": record["time_s"],
        }
        for logger in self.loggers:
            if not isinstance(logger, WandbLogger):  # W&B: once, at the end of the run
                logger.log_metrics(scalars, step=record["trial"])


def figure_pixels(path: Path) -> np.ndarray:
    """A PNG figure as uint8 (H, W, 3), the array W&B is handed (RGBA figures lose alpha)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def artifact_name(run_name: str) -> str:
    """The run's records artifact; W&B names allow letters, digits, '-', '_' and '.'."""
    return "run-records-" + re.sub(r"[^A-Za-z0-9._-]", "-", run_name)


def log_run_to_wandb(
    logger: WandbLogger, run_dir: RunDirectory, summary: dict[str, Any], cells: list[str]
) -> None:
    """Log a finished run to W&B, once: the summary aggregates (the numbers of
    ``summary.json``), one table per cell with every trial's samples, each cell's figure, and
    the records, summary and configuration as one versioned artifact of type "run-records";
    then finishes the W&B run."""
    import wandb

    run = logger.experiment
    run.summary.update(summary)
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(run_dir.records(), key=lambda r: (r["cell"], r["trial"])):
        by_cell.setdefault(record["cell"], []).append(record)
    logged: dict[str, Any] = {}
    for cell, records in by_cell.items():
        rows = [
            [r["trial"], r["status"], *[s.get(c) for c in SAMPLE_COLUMNS]]
            for r in records
            for s in r["metrics"]["samples"]
        ]
        logged[f"{cell}/samples"] = wandb.Table(
            columns=["trial", "status", *SAMPLE_COLUMNS], data=rows
        )
    for cell in cells:
        path = run_dir.figure_path(cell)
        if path.is_file():
            caption = "ground truth (top) and matched reconstruction (bottom), with PSNR/SSIM"
            logged[f"{cell}/figure"] = wandb.Image(figure_pixels(path), caption=caption)
    run.log(logged)
    artifact = wandb.Artifact(
        artifact_name(run_dir.path.name),
        type="run-records",
        description="trial records, summary.json and config.yaml of a leakbench run",
    )
    for pattern in RECORD_FILES:
        for path in sorted(run_dir.path.glob(pattern)):
            artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)
    # Lightning's finalize leaves the run open until the process exits; a second leakbench run
    # in the same process (a sweep, a study) would otherwise log into this one.
    run.finish()
