"""The studies' commands (``leakbench boundary``, ``rank``, ``overhead``, ``fishing-study``).

A light module: the studies, which import torch, load only when their command runs.
``boundary`` takes the run keys it shares with ``leakbench run`` from :class:`RunConfig` (same
names, types and help) and adds its own keys (:class:`BoundaryOptions`) on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from leakbench.commands import command
from leakbench.config import Count, RunConfig, check_output_folder


@dataclass
class BoundaryOptions:
    """The boundary study's own keys.

    Args:
        train_epochs: Training states: 0 is the victim of model_state, N is that victim after N
            epochs of FedSGD on the train split (a checkpoint, trained once and cached).
        psnr_attack: Attack for PSNR versus ExANs, or none.
        attack_trials: Attacked batches per batch size.
        attack_options: Per attack, its keyword options.
        compare_attacks: Attacks compared on the same insecure-boundary batches.
        compare_batch_sizes: Batch sizes of the comparison.
        compare_trials: Qualifying batches per batch size in the comparison.
        compare_pool: Batches searched per batch size for qualifying ones.
        defenses: Exclusivity-reduction defenses to measure.
        defense_options: Per defense, its keyword options.
        defense_batch_sizes: Batch sizes of the defense measurement.
        defense_trials: Batches per batch size in the defense measurement.
        utility_epochs: Epochs of the utility-cost training; 0 skips the utility cost.
        wandb: Also log the tables and the figure to W&B in this mode; null: no W&B.
    """

    train_epochs: list[int] = field(default_factory=lambda: [0])
    psnr_attack: str = "exan"
    attack_trials: int = 20
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare_attacks: list[str] = field(default_factory=list)
    compare_batch_sizes: list[Count] = field(default_factory=lambda: [1, 4, 8])
    compare_trials: Count = 5  # type: ignore[assignment]
    compare_pool: Count = 400  # type: ignore[assignment]
    defenses: list[str] = field(default_factory=list)
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    defense_batch_sizes: list[Count] = field(default_factory=lambda: [4])
    defense_trials: Count = 20  # type: ignore[assignment]
    utility_epochs: int = 0
    wandb: Literal["offline", "online", "disabled"] | None = None

    def check(self) -> None:
        check_train_epochs(self.train_epochs)


def check_train_epochs(epochs: list[int]) -> None:
    """A study's training states: 0 (the model_state itself) or more epochs."""
    bad = [e for e in epochs if e < 0]
    if bad:
        raise ValueError(f"train_epochs: got {bad}, expected non-negative integers")


# The run keys the studies (boundary, fishing-study) share with `leakbench run`.
STUDY_RUN_KEYS = (
    "dataset",
    "dataset_options",
    "split",
    "model",
    "model_options",
    "model_seed",
    "model_state",
    "checkpoint_dir",
    "dtype",
    "seed",
    "isolation",
    "batch_sizes",
    "trials",
    "output_dir",
    "run_name",
)


@command(
    "boundary",
    keys=STUDY_RUN_KEYS,
    defaults={
        "model": "fcn-exan",
        "model_options": {},
        "batch_sizes": [2, 4, 8, 16, 32],
        "trials": 200,
    },
)
def boundary(config: RunConfig, options: BoundaryOptions, *, progress: bool = True) -> int:
    """Exclusivity security-boundary study: P(condition) vs batch size, PSNR vs ExANs.

    Args:
        progress: Show progress bars on stderr.
    """
    from leakbench.registry import ATTACKS, DATAMODULES, DEFENSES, MODELS, check_name

    check_name(DATAMODULES, config.dataset)
    check_name(MODELS, config.model)
    for name in [options.psnr_attack, *options.compare_attacks]:
        if name != "none":
            check_name(ATTACKS, name)
    for name in options.defenses:
        check_name(DEFENSES, name)
    check_output_folder(config.output_dir)
    from leakbench.analysis.boundary import boundary_command

    return boundary_command(config, options, progress)


@command("rank")
def rank(
    *,
    model: str,
    dataset: str | None = None,
    input_shape: list[Count] | None = None,
    num_classes: Count | None = None,
    seed: int = 0,
    skip_virtual: bool = False,
    json: bool = False,
    progress: bool = True,
) -> int:
    """Rank analysis of R-GAP's per-layer systems and the RA-I index of a victim model.

    Args:
        model: Registered victim model.
        dataset: Take the input shape and class count from this dataset.
        input_shape: Input shape [C,H,W] when no dataset is given (default [3,32,32]).
        num_classes: Classes, with input_shape (default 10).
        seed: Victim initialisation and probe seed.
        skip_virtual: Skip the virtual-constraint probe (the V_i column).
        json: Print the analysis as JSON.
        progress: Show a progress bar on stderr.
    """
    from leakbench.registry import DATAMODULES, MODELS, check_name

    check_name(MODELS, model)
    if dataset is not None:
        check_name(DATAMODULES, dataset)
        if input_shape is not None:
            raise ValueError(
                f"input_shape: got {input_shape} with dataset {dataset!r}, expected one"
            )
        if num_classes is not None:
            raise ValueError(
                f"num_classes: got {num_classes} with dataset {dataset!r}, expected none "
                "(the dataset sets it)"
            )
    if input_shape is not None and len(input_shape) != 3:
        raise ValueError(f"input_shape: got {input_shape}, expected [C,H,W]")
    from leakbench.analysis.rank import run_rank_command

    return run_rank_command(
        model,
        dataset=dataset,
        input_shape=input_shape,
        num_classes=num_classes,
        seed=seed,
        skip_virtual=skip_virtual,
        as_json=json,
        progress=progress,
    )


@command("overhead")
def overhead(config: RunConfig, *, rounds: Count = 2, progress: bool = False) -> int:  # type: ignore[assignment]
    """Wall time per trial with attacks in-process, in worker processes and in the sandbox.

    Runs the configured cells (default: the quickstart) in every mode, alternating rounds.

    Args:
        rounds: Alternating rounds of the modes.
        progress: Show each run's progress bar on stderr.
    """
    config.check_names()
    from leakbench.analysis.overhead import overhead_command

    return overhead_command(config, rounds, progress)


@dataclass
class FishingStudyOptions:
    """The fishing study's own keys.

    Args:
        ig_trials: Of the trials, those also attacked by Inverting Gradients.
        train_epochs: Training states: 0 is the victim of model_state, N is that victim after N
            epochs of FedSGD (a checkpoint, trained once and cached).
        train_lr: Learning rate of the victim's training.
        solvers: Fishing's LP solvers to compare (the LP objectives linf and l1; the l2
            objective takes highs, the default, and is solved by SciPy's NNLS).
        fishing_options: Fishing hyperparameters.
        settings: Named sets of fishing hyperparameters compared on the same batches, each
            over fishing_options (e.g. {old: {objective: linf, k: 2, assignment: min_cost},
            new: {}}); none: fishing_options alone.
        ig_options: Inverting Gradients hyperparameters.
    """

    ig_trials: int = 5
    train_epochs: list[int] = field(default_factory=lambda: [0, 5])
    train_lr: float = 0.05
    solvers: list[Literal["highs", "cbc"]] = field(default_factory=lambda: ["highs"])
    fishing_options: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    ig_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        check_train_epochs(self.train_epochs)
        if not self.solvers:
            raise ValueError("solvers: got [], expected highs and/or cbc")
        for name, values in self.settings.items():
            if not name or name in ("exan", "inverting-gradients") or not isinstance(values, dict):
                raise ValueError(
                    f"settings: got {name!r}: {values!r}, expected a name (not exan or "
                    "inverting-gradients) with a mapping of fishing options"
                )


@command(
    "fishing-study",
    keys=STUDY_RUN_KEYS,
    defaults={
        "split": "train",
        "dataset_options": {"mirrored": True},
        "model": "fcn-exan",
        "model_options": {},
        "batch_sizes": [8, 16, 32, 64, 128, 256],
        "trials": 5,
    },
)
def fishing_study(config: RunConfig, options: FishingStudyOptions, *, progress: bool = True) -> int:
    """Fishing attack study: LP feasibility and time, perturbation cost, exactness, against
    ExAN and Inverting Gradients.

    Args:
        progress: Show progress bars on stderr.
    """
    config.check_names()
    check_output_folder(config.output_dir)
    from leakbench.analysis.fishing_study import fishing_study_command

    return fishing_study_command(config, options, progress)
