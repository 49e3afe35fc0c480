"""Runs a configured grid of cells (attack × batch size) with Lightning and writes the results.

Everything that can be refused is refused before the first trial: unknown names, options an
attack does not take, capabilities the threat model does not grant, victims an attack cannot
handle, batch sizes the split cannot supply, a run folder that holds another configuration.

Every process of a run (``devices: N`` gives N ranks) writes into one run folder: the first
process names it and hands the name to the ranks Lightning starts. Trials are sharded exactly,
trial ``i`` on rank ``i mod N``, with no padding and no duplicates; the summary is written once
every rank is done. Resuming skips the trials already recorded, from any rank; a cell with no
trial left on any rank is skipped by every rank alike, and a rank whose shard of a cell is empty
waits for the others (uneven shards are the rule after a resume).

A signal (Ctrl-C, SIGTERM, SIGUSR2) stops the run as :class:`RunInterrupted`: the trial in flight
is dropped, not recorded, the ranks this process started are ended, and the run resumes later
from its records (:mod:`leakbench.interruption`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import netrc
import os
import platform
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning
import numpy as np
import torch
from lightning import LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset, Subset

import leakbench
from leakbench.capabilities import Capability, admitted_letters, grants_beyond, threat_model_of
from leakbench.client import ClientProtocol, protocol_from_spec
from leakbench.config import ConfigError, RunConfig, protocol_differences, saved_config
from leakbench.datamodules.base import DatasetError
from leakbench.evaluator import Evaluator, log_run_to_wandb
from leakbench.figures import Tile, cell_figure
from leakbench.interfaces import Defense, UnsupportedModelError
from leakbench.interruption import RunInterrupted, interruptible
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
from leakbench.protocol.attack import choose_placement
from leakbench.protocol.isolation import Placement
from leakbench.protocol.sandbox import SandboxUnavailable, make_non_dumpable
from leakbench.protocol.victim import resolve_victim_state
from leakbench.registry import COVARIATES, DATAMODULES, DEFENSES, MODELS
from leakbench.results import RunDirectory, cell_key

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
# leakbench's SLURM jobs always run under srun; a run on a machine that merely has srun is no error.
warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
# Lightning's hardware banner and product tips would bury the results table.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# The maintainers' private verification data: never published, never shown to attack code.
PRIVATE_DATA_ENV = "LEAKBENCH_PRIVATE_DATA"
# Set by the first process of a run, inherited by the ranks Lightning launches: one run folder.
RUN_DIR_VARIABLE = "LEAKBENCH_RUN_DIR"
# Capability.SURROGATE_DATA: at most this many samples of the other split, drawn from the run
# seed on their own stream.
SURROGATE_SAMPLES = 1024
SURROGATE_STREAM = 0x5022_0647


def check_options(
    kind: str,
    name: str,
    factory: Callable[..., Any],
    options: dict[str, Any],
    fixed: int = 0,
    set_by_run: Mapping[str, str] | None = None,
) -> None:
    """Refuse, in one line naming the key, its value and the valid keys, an option that the
    registered ``factory`` does not take, or a missing one that it needs (its first ``fixed``
    parameters are not options; ``set_by_run`` maps those the run sets to the run's key)."""
    set_by_run = set_by_run or {}
    taken = [key for key in options if key in set_by_run]
    if taken:
        raise ConfigError(
            f"{kind}_options: {taken[0]} (given {options[taken[0]]!r}) is set by the run, "
            f"expected it as the run's key {set_by_run[taken[0]]!r}"
        )
    try:
        parameters = option_parameters(factory)[fixed:]
    except (TypeError, ValueError):  # no signature to read: the call itself will say
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    parameters = [p for p in parameters if p.name not in set_by_run]
    valid = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in options if key not in valid]
    if unknown:
        expected = f"expected one of: {', '.join(valid)}" if valid else "it takes no options"
        raise ConfigError(
            f"{kind}_options: unknown option {unknown[0]!r} (given {options[unknown[0]]!r}) for "
            f"{kind} {name!r}; {expected}"
        )
    missing = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in options
    ]
    if missing:
        raise ConfigError(
            f"{kind}_options: got {options!r}, expected the option {missing[0]!r} that "
            f"{kind} {name!r} needs"
        )


def option_parameters(factory: Callable[..., Any]) -> list[inspect.Parameter]:
    """The parameters ``factory`` takes; a class whose ``__init__`` passes ``**options`` on to
    its base class takes the base's too (as a datamodule with one option of its own does)."""
    parameters = list(inspect.signature(factory).parameters.values())
    if not isinstance(factory, type) or not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return parameters
    base = next((b for b in factory.__mro__[1:] if "__init__" in vars(b)), object)
    if base is object:
        return parameters
    own = [p for p in parameters if p.kind is not p.VAR_KEYWORD]
    return own + [p for p in option_parameters(base) if p.name not in {q.name for q in own}]


def instantiate(kind: str, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Call a registered factory, turning a bad keyword into a one-line error."""
    check_options(kind, name, factory, options)
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for {kind} {name!r}: {exc}") from None


# Datamodule options that a run sets from its own keys.
DATASET_OPTIONS_OF_THE_RUN = {
    "batch_size": "batch_sizes",
    "num_trials": "trials",
    "seed": "seed",
    "split": "split",
}


def build_datamodule(config: RunConfig, batch_size: int) -> Any:
    factory = DATAMODULES.get(config.dataset)
    options = dict(config.dataset_options)
    check_options(
        "dataset", config.dataset, factory, options, set_by_run=DATASET_OPTIONS_OF_THE_RUN
    )
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


def make_loggers(
    config: RunConfig, public: dict[str, Any], run_dir: Path, verbose: bool = False
) -> list[Logger]:
    """The run's loggers. W&B prints nothing of its own unless ``verbose``: the run says in one
    line where its W&B run is (:func:`wandb_line`)."""
    if config.logger == "none":
        return []
    # A fresh CSV version per invocation: resuming must not overwrite earlier logs.
    version = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="csv", version=version)]
    if config.logger == "wandb":
        # Offline unless the user configured W&B (WANDB_MODE, an API key, `wandb login`).
        offline = not wandb_configured()
        logger = WandbLogger(
            project=config.wandb_project,
            name=run_dir.name,
            group=config.wandb_group,
            job_type=config.wandb_job_type,
            save_dir=str(run_dir),
            offline=offline,
            config=public,
            settings={"silent": not verbose},
        )
        # Lightning always passes `anonymous` (None by default), and W&B warns about the
        # setting's deprecation before its silent setting applies.
        logger._wandb_init.pop("anonymous", None)
        loggers.append(logger)
    return loggers


def wandb_line(run: Any) -> str | None:
    """One line that says where a W&B run is: its page, or its offline folder and how to
    upload it; None for a disabled run (``WANDB_MODE=disabled``)."""
    if run.settings.mode == "disabled":
        return None
    if run.offline:
        folder = run.settings.sync_dir
        return f"W&B: offline run {run.id} in {folder} (upload: wandb sync {folder})"
    return f"W&B: {run.url}"


@contextlib.contextmanager
def run_loggers(
    config: RunConfig, public: dict[str, Any], run_dir: Path, verbose: bool = False
) -> Iterator[list[Logger]]:
    """The run's loggers. A run that stops with an error finishes its W&B run as failed: left
    open, W&B would hand it to the next run of the same process (a study runs many)."""
    loggers = make_loggers(config, public, run_dir, verbose)
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
    # Attacks that cannot handle the victim, with the reason: their cells are skipped, noted.
    inapplicable: dict[str, str]
    defense: Defense
    victim: Victim
    datamodule: dict[str, Any]  # the datamodule's describe()
    covariates: tuple[str, ...]
    private_transform: PrivateTransform | None
    threads: int
    processes: int
    client_protocol: ClientProtocol
    placement: Placement  # where attack code runs (the sandbox's view of the files)
    sandbox: str  # what the sandbox is, or why the run fell back to worker processes
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
    probe = build_datamodule(config, protocol.samples_per_trial(max(config.batch_sizes)))
    for b in config.batch_sizes:
        probe.batch_size = protocol.samples_per_trial(b)
        try:
            probe.trials()
        except ValueError as exc:
            raise ConfigError(f"{config.dataset} ({config.split} split): {exc}") from None
    check_options("model", config.model, MODELS.get(config.model), config.model_options, fixed=2)
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
    try:
        model = victim.build()
    except TypeError as exc:
        raise ConfigError(f"model_options of model {config.model!r}: {exc}") from None
    defense.check_model(model)
    threads = config.threads or default_threads(processes)
    placement, sandbox = run_placement(config, threads, probe.describe().get("root"))
    admitted = track_threat_model(config)
    attacks, inapplicable = {}, {}
    for name in config.attacks:
        try:
            attacks[name] = prepare_attack(
                name,
                config.attack_options.get(name, {}),
                config.granted,
                protocol,
                victim=victim,
                placement=placement,
                admitted=admitted,
            )
        except UnsupportedModelError as exc:
            inapplicable[name] = str(exc)
    if not attacks:  # nothing would run: refused, with every reason
        raise UnsupportedModelError("; ".join(inapplicable.values()))
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
        inapplicable=inapplicable,
        defense=defense,
        victim=victim,
        datamodule=probe.describe(),
        covariates=covariates,
        private_transform=private_transform,
        threads=threads,
        processes=processes,
        placement=placement,
        sandbox=sandbox,
        client_protocol=protocol,
        surrogate=(
            surrogate_samples(probe, config)
            if Capability.SURROGATE_DATA in config.granted
            else None
        ),
        **(privacy_references(config, probe) if config.privacy_metrics else {}),
    )


def track_threat_model(config: RunConfig) -> str | None:
    """The SoK letter the run's track states (``track.threat_model``), checked: a known letter,
    and no grant that tells the attacker more than it knows. Attacks whose letter it does not
    admit are refused by ``prepare_attack``."""
    letter = (config.track or {}).get("threat_model")
    if letter is None:
        return None
    name = (config.track or {}).get("name", "of this run")
    try:
        track = threat_model_of(letter)
    except ValueError as exc:
        raise ConfigError(f"track {name!r}: {exc}") from None
    beyond = grants_beyond(letter, config.granted)
    if beyond:
        raise ConfigError(
            f"track {name!r} (threat model {track.describe()}, admits "
            f"{', '.join(admitted_letters(letter))}) grants "
            f"{', '.join(c.value for c in beyond)}, which that threat model does not know"
        )
    return letter


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


def forbidden_folders(
    output_dir: str | Path, checkpoint_dir: str | Path, data_root: str | None = None
) -> list[Path]:
    """What attack code must never see: the output and checkpoint folders, the data roots
    (the run's, the default one and the maintainers' private data), the leaderboard's entries,
    the source checkout of an editable install and the current folder."""
    from leakbench.datamodules.base import DATA_ENV, DEFAULT_DATA_DIR
    from leakbench.leaderboard.entry import LEADERBOARDS

    folders = [
        Path(output_dir),
        Path(checkpoint_dir),
        Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR),
        LEADERBOARDS,
        Path.cwd(),
    ]
    folders += [Path(p) for p in (data_root, os.environ.get(PRIVATE_DATA_ENV)) if p]
    checkout = Path(leakbench.__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        folders.append(checkout)
    return [f.expanduser().resolve() for f in folders]


def study_placement(
    isolation: str, attacks: Sequence[str], output_dir: str | Path | None
) -> Placement:
    """Where a study's attack code runs (a study writes to ``output_dir``, or nowhere)."""
    from leakbench.models.training import default_checkpoint_dir

    forbidden = forbidden_folders(output_dir or Path.cwd(), default_checkpoint_dir())
    try:
        return choose_placement(isolation, default_threads(), attacks, forbidden)[0]
    except SandboxUnavailable as exc:
        raise ConfigError(str(exc)) from None


def run_placement(
    config: RunConfig, threads: int, data_root: str | None = None
) -> tuple[Placement, str]:
    """Where a run's attack code runs (:func:`leakbench.protocol.attack.choose_placement`)."""
    forbidden = forbidden_folders(config.output_dir, checkpoint_folder(config), data_root)
    try:
        return choose_placement(config.isolation, threads, config.attacks, forbidden)
    except SandboxUnavailable as exc:
        raise ConfigError(str(exc)) from None


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
    collect: list[dict[str, Any]] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run every cell of ``config``; returns the summary also written to ``summary.json``.

    ``collect`` receives every record this process makes, as it makes it (verification takes
    its figures from there, never from a file).

    With ``resume``, ``config`` must be the run's saved configuration (see :func:`saved_config`)
    up to keys that do not change what is measured. ``secret_keys`` (verification's seeds) are
    never written where an attack could read them during the run: ``config.yaml`` and the
    loggers get a SHA-256 commitment instead of each value. W&B prints its own output only
    when ``verbose``.
    """
    make_non_dumpable()  # no process of this user reads the private batch out of our memory
    with interruptible():
        # The folder first: a resume it cannot continue is refused before anything is written
        # (a reference classifier trained by prepare, say).
        run_path, first_process = _run_folder(config, resume)
        try:
            prepared = prepare(config, secret_keys)
            torch.set_num_threads(prepared.threads)
            return _run_cells(prepared, run_path, first_process, progress, echo, collect, verbose)
        except RunInterrupted as exc:
            if first_process:
                echo(interrupted_message(run_path, exc))
            raise
        finally:
            if first_process:
                os.environ.pop(RUN_DIR_VARIABLE, None)


def interrupted_message(run_path: Path, exc: RunInterrupted) -> str:
    recorded = len(RunDirectory(run_path).completed()) if run_path.is_dir() else 0
    return (
        f"{exc}: the trial in flight was dropped, not recorded; {recorded} trial(s) are "
        f"recorded in {run_path}; continue with: leakbench run --resume {run_path}"
    )


def ddp_timeout(config: RunConfig, cells: int) -> timedelta:
    """How long a rank may wait for the others at a collective: a rank whose shard is empty
    (after a resume) waits while another runs its trials, up to a whole run's worth of them."""
    limit = config.budget.max_seconds
    if not limit:
        return timedelta(days=7)  # no bound on a trial: no bound worth the name on the wait
    trials_per_rank = -(-config.trials // config.processes())
    return timedelta(minutes=30, seconds=cells * trials_per_rank * (float(limit) + 30))


def trainer_setup(config: RunConfig, cells: int) -> dict[str, Any]:
    """The Trainer's strategy and plugins: DDP that waits for uneven shards, and SLURM's
    environment without Lightning's own requeueing (a sweep job requeues through submitit)."""
    setup: dict[str, Any] = {}
    if config.processes() > 1:
        setup["strategy"] = DDPStrategy(timeout=ddp_timeout(config, cells))
    if SLURMEnvironment.detect():
        setup["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    return setup


@contextlib.contextmanager
def ranks_ended_on_interrupt(grace_s: float = 1.5) -> Iterator[list[Trainer]]:
    """On :class:`RunInterrupted`, end the rank processes the trainers appended to the yielded
    list started (``devices: N`` on one machine): they get SIGTERM (each drops its trial in
    flight), and SIGKILL if still there after ``grace_s``."""
    trainers: list[Trainer] = []
    try:
        yield trainers
    except RunInterrupted:
        for trainer in trainers:
            _end_processes(list(getattr(trainer.strategy.launcher, "procs", None) or []), grace_s)
        raise


def _end_processes(processes: list[subprocess.Popen], grace_s: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run_cells(
    prepared: PreparedRun,
    run_path: Path,
    first_process: bool,
    progress: bool,
    echo: Callable[[str], None],
    collect: list[dict[str, Any]] | None = None,
    verbose: bool = False,
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
        "sandbox": prepared.sandbox,
        # What ran: each attack's hyperparameters as its jobs rebuild it, and its code.
        "attacks_run": {
            name: {
                "hparams": a.hparams,
                "code": dict(a.code),
                "threat_model": a.threat_model,
                "threat_letter": a.threat_letter,  # the SoK letter under the run's protocol
            }
            for name, a in prepared.attacks.items()
        },
    }
    if first_process:
        if prepared.placement.isolation != config.isolation:
            echo(f"note: {prepared.sandbox}")
        for note in run_dir.repair():
            echo(f"note: {note}")
        if prepared.task_leakage.startswith("unavailable"):
            echo(f"note: task leakage {prepared.task_leakage}")
        run_dir.write_config(resolved)
    done = run_dir.completed()
    with (
        run_loggers(config, resolved, run_path, verbose) as loggers,
        ranks_ended_on_interrupt() as started,
    ):
        trainer = Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            logger=loggers or False,
            inference_mode=False,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,  # ours names the cell and the trial (leakbench.progress)
            **trainer_setup(config, len(config.attacks) * len(config.batch_sizes)),
        )
        started.append(trainer)
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
            for name in config.attacks:  # an attack that cannot handle the victim: skipped
                cell = cell_key(name, config.defense, batch_size)
                attack = prepared.attacks.get(name)
                if attack is None:
                    skipped[cell] = prepared.inapplicable[name]
                elif not fits(attack, batch_size):
                    skipped[cell] = f"{name} handles batches of at most {attack.max_batch_size}"
                if cell in skipped:
                    if first_process:
                        echo(f"skipping {cell}: {skipped[cell]}")
                    continue
                if all((cell, i) in done for i in range(len(trials))):
                    continue  # done on every rank: each rank read the same records, each skips it
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
                    isolation=prepared.placement.isolation,
                    sandbox_view=prepared.placement.view,
                    threads=prepared.threads,
                    private_transform=prepared.private_transform,
                    client_protocol=protocol,
                    gallery=prepared.gallery,
                    gallery_ids=prepared.gallery_ids,
                    classifier=prepared.classifier,
                    surrogate=prepared.surrogate,
                )
                evaluator = Evaluator(
                    prepared.victim,
                    attack,
                    prepared.defense,
                    setting,
                    run_dir,
                    progress=bar,
                    collect=collect,
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
            wandb_lines = []
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    wandb_lines.append(wandb_line(logger.experiment))
                    log_run_to_wandb(logger, run_dir, summary, list(summary["cells"]))
            echo(format_summary(summary))
            echo(f"results: {run_path}")
            for line in filter(None, wandb_lines):
                echo(line)
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
    if run_path.is_dir():
        RunDirectory(run_path).completed()  # a damaged records file is refused, left as it is
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
