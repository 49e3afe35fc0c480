"""The Lightning adapter of the trial protocol: ``Trainer.test(inference_mode=False)`` drives
which trials run on which process; :func:`leakbench.protocol.run_trial` says what a trial is.

One test item is one trial. The evaluator runs it, appends its record to this rank's records
file, keeps a few (truth, reconstruction) pairs for the cell's grid, and logs through Lightning's
loggers. It holds no part of the protocol itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from leakbench.interfaces import Defense
from leakbench.protocol import PreparedAttack, TrialSetting, Victim, run_trial
from leakbench.results import RunDirectory


class Evaluator(LightningModule):
    def __init__(
        self,
        victim: Victim,
        attack: PreparedAttack,
        defense: Defense,
        setting: TrialSetting,
        run_dir: RunDirectory,
        gallery_size: int = 4,
    ) -> None:
        super().__init__()
        self.victim = victim
        self.attack = attack
        self.defense = defense
        self.setting = setting
        self.run_dir = run_dir
        self.gallery_size = gallery_size
        self.gallery: list[tuple[Tensor, Tensor]] = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.enable_grad():
            outcome = run_trial(self.victim, self.attack, self.defense, self.setting, batch)
        self.run_dir.append_trial(outcome.record, self.global_rank)
        if len(self.gallery) < self.gallery_size:
            self.gallery.extend(outcome.pairs[: self.gallery_size - len(self.gallery)])
        self._log(outcome.record, outcome.pairs)

    def _log(self, record: dict[str, Any], pairs: list[tuple[Tensor, Tensor]]) -> None:
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
            logger.log_metrics(scalars, step=record["trial"])
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, record, pairs)

    @staticmethod
    def _log_wandb(
        logger: WandbLogger, record: dict[str, Any], pairs: list[tuple[Tensor, Tensor]]
    ) -> None:
        cell = record["cell"]
        tiles = [t.float() for pair in pairs for t in pair]
        logger.log_image(
            f"{cell}/truth_vs_reconstruction",
            images=[torch.cat(tiles, dim=-1)],
            caption=[f"trial {record['trial']}: ground truth | reconstruction, per sample"],
        )
        columns = ["trial", "sample_id", "psnr", "ssim", "psnr_scale_aligned", "label_correct"]
        rows = [
            [record["trial"]] + [s[c] for c in columns[1:]] for s in record["metrics"]["samples"]
        ]
        logger.log_table(key=f"{cell}/samples", columns=columns, data=rows)
