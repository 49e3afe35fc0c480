"""Trained victims: a zoo model trained on a dataset's train split, saved as a checkpoint.

:func:`train_victim` runs, with Lightning (``Trainer.fit``, manual optimisation):

1. check every argument (before anything is built or written);
2. build the datamodule with ``seed`` (the shuffling of the train split) and the model from the
   seeded initialisation ``random(seed)`` (:func:`leakbench.client.build_victim`), or from the
   weights of ``initial_checkpoint`` (training continued from a checkpoint);
3. seed everything with ``seed`` and fit ``epochs`` epochs of mini-batches of ``batch_size``:
   each step's gradient is the update the client would share under ``defense``, i.e.
   ``defense.apply(model, x, y, generator, fedsgd_update).update`` is written into every
   parameter's ``.grad`` before the optimiser (SGD or Adam, learning rate ``lr``) steps, so a
   defense trains the way it defends (none: the plain mini-batch gradient);
4. measure the accuracy on the test split;
5. write the content-addressed checkpoint and its card (:mod:`leakbench.models.checkpoint`).

On CPU the same arguments and the same number of intra-op threads (``torch.get_num_threads()``,
recorded on the card: it changes the order of float sums) give bit-identical weights, hence the
same checkpoint hash.
``accelerator="auto"`` trains on a GPU when one is present (its kernels need not be
bit-identical from run to run).

:func:`reference_classifier` is the fixed classifier of a dataset's task that the task-leakage
metric asks about a reconstruction. For the embedded datasets (``lfw-subset``, ``digits``) it
ships with leakbench as a content-addressed checkpoint in ``leakbench/models/reference/`` (see
:data:`SHIPPED_REFERENCE_DIR`); for any other dataset it is trained once and then loaded from its
cache.

``leakbench train --model lenet-zhu --dataset digits --epochs 5`` prints the hash, card path,
test accuracy and training time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from leakbench.client import build_victim
from leakbench.interfaces import positive_int
from leakbench.models.checkpoint import (
    Checkpoint,
    check_state_matches,
    load_checkpoint,
    save_checkpoint,
)
from leakbench.registry import DATAMODULES, DEFENSES, MODELS

CHECKPOINT_ENV = "LEAKBENCH_CHECKPOINTS"
DEFAULT_CHECKPOINT_DIR = "checkpoints"
# The reference classifiers of the embedded datasets, shipped as package data so that a first
# run trains nothing. Each was made by ``leakbench train`` with its dataset's recipe
# (:func:`reference_recipe`), e.g. for lfw-subset:
#   leakbench train --model fcn --dataset lfw-subset --model_options '{widths: [256]}' \
#     --epochs 30 --batch_size 32 --lr 0.001 --optimizer adam --seed 0 --accelerator cpu \
#     --checkpoint_dir models/reference
# Its card says how; a recipe that no shipped card matches is trained and cached as before.
SHIPPED_REFERENCE_DIR = Path(__file__).parent / "reference"

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
# Options the training run sets on the datamodule itself.
RESERVED_DATASET_OPTIONS = ("seed", "train_batch_size")


def default_checkpoint_dir() -> Path:
    """``$LEAKBENCH_CHECKPOINTS``, or ``./checkpoints`` when it is unset."""
    return Path(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT_DIR).expanduser()


@dataclass(frozen=True)
class TrainedVictim:
    """The result of :func:`train_victim`: the checkpoint, its accuracy, and the model."""

    checkpoint: Checkpoint
    test_accuracy: float
    train_seconds: float
    model: nn.Module  # in eval mode, on the CPU


def train_victim(
    model: str,
    dataset: str,
    *,
    model_options: Mapping[str, Any] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 0.1,
    optimizer: str = "sgd",
    seed: int = 0,
    defense: str | None = None,
    defense_options: Mapping[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    accelerator: str = "auto",
    initial_checkpoint: str | None = None,
) -> TrainedVictim:
    """Train ``model`` on ``dataset``'s train split, save and return the checkpoint.

    ``defense`` (a registered name, with ``defense_options``) is active in every step; its
    randomness comes from a generator seeded with ``seed``. ``checkpoint_dir`` defaults to
    :func:`default_checkpoint_dir`. ``initial_checkpoint`` (a sha256 or unique prefix of a
    checkpoint there) starts the training from its weights instead of ``random(seed)``; the
    card records its full hash.
    """
    # 1. Arguments.
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, int | float)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    dataset_options = dict(dataset_options or {})
    reserved = [k for k in RESERVED_DATASET_OPTIONS if k in dataset_options]
    if reserved:
        raise ValueError(
            f"dataset_options {reserved[0]}={dataset_options[reserved[0]]!r} is set by training "
            "itself: expected it through seed / batch_size"
        )
    model_options = dict(model_options or {})
    defense_options = dict(defense_options or {})
    MODELS.get(model)  # an unknown name raises, listing the valid ones
    defense_instance = _make(DEFENSES, defense or "none", defense_options, "defense")
    folder = default_checkpoint_dir() if checkpoint_dir is None else Path(checkpoint_dir)
    start = None if initial_checkpoint is None else load_checkpoint(initial_checkpoint, folder)

    # 2. Data and the seeded initialisation.
    datamodule = _make(
        DATAMODULES,
        dataset,
        {**dataset_options, "seed": seed, "train_batch_size": batch_size},
        "dataset",
    )
    input_shape, num_classes = tuple(datamodule.input_shape), int(datamodule.num_classes)
    try:
        network = build_victim(model, input_shape, num_classes, seed=seed, **model_options)
    except TypeError as exc:
        raise ValueError(
            f"model_options {model_options!r} do not fit model {model!r}: {exc}"
        ) from None
    if start is not None:
        check_state_matches(network, start.state, f"initial_checkpoint {start.sha256[:16]}")
        network.load_state_dict(start.state)

    # 3. Fit.
    import lightning
    from lightning.pytorch.utilities.seed import isolate_rng

    from leakbench.models._lightning_training import DefendedTraining

    module = DefendedTraining(
        network,
        defense_instance,
        defense or "none",
        lambda params: OPTIMIZERS[optimizer](params, lr=lr),
        seed,
    )
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    # Seeded for the fit, and the caller's random generators are left as they were.
    with isolate_rng(), warnings.catch_warnings():
        lightning.seed_everything(seed, verbose=False)
        # Small in-memory datasets need no loader workers; Lightning suggests them anyway.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    train_seconds = time.perf_counter() - started
    network = module.model.cpu().eval()

    # 4. Utility.
    accuracy = accuracy_on(network, datamodule.samples("test"))

    # 5. Checkpoint and card.
    card = {
        "model": model,
        "model_options": _plain(model_options),
        "dataset": dataset,
        "dataset_options": _plain(dataset_options),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "seed": seed,
        "defense": defense or "none",
        "defense_options": _plain(defense_options),
        # Only when set, so that the cards of training from random(seed) keep their keys.
        **({} if start is None else {"initial_checkpoint": start.sha256}),
        "test_accuracy": accuracy,
        "train_seconds": round(train_seconds, 3),
        "cpu_threads": torch.get_num_threads(),
        "accelerator": trainer.accelerator.__class__.__name__.removesuffix("Accelerator").lower(),
        "versions": versions(),
    }
    checkpoint = save_checkpoint(network.state_dict(), card, folder)
    return TrainedVictim(checkpoint, accuracy, train_seconds, network)


def accuracy_on(model: nn.Module, samples: Any, batch_size: int = 256) -> float:
    """Fraction of ``samples`` (``(x, label, id)`` items) that ``model`` classifies correctly."""
    parameter = next(model.parameters())
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for images, labels, _ in DataLoader(samples, batch_size=batch_size, shuffle=False):
            predicted = model(images.to(parameter.device, parameter.dtype)).argmax(dim=1)
            correct += int((predicted.cpu() == labels).sum())
            total += len(labels)
    if total == 0:
        raise ValueError("the test split is empty: no accuracy to measure")
    return correct / total


def versions() -> dict[str, str]:
    """The versions a card records."""
    import lightning

    return {
        "leakbench": metadata.version("leakbench"),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def train_command(
    model: str,
    dataset: str,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 0.1,
    optimizer: str = "sgd",
    seed: int = 0,
    model_options: Mapping[str, Any] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    defense: str | None = None,
    defense_options: Mapping[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    accelerator: str = "auto",
    echo: Callable[[str], None] = print,
) -> int:
    """``leakbench train``: train a victim, print its hash, card path and test accuracy.

    The arguments are those of :func:`train_victim`; the exit status is 0.
    """
    result = train_victim(
        model,
        dataset,
        model_options=model_options,
        dataset_options=dataset_options,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        defense=defense,
        defense_options=defense_options,
        checkpoint_dir=checkpoint_dir,
        accelerator=accelerator,
    )
    echo(f"checkpoint     {result.checkpoint.sha256}")
    echo(f"card           {result.checkpoint.card_path}")
    echo(f"test accuracy  {result.test_accuracy:.4f}")
    echo(f"train time     {result.train_seconds:.2f} s ({epochs} epochs)")
    return 0


# ------------------------------------------------------------------ the reference classifier

# Per input size (the larger image side, up to this bound): the fixed recipe of the reference
# classifier. Small images get a one-hidden-layer network, larger ones the Inverting Gradients
# ConvNet at width 32. Changing a recipe changes its cache key, so old caches are not reused.
REFERENCE_RECIPES: tuple[tuple[float, dict[str, Any]], ...] = (
    (
        28,
        {
            "model": "fcn",
            "model_options": {"widths": [256]},
            "epochs": 30,
            "batch_size": 32,
            "lr": 0.001,
            "optimizer": "adam",
            "seed": 0,
        },
    ),
    (
        math.inf,
        {
            "model": "convnet",
            "model_options": {"width": 32},
            "epochs": 20,
            "batch_size": 64,
            "lr": 0.001,
            "optimizer": "adam",
            "seed": 0,
        },
    ),
)


def reference_recipe(input_shape: Sequence[int]) -> dict[str, Any]:
    """The training recipe of the reference classifier for inputs of ``input_shape``."""
    side = max(input_shape[1:])
    return next(dict(recipe) for bound, recipe in REFERENCE_RECIPES if side <= bound)


class ReferenceClassifier(nn.Module):
    """A dataset's reference classifier, in eval mode.

    ``forward`` takes model inputs (normalised with the dataset's ``mean``/``std``, as the
    datamodule yields them) and returns logits; :meth:`predict_pixels` takes images in [0, 1].
    ``test_accuracy`` is its accuracy on the test split, ``sha256`` its checkpoint.
    """

    def __init__(
        self,
        network: nn.Module,
        test_accuracy: float,
        sha256: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.network = network
        self.test_accuracy = test_accuracy
        self.sha256 = sha256
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)

    def predict_pixels(self, pixels: Tensor) -> Tensor:
        """Predicted labels of images in [0, 1] of shape (B, C, H, W)."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
        parameter = next(self.network.parameters())
        with torch.no_grad():
            logits = self.network(((pixels - mean) / std).to(parameter.dtype))
        return logits.argmax(dim=1)


def trained_once(
    model: str,
    dataset: str,
    *,
    checkpoint_dir: str | Path,
    accelerator: str = "auto",
    **recipe: Any,
) -> TrainedVictim:
    """:func:`train_victim` with ``recipe`` (its other keyword arguments), run once per recipe.

    A pointer ``trained-<key>.json`` in ``checkpoint_dir``, where the key hashes the model, the
    dataset and the recipe, names the checkpoint; a later call with the same recipe loads it
    (hash checked) instead of training. ``train_seconds`` of a loaded victim is its card's.
    """
    identity = {"model": model, "dataset": dataset, **_plain(recipe)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    folder = Path(checkpoint_dir).expanduser()
    pointer = folder / f"trained-{key[:16]}.json"
    if pointer.is_file():
        return loaded_victim(
            load_checkpoint(json.loads(pointer.read_text())["checkpoint"], folder), model
        )
    trained = train_victim(model, dataset, checkpoint_dir=folder, accelerator=accelerator, **recipe)
    from leakbench.results import atomic_write_text

    atomic_write_text(
        pointer,
        json.dumps({"checkpoint": trained.checkpoint.sha256, **identity}, indent=2) + "\n",
    )
    return trained


def loaded_victim(checkpoint: Checkpoint, model: str) -> TrainedVictim:
    """The ``model`` network of a verified checkpoint, built from its card (eval mode, CPU);
    ``train_seconds`` is the card's."""
    card = checkpoint.card
    network = build_victim(
        model,
        tuple(card["input_shape"]),
        int(card["num_classes"]),
        seed=int(card["seed"]),
        **card["model_options"],
    )
    check_state_matches(network, checkpoint.state, f"checkpoint {checkpoint.path}")
    network.load_state_dict(checkpoint.state)
    return TrainedVictim(
        checkpoint, float(card["test_accuracy"]), float(card["train_seconds"]), network.eval()
    )


def shipped_reference(
    dataset: str, dataset_options: Mapping[str, Any], recipe: Mapping[str, Any]
) -> Checkpoint | None:
    """The shipped checkpoint whose card says it was trained on ``dataset`` (with
    ``dataset_options``) by ``recipe`` and no defense, or None. Loading verifies its hash."""
    wanted = {
        **_plain(recipe),
        "dataset": dataset,
        "dataset_options": _plain(dataset_options),
        "defense": "none",
        "defense_options": {},
    }
    for card_path in sorted(SHIPPED_REFERENCE_DIR.glob("*.json")):
        card = json.loads(card_path.read_text())
        if "initial_checkpoint" not in card and all(card.get(k) == v for k, v in wanted.items()):
            return load_checkpoint(card_path.stem, SHIPPED_REFERENCE_DIR)
    return None


def reference_classifier(
    dataset: str,
    dataset_options: Mapping[str, Any] | None = None,
    *,
    cache_dir: str | Path,
    shipped: bool = True,
) -> ReferenceClassifier:
    """The classifier of ``dataset``'s task: with ``shipped``, the checkpoint leakbench ships
    for it (:func:`shipped_reference`); otherwise trained once on the train split with
    :func:`reference_recipe` and cached in ``cache_dir`` (:func:`trained_once`).

    Measured (CPU): 0.981 test accuracy on ``digits``, 1.000 on ``lfw-subset``.
    """
    options = dict(dataset_options or {})
    probe = _make(DATAMODULES, dataset, options, "dataset")
    recipe = reference_recipe(tuple(probe.input_shape))
    model = recipe.pop("model")
    checkpoint = (
        shipped_reference(dataset, options, {"model": model, **recipe}) if shipped else None
    )
    trained = (
        loaded_victim(checkpoint, model)
        if checkpoint is not None
        else trained_once(
            model, dataset, checkpoint_dir=cache_dir, dataset_options=options, **recipe
        )
    )
    return ReferenceClassifier(
        trained.model, trained.test_accuracy, trained.checkpoint.sha256, probe.mean, probe.std
    )


# ------------------------------------------------------------------ helpers


def _make(registry: Any, name: str, options: Mapping[str, Any], kind: str) -> Any:
    """A registered component built from ``options``; wrong options are a ValueError."""
    factory = registry.get(name)
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(
            f"{kind}_options {dict(options)!r} do not fit {kind} {name!r}: {exc}"
        ) from None


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as JSON data (tuples become lists), as a card stores them."""
    return json.loads(json.dumps(dict(options)))
