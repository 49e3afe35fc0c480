"""Runs a configured grid of cells (attack × batch size) with Lightning and writes the results.

Everything that can be refused is refused before the first trial: unknown names, options an
attack does not take, capabilities the threat model does not grant, victims an attack cannot
handle, batch sizes the split cannot supply.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

import leakbench
from leakbench.client import build_victim
from leakbench.config import ConfigError, RunConfig
from leakbench.evaluator import Evaluator, TrialSetting
from leakbench.interfaces import Attack, Defense
from leakbench.metrics import aggregate, lpips_status
from leakbench.registry import ATTACKS, COVARIATES, DATAMODULES, DEFENSES
from leakbench.results import RunDirectory, cell_key
from leakbench.threat_model import RequirementsNotGranted

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
# Lightning's hardware banner and product tips would bury the results table.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def instantiate(kind: str, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Call a registered factory, turning a bad keyword into a one-line error."""
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for {kind} {name!r}: {exc}") from None


def build_attack(name: str, options: dict[str, Any], config: RunConfig) -> Attack:
    attack: Attack = instantiate("attack", name, ATTACKS.get(name), options)
    missing = sorted(c.value for c in attack.requires - config.granted)
    if missing:
        raise RequirementsNotGranted(
            f"attack {name!r} requires {', '.join(missing)}, which this run does not grant "
            f"(grants: {', '.join(config.grants) or 'nothing'}); add them to 'grants'"
        )
    return attack


def build_datamodule(config: RunConfig, batch_size: int) -> Any:
    factory = DATAMODULES.get(config.dataset)
    options = dict(config.dataset_options)
    options.update(
        batch_size=batch_size, num_trials=config.trials, seed=config.seed, split=config.split
    )
    return instantiate("dataset", config.dataset, factory, options)


def make_loggers(config: RunConfig, run_dir: Path) -> list[Logger]:
    if config.logger == "none":
        return []
    # A fresh CSV version per invocation: resuming must not overwrite earlier logs.
    version = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="csv", version=version)]
    if config.logger == "wandb":
        # Offline unless the user configured W&B: an explicit WANDB_MODE or an API key.
        offline = os.environ.get("WANDB_MODE") is None and "WANDB_API_KEY" not in os.environ
        loggers.append(
            WandbLogger(
                project=config.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=offline,
                config=config.to_dict(),
            )
        )
    return loggers


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "leakbench": leakbench.__version__,
        "git_commit": commit or None,
        "torch": str(torch.__version__),
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def run(
    config: RunConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell of ``config``; returns the summary also written to ``summary.json``."""
    dtype = getattr(torch, config.dtype)
    defense: Defense = instantiate(
        "defense", config.defense, DEFENSES.get(config.defense), config.defense_options
    )
    attacks = {
        name: build_attack(name, config.attack_options.get(name, {}), config)
        for name in config.attacks
    }
    probe = build_datamodule(config, max(config.batch_sizes))
    for b in config.batch_sizes:
        probe.batch_size = b
        try:
            probe.trials()
        except ValueError as exc:
            raise ConfigError(f"{config.dataset} ({config.split} split): {exc}") from None
    victim = instantiate(
        "model",
        config.model,
        lambda **o: build_victim(
            config.model,
            probe.input_shape,
            probe.num_classes,
            seed=config.model_seed,
            dtype=dtype,
            **o,
        ),
        config.model_options,
    )
    for attack in attacks.values():
        attack.check_model(victim)
    covariates = tuple(COVARIATES.names() if config.covariates is None else config.covariates)
    for name in covariates:
        COVARIATES.get(name)  # an unknown name is refused before any trial

    if resume is not None:
        run_path = Path(resume)
        if not (run_path / "config.yaml").is_file():
            raise ConfigError(f"cannot resume {run_path}: it holds no config.yaml")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_path = Path(config.output_dir) / (config.run_name or stamp)
    run_dir = RunDirectory(run_path)
    with_lpips, lpips_reason = lpips_status()
    run_dir.write_config({**config.to_dict(), "environment": environment(), "lpips": lpips_reason})
    done = run_dir.completed()
    loggers = make_loggers(config, run_path)

    skipped: dict[str, str] = {}
    trainer: Trainer | None = None
    for batch_size in config.batch_sizes:
        datamodule = build_datamodule(config, batch_size)
        for name, attack in attacks.items():
            cell = cell_key(name, config.defense, batch_size)
            limit = attack.max_batch_size
            if limit is not None and batch_size > limit:
                skipped[cell] = f"{name} handles batches of at most {limit}"
                echo(f"skipping {cell}: {skipped[cell]}")
                continue
            setting = TrialSetting(
                cell=cell,
                attack_name=name,
                defense_name=config.defense,
                batch_size=batch_size,
                input_shape=tuple(datamodule.input_shape),
                num_classes=datamodule.num_classes,
                mean=tuple(datamodule.mean),
                std=tuple(datamodule.std),
                granted=config.granted,
                budget=config.trial_budget,
                dtype=dtype,
                client_mode=config.client_mode,
                seed=config.seed,
                success_psnr=config.success_psnr,
                covariates=covariates,
                with_lpips=with_lpips,
            )
            trainer = Trainer(
                accelerator=config.accelerator,
                devices=config.devices,
                logger=loggers or False,
                inference_mode=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
            )
            evaluator = Evaluator(
                victim, attack, defense, setting, RunDirectory(run_path, trainer.global_rank), done
            )
            trainer.test(evaluator, datamodule=datamodule, verbose=False)
            if evaluator.gallery and trainer.global_rank == 0:
                run_dir.write_grid(cell, evaluator.gallery)

    rank = 0
    if trainer is not None:
        trainer.strategy.barrier()  # every rank's records are on disk before summarising
        rank = trainer.global_rank
    summary = summarize(run_dir, config, skipped)
    if rank == 0:
        run_dir.write_summary(summary)
        echo(format_summary(summary))
        echo(f"results: {run_path}")
    for logger in loggers:
        logger.finalize("success")
    return summary


def summarize(run_dir: RunDirectory, config: RunConfig, skipped: dict[str, str]) -> dict[str, Any]:
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for record in run_dir.records():
        by_cell.setdefault(record["cell"], []).append(record)
    cells = {}
    for cell, records in by_cell.items():
        first = records[0]
        cells[cell] = {
            "attack": first["attack"],
            "defense": first["defense"],
            "batch_size": first["batch_size"],
            **aggregate(records),
        }
    return {
        "dataset": config.dataset,
        "model": config.model,
        "success_psnr": config.success_psnr,
        "cells": cells,
        "skipped": skipped,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    cells = list(summary["cells"].values())
    wa = max([len("attack")] + [len(c["attack"]) for c in cells]) + 2
    wd = max([len("defense")] + [len(c["defense"]) for c in cells]) + 2
    header = (
        f"{'attack':<{wa}}{'defense':<{wd}}{'B':>3}{'trials':>7}{'failed':>7}"
        f"{'PSNR med':>9}{'mean':>7}{'worst':>7}{'SSIM med':>9}{'label':>7}{'B ok':>6}"
        f"{'succ@' + _fmt(summary['success_psnr'], 0):>8}{'time med':>9}"
    )
    lines = [f"{summary['dataset']} / {summary['model']}", header, "-" * len(header)]
    for cell in cells:
        lines.append(
            f"{cell['attack']:<{wa}}{cell['defense']:<{wd}}{cell['batch_size']:>3}"
            f"{cell['trials']:>7}{cell['failed']:>7}"
            f"{_fmt(cell['psnr']['median']):>9}{_fmt(cell['psnr']['mean']):>7}"
            f"{_fmt(cell['psnr']['worst']):>7}{_fmt(cell['ssim']['median'], 3):>9}"
            f"{_fmt(cell['label_accuracy'], 2):>7}{_fmt(cell['batch_size_accuracy'], 2):>6}"
            f"{_fmt(cell['success_rate'], 2):>8}{_fmt(cell['time_s']['median'], 3):>8}s"
        )
    for cell, reason in summary["skipped"].items():
        lines.append(f"skipped {cell}: {reason}")
    return "\n".join(lines)
