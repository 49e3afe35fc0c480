"""The evaluation loop: one trial per test batch, run by ``Trainer.test(inference_mode=False)``.

A trial: the client takes its private batch, applies the defense, computes the FedSGD update;
the server's attack gets an Observation and returns a Reconstruction; the evaluator (the only
holder of the ground truth) scores it, records covariates, and writes the trial record.
An exception inside the attack makes the trial ``failed`` with its error text; the run goes on.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from leakbench.client import fedsgd_update
from leakbench.interfaces import Attack, Defense
from leakbench.metrics import score_trial, to_pixels
from leakbench.registry import COVARIATES
from leakbench.results import RunDirectory
from leakbench.threat_model import Budget, Capability, Reconstruction, make_observation

# An attack that ignores its meter and overruns the time budget by more than this fails.
TIME_BUDGET_GRACE = 1.10


@dataclass(frozen=True)
class TrialSetting:
    """What is fixed for every trial of one cell."""

    cell: str
    attack_name: str
    defense_name: str
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    granted: frozenset[Capability]
    budget: Budget
    dtype: torch.dtype
    client_mode: str
    seed: int
    success_psnr: float
    covariates: tuple[str, ...] = ()
    with_lpips: bool = False


def trial_seed(base_seed: int, trial: int) -> int:
    return int(np.random.SeedSequence([base_seed, trial]).generate_state(1)[0])


class Evaluator(LightningModule):
    def __init__(
        self,
        victim: nn.Module,
        attack: Attack,
        defense: Defense,
        setting: TrialSetting,
        run_dir: RunDirectory | None = None,  # None: trials run in-process by a study
        skip: set[tuple[str, int]] | None = None,
        gallery_size: int = 4,
    ) -> None:
        super().__init__()
        self.victim = victim
        self.attack = attack
        self.defense = defense
        self.setting = setting
        self.run_dir = run_dir
        self.skip = skip or set()
        self.gallery_size = gallery_size
        self.gallery: list[tuple[Tensor, Tensor]] = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        trial = int(batch["trial"])
        if (self.setting.cell, trial) in self.skip:
            return
        with torch.enable_grad():
            record, pairs = self.run_trial(batch)
        if self.run_dir is not None:
            self.run_dir.append_trial(record)
        if len(self.gallery) < self.gallery_size:
            self.gallery.extend(pairs[: self.gallery_size - len(self.gallery)])
        self._log(record, pairs)

    def run_trial(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]:
        """Run one trial; returns its record and (ground truth, matched reconstruction) pixels."""
        s = self.setting
        trial = int(batch["trial"])
        seed = trial_seed(s.seed, trial)
        images = batch["images"].to(s.dtype)
        labels = batch["labels"]
        generator = torch.Generator(device=images.device).manual_seed(seed)

        model = copy.deepcopy(self.victim).train(s.client_mode == "train")
        # The model transform comes first: batch transforms may depend on the model the client
        # trains (input-side exclusivity reduction does).
        model = self.defense.transform_model(model)
        client_images, client_labels = self.defense.transform_batch(images, labels, generator)
        client_state = None
        if Capability.CLIENT_CODE in self.attack.requires:
            client_images, client_state = self.attack.client_hook(model, client_images)
        update = fedsgd_update(model, client_images, client_labels)
        update = self.defense.transform_update(update, generator)

        observation = make_observation(
            model,
            update,
            granted=s.granted,
            labels=client_labels,
            input_shape=s.input_shape,
            num_classes=s.num_classes,
            mean=s.mean,
            std=s.std,
            budget=s.budget,
            seed=seed,
            client_state=client_state,
        )
        reconstruction, error = self._attack(observation)
        usage = observation.budget.usage()
        if error is None and s.budget.max_seconds is not None:
            if usage["seconds"] > TIME_BUDGET_GRACE * s.budget.max_seconds:
                error = (
                    f"exceeded the time budget: {usage['seconds']:.1f} s used, "
                    f"{s.budget.max_seconds} s allowed"
                )
        ok = error is None and reconstruction is not None
        scores = score_trial(
            truth_images=images,
            truth_labels=labels,
            sample_ids=batch["sample_ids"],
            mean=s.mean,
            std=s.std,
            reconstructed_images=reconstruction.images if ok else None,
            reconstructed_labels=reconstruction.labels if ok else None,
            inferred_batch_size=reconstruction.batch_size if ok else None,
            success_psnr=s.success_psnr,
            with_lpips=s.with_lpips,
        )
        matched = scores.pop("matched_pixels")
        truth = to_pixels(images, s.mean, s.std)
        record = {
            "cell": s.cell,
            "attack": s.attack_name,
            "defense": s.defense_name,
            "batch_size": s.batch_size,
            "trial": trial,
            "seed": seed,
            "sample_ids": list(batch["sample_ids"]),
            "client": int(batch.get("client", 0)),
            "labels": labels.tolist(),
            "status": "ok" if ok else "failed",
            "error": error,
            "time_s": usage["seconds"],
            "budget": {"limits": s.budget.to_dict(), "used": usage},
            "inferred_batch_size": reconstruction.batch_size if ok else None,
            "inferred_labels": (
                reconstruction.labels.tolist() if ok and reconstruction.labels is not None else None
            ),
            "attack_info": reconstruction.info if ok else {},
            "metrics": scores,
            # Analyses of what produced the update: the client's model and (defended) batch.
            "covariates": self._covariates(model, client_images.detach(), client_labels),
        }
        return record, list(zip(truth, matched, strict=True))

    def _attack(self, observation: Any) -> tuple[Reconstruction | None, str | None]:
        if not all(torch.isfinite(g).all() for g in observation.update.values()):
            bad = [n for n, g in observation.update.items() if not torch.isfinite(g).all()]
            return None, f"the shared update contains NaN or inf (in {', '.join(bad)})"
        try:
            reconstruction = self.attack.reconstruct(observation)
        except Exception as exc:  # a failing attack fails its trial, never the run
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
            return None, f"{type(exc).__name__}: {exc} ({where})"
        expected = tuple(self.setting.input_shape)
        images = reconstruction.images
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            return (
                None,
                f"reconstruction has shape {tuple(images.shape)}, expected (N, *{expected})",
            )
        if not torch.isfinite(images).all():
            return None, "reconstruction contains NaN or inf"
        return reconstruction, None

    def _covariates(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Any]:
        covariates: dict[str, Any] = {}
        for name in self.setting.covariates:
            covariate = COVARIATES.get(name)
            try:
                value = covariate(copy.deepcopy(model), images, labels)
            except Exception as exc:  # a covariate must never cost the trial
                value = {"error": f"{type(exc).__name__}: {exc}"}
            if value is not None:
                covariates[name] = value
        return covariates

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
