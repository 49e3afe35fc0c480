"""``leakbench train``: a light module; models and Lightning load only when it runs."""

from __future__ import annotations

from typing import Any, Literal

from leakbench.commands import command
from leakbench.config import Count


@command("train")
def train(
    *,
    model: str,
    dataset: str,
    epochs: Count = 5,  # type: ignore[assignment]
    batch_size: Count = 32,  # type: ignore[assignment]
    lr: float = 0.1,
    optimizer: Literal["sgd", "adam"] = "sgd",
    seed: int = 0,
    model_options: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    defense: str | None = None,
    defense_options: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    accelerator: str = "auto",
) -> int:
    """Train a victim on a dataset's train split with Lightning; save a checkpoint named by
    its sha256 with a JSON card (model, dataset, epochs, seed, test accuracy).

    Args:
        model: Registered model, e.g. lenet-zhu, fcn.
        dataset: Registered dataset, e.g. digits.
        epochs: Passes over the train split.
        batch_size: Mini-batch size.
        lr: Learning rate.
        optimizer: sgd or adam.
        seed: Seed of the initialisation, the shuffling and the defense's randomness.
        model_options: Keyword options of the model, e.g. {widths: [256]}.
        dataset_options: Keyword options of the dataset.
        defense: Registered defense active at every training step (what it would share is
            the gradient the optimiser takes).
        defense_options: Keyword options of the defense.
        checkpoint_dir: Folder of the checkpoints (default: $LEAKBENCH_CHECKPOINTS or
            ./checkpoints).
        accelerator: Lightning accelerator: cpu, gpu or auto.
    """
    from leakbench.registry import DATAMODULES, MODELS, check_name

    check_name(MODELS, model)
    check_name(DATAMODULES, dataset)
    from leakbench.models.training import train_command

    return train_command(
        model,
        dataset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        model_options=model_options,
        dataset_options=dataset_options,
        defense=defense,
        defense_options=defense_options,
        checkpoint_dir=checkpoint_dir,
        accelerator=accelerator,
    )
