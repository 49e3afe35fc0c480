"""The commands of the defense studies (``leakbench defenses``, ``client-protocols``).

A light module: the studies, which import torch, load only when their command runs.
"""

from __future__ import annotations

from typing import Any, Literal

from leakbench.commands import command
from leakbench.config import Count, check_output_folder


@command("defenses")
def defenses(track: str, *, output_dir: str | None = None, progress: bool = True) -> int:
    """Run a defense track: privacy (worst case over every applicable attack) against utility
    (accuracy of victims trained with the defense), one row per defense setting.

    Args:
        track: The defense track file, e.g. leaderboards/defense-tracks/digits-fcn.yaml.
        output_dir: Folder that receives the track's folder (default: the track's output_dir).
        progress: Show the progress bar.
    """
    from leakbench.analysis.defense_track import DefenseTrack

    loaded = DefenseTrack.load(track)
    check_output_folder(output_dir or loaded.base.get("output_dir", "runs"))
    from leakbench.analysis.defense_track import run_defense_track

    run_defense_track(loaded, output_dir=output_dir, progress=progress)
    return 0


@command("client-protocols")
def client_protocols(
    *,
    pairs: list[str] | None = None,
    trials: Count = 2,  # type: ignore[assignment]
    local_steps: list[Count] | None = None,
    clients: list[Count] | None = None,
    lr: float = 0.01,
    local_batch_size: Count | None = None,
    attack_options: dict[str, dict[str, Any]] | None = None,
    local_hyperparameters: bool = True,
    dtype: Literal["float32", "float64"] = "float32",
    seed: int = 0,
    isolation: Literal["sandbox", "process", "in-process"] = "sandbox",
    output_dir: str | None = None,
    progress: bool = True,
) -> int:
    """Attacks under FedSGD, FedAvg with local steps and the sum of K clients' updates:
    FCN/ExAN, LeNet-Zhu/DLG and LeNet-Zhu/Inverting Gradients on lfw-subset.

    Args:
        pairs: Subset of the model/attack pairs (default: all three).
        trials: Trials per pair and protocol.
        local_steps: FedAvg local steps to compare (default: [1,5,20]).
        clients: Numbers of aggregated clients (default: [1,4,16]).
        lr: FedAvg's local learning rate.
        local_batch_size: FedAvg's local batch (default: the whole batch).
        attack_options: Per attack, options on top of the study's, e.g. {dlg: {iterations: 50}}.
        local_hyperparameters: Grant the attacks the protocol's local hyperparameters.
        dtype: Floating-point type of the victims and updates.
        seed: Seed of the trial draws.
        isolation: Where attack code runs: sandbox (where available), process or in-process.
        output_dir: Folder for client_protocols.csv and .json (default: none written).
        progress: Show the progress bar.
    """
    if output_dir is not None:
        check_output_folder(output_dir)
    from leakbench.analysis.client_protocols import client_protocols_command

    return client_protocols_command(
        pairs=pairs,
        trials=trials,
        local_steps=local_steps or [1, 5, 20],
        clients=clients or [1, 4, 16],
        lr=lr,
        local_batch_size=local_batch_size,
        attack_options=attack_options or {},
        local_hyperparameters=local_hyperparameters,
        dtype=dtype,
        seed=seed,
        isolation=isolation,
        output_dir=output_dir,
        progress=progress,
    )
