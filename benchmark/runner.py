"""Runs a configured grid of cells (attack × batch size) with Lightning and writes the results.

Everything that can be refused is refused before the first trial: unknown names, options an
attack does not take, capabilities the threat model does not grant, victims an attack cannot
handle, batch sizes the split cannot supply, a run folder that holds another configuration.

Every process of a run (``devices: N`` gives N ranks) writes into one run folder: the first
process names it and hands the name to the ranks Lightning starts. Trials are sharded exactly,
trial ``i`` on rank ``i mod N``, with no padding and no duplicates; the summary is written once
every rank is done. Resuming skips the trials already recorded, from any rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import netrc
import os
import platform
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning
import numpy as np
import torch
from lightning import LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import DataLoader, Dataset, Subset

import leakbench
from leakbench.capabilities import admitted_letters, grants_beyond, threat_model_of
from leakbench.client import ClientProtocol, protocol_from_spec
from leakbench.config import ConfigError, RunConfig
from leakbench.datamodules.base import DatasetError
from leakbench.evaluator import Evaluator, log_run_to_wandb
from leakbench.figures import Tile, cell_figure
from leakbench.interfaces import Defense
from leakbench.metrics import aggregate, gallery_from_samples, lpips_status
from leakbench.progress import Progress
from leakbench.protocol import (
    PreparedAttack,
    PrivateTransform,
    TrialSetting,
    Victim,
    default_threads,
    prepare_attack,
)
from leakbench.protocol.victim import resolve_victim_state
from leakbench.registry import ATTACKS, COVARIATES, DATAMODULES, DEFENSES
from leakbench.results import RunDirectory, cell_key
from leakbench.threat_model import Capability

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
# Lightning's hardware banner and product tips would bury the results table.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# What config.yaml records next to the configuration (facts of the machine and the data).
RECORDED_FACTS = ("environment", "datamodule", "lpips", "task_leakage")
# Capability.SURROGATE_DATA: at most this many samples of the other split, drawn from the run
# seed on their own stream.
SURROGATE_SAMPLES = 1024
SURROGATE_STREAM = 0x5022_0647
# Set by the first process of a run, inherited by the ranks Lightning launches: one run folder.
RUN_DIR_VARIABLE = "LEAKBENCH_RUN_DIR"
# Keys that may differ when a run is resumed: they change how it runs, not what it measures.
NOT_PROTOCOL_KEYS = frozenset(
    {
        "logger",
        "wandb_project",
        "wandb_group",
        "wandb_job_type",
        "output_dir",
        "run_name",
        "threads",
        "isolation",
        "devices",
    }
)


def instantiate(kind: str, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Call a registered factory, turning a bad keyword into a one-line error."""
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for {kind} {name!r}: {exc}") from None


def build_datamodule(config: RunConfig, batch_size: int) -> Any:
    factory = DATAMODULES.get(config.dataset)
    options = dict(config.dataset_options)
    options.update(
        batch_size=batch_size, num_trials=config.trials, seed=config.seed, split=config.split
    )
    return instantiate("dataset", config.dataset, factory, options)


def public_config(config: RunConfig, secret_keys: Sequence[str]) -> dict[str, Any]:
    """The configuration with each secret value replaced by a SHA-256 commitment to it."""
    values = config.to_dict()
    for key in secret_keys:
        text = json.dumps(values[key], sort_keys=True)
        values[key] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return values


def wandb_configured() -> bool:
    """Whether the user set W&B up to sync: ``WANDB_MODE``, ``WANDB_API_KEY``, or the key that
    ``wandb login`` stores in ~/.netrc for the W&B host. Read from local state only: deciding
    must never touch the network."""
    if os.environ.get("WANDB_MODE") is not None or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return (
            host is not None
            and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
        )
    except (OSError, netrc.NetrcParseError):
        return False


def make_loggers(config: RunConfig, public: dict[str, Any], run_dir: Path) -> list[Logger]:
    if config.logger == "none":
        return []
    # A fresh CSV version per invocation: resuming must not overwrite earlier logs.
    version = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="csv", version=version)]
    if config.logger == "wandb":
        # Offline unless the user configured W&B (WANDB_MODE, an API key, `wandb login`).
        offline = not wandb_configured()
        loggers.append(
            WandbLogger(
                project=config.wandb_project,
                name=run_dir.name,
                group=config.wandb_group,
                job_type=config.wandb_job_type,
                save_dir=str(run_dir),
                offline=offline,
                config=public,
            )
        )
    return loggers


@contextlib.contextmanager
def run_loggers(config: RunConfig, public: dict[str, Any], run_dir: Path) -> Iterator[list[Logger]]:
    """The run's loggers. A run that stops with an error finishes its W&B run as failed: left
    open, W&B would hand it to the next run of the same process (a study runs many)."""
    loggers = make_loggers(config, public, run_dir)
    try:
        yield loggers
    except BaseException:
        for logger in loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish(exit_code=1)
        raise


def environment(threads: int, processes: int) -> dict[str, Any]:
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
        "processes": processes,
        "threads_per_process": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def saved_config(run_path: Path) -> RunConfig:
    """The configuration a run folder was started with."""
    saved = RunDirectory(run_path).read_config() if run_path.is_dir() else None
    if saved is None:
        raise ConfigError(f"cannot resume {run_path}: it holds no config.yaml")
    values = {k: v for k, v in saved.items() if k not in RECORDED_FACTS}
    return RunConfig.from_mapping(values, source=str(run_path / "config.yaml"))


def protocol_differences(saved: RunConfig, config: RunConfig) -> list[str]:
    """The keys on which two configurations differ in what they measure."""
    a, b = saved.to_dict(), config.to_dict()
    return sorted(k for k in a if k not in NOT_PROTOCOL_KEYS and a[k] != b.get(k))


def refuse_another_configuration(run_path: Path, config: RunConfig, advice: str) -> None:
    """Refuse a folder that holds a run measuring something else, naming the keys that differ."""
    if not (run_path / "config.yaml").is_file():
        return
    differing = protocol_differences(saved_config(run_path), config)
    if differing:
        raise ConfigError(
            f"{run_path} holds a run with another configuration (differs in: "
            f"{', '.join(differing)}); {advice}"
        )


class TrialShard(LightningDataModule):
    """The trials of one cell that this rank runs: trial ``i`` on rank ``i mod world size``,
    minus those already recorded. Exact: no padding, no duplicates (Lightning's distributed
    sampler, which pads the last shard, is switched off)."""

    def __init__(self, trials: Dataset, cell: str, done: set[tuple[str, int]]) -> None:
        super().__init__()
        self.trials = trials
        self.cell = cell
        self.done = done

    def test_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        indices = [
            i
            for i in range(rank, len(self.trials), world)  # type: ignore[arg-type]
            if (self.cell, i) not in self.done
        ]
        return DataLoader(Subset(self.trials, indices), batch_size=None, shuffle=False)


@dataclass
class PreparedRun:
    """Everything a run needs, built and checked before its folder exists."""

    config: RunConfig
    public: dict[str, Any]  # the configuration as written to disk and to the loggers
    attacks: dict[str, PreparedAttack]
    defense: Defense
    victim: Victim
    datamodule: dict[str, Any]  # the datamodule's describe()
    covariates: tuple[str, ...]
    private_transform: PrivateTransform | None
    threads: int
    processes: int
    client_protocol: ClientProtocol
    # Privacy metrics (``privacy_metrics``): the split as a gallery, its ids, the classifier.
    gallery: torch.Tensor | None = None
    gallery_ids: tuple[str, ...] | None = None
    classifier: Victim | None = None
    task_leakage: str = "off (privacy_metrics: false)"  # how it is scored, or why it is not
    surrogate: tuple[torch.Tensor, torch.Tensor] | None = None  # Capability.SURROGATE_DATA


def prepare(config: RunConfig, secret_keys: Sequence[str] = ()) -> PreparedRun:
    """Build and check every part of the run; anything that can be refused is refused here."""
    processes = config.processes()
    try:
        protocol = protocol_from_spec(config.client_protocol)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    defense: Defense = instantiate(
        "defense", config.defense, DEFENSES.get(config.defense), config.defense_options
    )
    unsupported = sorted(protocol.names() - defense.client_protocols)
    if unsupported:
        raise ConfigError(
            f"defense {config.defense!r} cannot run under the client protocol "
            f"{unsupported[0]!r} (it supports: {', '.join(sorted(defense.client_protocols))})"
        )
    check_threat_model(config, protocol)
    attacks = {
        name: prepare_attack(name, config.attack_options.get(name, {}), config.granted, protocol)
        for name in config.attacks
    }
    probe = build_datamodule(config, protocol.samples_per_trial(max(config.batch_sizes)))
    for b in config.batch_sizes:
        probe.batch_size = protocol.samples_per_trial(b)
        try:
            probe.trials()
        except ValueError as exc:
            raise ConfigError(f"{config.dataset} ({config.split} split): {exc}") from None
    try:
        victim = resolve_victim_state(
            config.model_state,
            model=config.model,
            model_options=dict(config.model_options),
            input_shape=tuple(probe.input_shape),
            num_classes=probe.num_classes,
            dtype=getattr(torch, config.dtype),
            checkpoint_dir=checkpoint_folder(config),
            seed=config.model_seed,
        )
    except TypeError as exc:
        raise ConfigError(f"bad options for model {config.model!r}: {exc}") from None
    model = victim.build()
    defense.check_model(model)
    for attack in attacks.values():
        attack.instance().check_model(model)
    covariates = tuple(COVARIATES.names() if config.covariates is None else config.covariates)
    for name in covariates:
        COVARIATES.get(name)  # an unknown name is refused before any trial
    try:
        private_transform = (
            None
            if config.private_transform is None
            else PrivateTransform.from_options(config.private_transform)
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return PreparedRun(
        config=config,
        public=public_config(config, secret_keys),
        attacks=attacks,
        defense=defense,
        victim=victim,
        datamodule=probe.describe(),
        covariates=covariates,
        private_transform=private_transform,
        threads=config.threads or default_threads(processes),
        processes=processes,
        client_protocol=protocol,
        surrogate=(
            surrogate_samples(probe, config)
            if Capability.SURROGATE_DATA in config.granted
            else None
        ),
        **(privacy_references(config, probe) if config.privacy_metrics else {}),
    )


def check_threat_model(config: RunConfig, protocol: ClientProtocol) -> None:
    """Refuse, where the run's track states its SoK threat model (``track.threat_model``), a
    grant that tells the attacker more than that threat model knows, and an attack whose own
    threat model under the run's client protocol it does not admit."""
    letter = (config.track or {}).get("threat_model")
    if letter is None:
        return
    name = config.track.get("name", "of this run") if config.track else "of this run"
    try:
        track = threat_model_of(letter)
    except ValueError as exc:
        raise ConfigError(f"track {name!r}: {exc}") from None
    admits = f"threat model {track.describe()}, admits {', '.join(admitted_letters(letter))}"
    beyond = grants_beyond(letter, config.granted)
    if beyond:
        raise ConfigError(
            f"track {name!r} ({admits}) grants {', '.join(c.value for c in beyond)}, which "
            "that threat model does not know"
        )
    for attack in config.attacks:
        assumed = ATTACKS.get(attack).sok_threat_model(protocol.names())
        if not track.admits(assumed):
            raise ConfigError(
                f"attack {attack!r} assumes threat model {assumed.describe()}, which track "
                f"{name!r} ({admits}) does not admit"
            )


def surrogate_split(datamodule: Any, split: str) -> str:
    """The split surrogate data comes from: train, or the first other split when the trials
    are drawn from train. Splits are disjoint, so no surrogate sample is a private one."""
    others = [s for s in datamodule.splits if s != split]
    if not others:
        raise ConfigError(f"surrogate_data: {datamodule.splits} has no split besides {split!r}")
    return "train" if "train" in others else others[0]


def surrogate_samples(datamodule: Any, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Capability.SURROGATE_DATA: up to ``SURROGATE_SAMPLES`` samples (model inputs in the run's
    dtype, labels) of the dataset's other split, drawn from the run seed."""
    samples = datamodule.samples(surrogate_split(datamodule, config.split))
    rng = np.random.default_rng([config.seed, SURROGATE_STREAM])
    order = rng.permutation(len(samples))[:SURROGATE_SAMPLES]
    items = [samples[int(i)] for i in order]
    images = torch.stack([x for x, _, _ in items]).to(getattr(torch, config.dtype))
    return images, torch.tensor([y for _, y, _ in items], dtype=torch.long)


def checkpoint_folder(config: RunConfig) -> Path:
    """Where the run's checkpoints (a trained victim, the reference classifier) live."""
    from leakbench.models.training import default_checkpoint_dir

    return Path(config.checkpoint_dir) if config.checkpoint_dir else default_checkpoint_dir()


def privacy_references(config: RunConfig, datamodule: Any) -> dict[str, Any]:
    """What identifiability and task leakage are scored against: the split's images (the
    gallery a reconstruction must be identified in) and the dataset's reference classifier,
    trained once on the train split and then loaded from the checkpoint folder."""
    from leakbench.models.training import reference_classifier, reference_recipe

    gallery, ids = gallery_from_samples(
        datamodule.samples(config.split), datamodule.mean, datamodule.std
    )
    references: dict[str, Any] = {"gallery": gallery, "gallery_ids": tuple(ids)}
    try:
        reference = reference_classifier(
            config.dataset, config.dataset_options, cache_dir=checkpoint_folder(config)
        )
    except DatasetError as exc:  # like LPIPS: the run goes on without it, and says why once
        return {**references, "task_leakage": f"unavailable: the reference classifier: {exc}"}
    recipe = reference_recipe(tuple(datamodule.input_shape))
    classifier = Victim(  # a specification: every trial scores with a fresh copy
        recipe["model"],
        tuple(datamodule.input_shape),
        datamodule.num_classes,
        recipe["model_options"],
        recipe["seed"],
        state={k: v.detach().clone() for k, v in reference.network.state_dict().items()},
    )
    accuracy = f"{reference.test_accuracy:.3f}"
    return {
        **references,
        "classifier": classifier,
        "task_leakage": f"reference classifier {reference.sha256[:16]}, test accuracy {accuracy}",
    }


def run(
    config: RunConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    secret_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every cell of ``config``; returns the summary also written to ``summary.json``.

    With ``resume``, ``config`` must be the run's saved configuration (see :func:`saved_config`)
    up to keys that do not change what is measured. ``secret_keys`` (verification's seeds) are
    never written where an attack could read them during the run: ``config.yaml`` and the
    loggers get a SHA-256 commitment instead of each value.
    """
    prepared = prepare(config, secret_keys)
    torch.set_num_threads(prepared.threads)
    run_path, first_process = _run_folder(config, resume)
    try:
        return _run_cells(prepared, run_path, first_process, progress, echo)
    finally:
        if first_process:
            os.environ.pop(RUN_DIR_VARIABLE, None)


def _run_cells(
    prepared: PreparedRun,
    run_path: Path,
    first_process: bool,
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    config = prepared.config
    dtype = getattr(torch, config.dtype)
    run_dir = RunDirectory(run_path)
    with_lpips, lpips_reason = lpips_status(prepared.victim.input_shape)
    # The resolved configuration and the environment: config.yaml, and the W&B run's config.
    resolved = {
        **prepared.public,
        "environment": environment(prepared.threads, prepared.processes),
        "datamodule": prepared.datamodule,
        "lpips": lpips_reason,
        "task_leakage": prepared.task_leakage,
    }
    if first_process:
        for note in run_dir.repair():
            echo(f"note: {note}")
        if prepared.task_leakage.startswith("unavailable"):
            echo(f"note: task leakage {prepared.task_leakage}")
        run_dir.write_config(resolved)
    done = run_dir.completed()
    with run_loggers(config, resolved, run_path) as loggers:
        trainer = Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            logger=loggers or False,
            inference_mode=False,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,  # ours names the cell and the trial (leakbench.progress)
        )
        rank, world = trainer.global_rank, trainer.world_size
        protocol = prepared.client_protocol

        def fits(attack: PreparedAttack, batch_size: int) -> bool:
            """Whether the attack handles what a trial draws (K·B samples for K clients)."""
            limit = attack.max_batch_size
            return limit is None or protocol.samples_per_trial(batch_size) <= limit

        to_run = sum(
            (cell_key(name, config.defense, b), i) not in done
            for b in config.batch_sizes
            for name, attack in prepared.attacks.items()
            if fits(attack, b)
            for i in range(rank, config.trials, world)
        )
        bar = Progress(to_run, "run", enabled=progress and rank == 0)
        galleries: dict[str, list[Tile]] = {}

        skipped: dict[str, str] = {}
        for batch_size in config.batch_sizes:
            # An aggregate of K clients draws K times the client's batch per trial.
            datamodule = build_datamodule(config, protocol.samples_per_trial(batch_size))
            trials = datamodule.trials()
            for name, attack in prepared.attacks.items():
                cell = cell_key(name, config.defense, batch_size)
                if not fits(attack, batch_size):
                    skipped[cell] = f"{name} handles batches of at most {attack.max_batch_size}"
                    if first_process:
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
                    covariates=prepared.covariates,
                    with_lpips=with_lpips,
                    isolation=config.isolation,
                    threads=prepared.threads,
                    private_transform=prepared.private_transform,
                    client_protocol=protocol,
                    gallery=prepared.gallery,
                    gallery_ids=prepared.gallery_ids,
                    classifier=prepared.classifier,
                    surrogate=prepared.surrogate,
                )
                evaluator = Evaluator(
                    prepared.victim, attack, prepared.defense, setting, run_dir, progress=bar
                )
                trainer.test(evaluator, datamodule=TrialShard(trials, cell, done), verbose=False)
                if evaluator.gallery:
                    galleries[cell] = evaluator.gallery
        bar.close()

        trainer.strategy.barrier()  # every rank's records are on disk before summarising
        summary = summarize(run_dir, config, skipped)
        if trainer.global_rank == 0:
            run_dir.write_summary(summary)
            # Rank 0's first samples; a resumed cell whose trials all ran before keeps its figure.
            for cell, tiles in galleries.items():
                run_dir.write_figure(cell, cell_figure(tiles, cell, summary["cells"][cell]))
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    log_run_to_wandb(logger, run_dir, summary, list(summary["cells"]))
            echo(format_summary(summary))
            echo(f"results: {run_path}")
        for logger in loggers:
            logger.finalize("success")
        return summary


def _run_folder(config: RunConfig, resume: str | Path | None) -> tuple[Path, bool]:
    """The run folder, and whether this is the process that prepares it.

    The ranks Lightning starts inherit the folder from the first process. A folder that already
    holds a run continues it only if that run measured the same thing; otherwise it is refused.
    """
    inherited = os.environ.get(RUN_DIR_VARIABLE)
    if inherited:
        return Path(inherited), False
    if resume is not None:
        run_path = Path(resume)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_path = Path(config.output_dir) / (config.run_name or stamp)
    if resume is not None and not (run_path / "config.yaml").is_file():
        raise ConfigError(f"cannot resume {run_path}: it holds no config.yaml")
    refuse_another_configuration(run_path, config, "use another run_name or output_dir")
    os.environ[RUN_DIR_VARIABLE] = str(run_path.resolve())
    return run_path, True


def summarize(run_dir: RunDirectory, config: RunConfig, skipped: dict[str, str]) -> dict[str, Any]:
    by_cell: dict[str, list[dict[str, Any]]] = {}
    # In trial order, whichever rank wrote them: the same sums on any process count.
    for record in sorted(run_dir.records(), key=lambda r: (r["cell"], r["trial"])):
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
        f"{'succ@' + _fmt(summary['success_psnr'], 0):>8}{'IIP':>6}{'task':>6}{'time med':>9}"
    )
    lines = [f"{summary['dataset']} / {summary['model']}", header, "-" * len(header)]
    for cell in cells:
        lines.append(
            f"{cell['attack']:<{wa}}{cell['defense']:<{wd}}{cell['batch_size']:>3}"
            f"{cell['trials']:>7}{cell['failed']:>7}"
            f"{_fmt(cell['psnr']['median']):>9}{_fmt(cell['psnr']['mean']):>7}"
            f"{_fmt(cell['psnr']['worst']):>7}{_fmt(cell['ssim']['median'], 3):>9}"
            f"{_fmt(cell['label_accuracy'], 2):>7}{_fmt(cell['batch_size_accuracy'], 2):>6}"
            f"{_fmt(cell['success_rate'], 2):>8}{_fmt(_rate(cell, 'iip_pixel'), 2):>6}"
            f"{_fmt(_rate(cell, 'task_leakage'), 2):>6}{_fmt(cell['time_s']['median'], 3):>8}s"
        )
    for cell, reason in summary["skipped"].items():
        lines.append(f"skipped {cell}: {reason}")
    if any("iip_pixel" in c for c in cells):
        chance = next(c["iip_pixel"]["chance"] for c in cells if "iip_pixel" in c)
        lines.append(
            f"IIP: share of reconstructions whose nearest split image is their own (chance "
            f"{chance:.3f}); task: share the reference classifier labels as the ground truth"
        )
    return "\n".join(lines)


def _rate(cell: dict[str, Any], key: str) -> float | None:
    return cell[key]["rate"] if key in cell else None
