"""Which data a verification runs on: the maintainers' private images where they hold them.

A track's public split can be enumerated by any attack (lfw-subset ships inside scikit-image).
The secret transform (:mod:`leakbench.protocol.private_transform`) bounds what a lookup of it
scores; images that are in no public list at all take the lookup's list away. A track names
such a source in its verification block::

    verification:
      private_dataset:
        dataset: lfw
        dataset_options: {root: "{private}/lfw", resolution: 25, grayscale: true}
        split: test

``{private}`` stands for the folder ``$LEAKBENCH_PRIVATE_DATA``, which only the board's
maintainers hold: it is never published, and the runner hides it from attack code
(``leakbench.runner.PRIVATE_DATA_ENV``). The private source must give the victim the same input
shape and number of classes as the track's public dataset, so that verification attacks the
track's own victim; it should hold images drawn from the same distribution as the public ones.

:func:`verification_data` decides: the private source when the variable is set and its folder
holds the dataset's root, otherwise the track's public split. The secret transform applies to
either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakbench.leaderboard.entry import EntryError

PLACEHOLDER = "{private}"
PRIVATE_KEYS = ("dataset", "dataset_options", "split")
TRANSFORMED = "with the secret transform"


@dataclass(frozen=True)
class VerificationData:
    """The dataset keys of the verification run and a line for the verification block."""

    keys: dict[str, Any]  # dataset, dataset_options, split: replace the track's
    description: str  # "private: lfw/test, 191 images, ..." or "public split ..."
    private: bool


def verification_data(track: Mapping[str, Any]) -> VerificationData:
    """The data the verification of ``track`` (a track file's mapping) runs on."""
    from leakbench.runner import PRIVATE_DATA_ENV

    public = {
        "dataset": track["dataset"],
        "dataset_options": dict(track.get("dataset_options") or {}),
        "split": track.get("split", "test"),
    }
    public_line = f"public split {public['dataset']}/{public['split']} {TRANSFORMED}"
    spec = track["track"].get("verification", {}).get("private_dataset")
    if spec is None:
        return VerificationData(public, public_line, private=False)
    keys = _checked(spec, public["split"])
    folder = os.environ.get(PRIVATE_DATA_ENV)
    if not folder:
        return VerificationData(public, public_line, private=False)
    keys["dataset_options"] = _filled(keys["dataset_options"], folder)
    root = keys["dataset_options"].get("root")
    if root is None or not Path(root).is_dir():
        missing = f"({PRIVATE_DATA_ENV} holds no {_relative(spec)})"
        return VerificationData(public, f"{public_line} {missing}", private=False)
    images = _check_like_public(track, keys)
    line = f"private: {keys['dataset']}/{keys['split']}, {images} images, {TRANSFORMED}"
    return VerificationData(keys, line, private=True)


def _checked(spec: Any, split: str) -> dict[str, Any]:
    if not isinstance(spec, Mapping) or "dataset" not in spec:
        raise EntryError(
            f"verification.private_dataset must be a mapping with {', '.join(PRIVATE_KEYS)} "
            "(dataset required)"
        )
    unknown = sorted(set(spec) - set(PRIVATE_KEYS))
    if unknown:
        raise EntryError(
            f"verification.private_dataset: unknown key {', '.join(unknown)}; "
            f"it takes {', '.join(PRIVATE_KEYS)}"
        )
    options = dict(spec.get("dataset_options") or {})
    if not any(isinstance(v, str) and PLACEHOLDER in v for v in options.values()):
        raise EntryError(
            f"verification.private_dataset: its dataset_options must put the data under "
            f"{PLACEHOLDER} (the folder only the maintainers hold), e.g. root: {PLACEHOLDER}/lfw"
        )
    split = spec.get("split", split)
    return {"dataset": spec["dataset"], "dataset_options": options, "split": split}


def _filled(options: Mapping[str, Any], folder: str) -> dict[str, Any]:
    return {
        key: value.replace(PLACEHOLDER, folder) if isinstance(value, str) else value
        for key, value in options.items()
    }


def _relative(spec: Mapping[str, Any]) -> str:
    """The dataset's root as the track writes it, without the private folder's path."""
    root = str(spec.get("dataset_options", {}).get("root", ""))
    return root.replace(PLACEHOLDER, "").lstrip("/") or spec["dataset"]


def _check_like_public(track: Mapping[str, Any], keys: Mapping[str, Any]) -> int:
    """Refuse a private source that would change the track's victim or cannot fill a batch;
    return how many images its split holds."""
    from leakbench.config import RunConfig
    from leakbench.runner import build_datamodule

    base = {k: v for k, v in track.items() if k not in PRIVATE_KEYS}
    public = build_datamodule(RunConfig.from_mapping(dict(track)), 1)
    private_config = RunConfig.from_mapping({**base, **keys})
    private = build_datamodule(private_config, 1)
    name = f"verification.private_dataset ({keys['dataset']})"
    try:
        shape, classes = tuple(private.input_shape), private.num_classes
        images = len(private.samples(private_config.split))
    except (OSError, ValueError) as exc:
        raise EntryError(f"{name}: {exc}") from None
    if (shape, classes) != (tuple(public.input_shape), public.num_classes):
        raise EntryError(
            f"{name} gives inputs of shape {list(shape)} in {classes} classes; the track's "
            f"victim takes {list(public.input_shape)} in {public.num_classes} classes"
        )
    largest = max(track.get("batch_sizes") or [1])
    if images < largest:
        raise EntryError(
            f"{name}: its {private_config.split} split holds {images} images, fewer than the "
            f"track's largest batch ({largest})"
        )
    return images
