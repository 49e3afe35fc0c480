"""``lfw``: Labeled Faces in the Wild (Huang et al., 2007), identity classification.

Reads torchvision's ``LFWPeople`` layout with PIL (torchvision's class insists on the archive
and md5 checks): ``root/lfw-py/<images dir>/<Name>/<Name>_<NNNN>.jpg``, the images dir being
``lfw_funneled`` (``image_set="funneled"``, default), ``lfw`` (``"original"``) or
``lfw-deepfunneled`` (``"deepfunneled"``). No download: LFW has no stable public URL any more.

Task: the identity, among identities with at least ``min_images_per_identity`` images (default
20). Labels index those names in alphabetical order, so the class count is known once the
folders are listed.

Splits ``train``/``test``:

- ``split_by="identity"`` (default): identity-disjoint. The View-1 development split
  ``lfw-py/peopleDevTrain.txt`` / ``peopleDevTest.txt`` (first line N, then N lines
  ``Name<TAB>count``) when both files are present; otherwise a seeded (``split_seed``) split
  that puts 25% of the eligible identities in ``test``. The victim has one output per eligible
  identity; the test identities are classes the training split never shows.
- ``split_by="image"``: every eligible identity in both splits; 25% of each identity's images
  (at least one, seeded) go to ``test``.

Preprocessing: a centered square of 60% of the shorter side (150×150 px on the 250×250
originals, the face) resized to ``resolution`` (default 32), RGB or grey (``grayscale``).
Normalisation: ImageNet mean/std (grey: their channel average 0.449/0.226).
Client groups (partition ``group``): the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leakbench.datamodules.base import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    FileDataModule,
    ImageFileDataset,
    ImageSpec,
)
from leakbench.datamodules.partition import group_split
from leakbench.registry import register_datamodule

IMAGE_SETS = {"funneled": "lfw_funneled", "original": "lfw", "deepfunneled": "lfw-deepfunneled"}
PEOPLE_FILES = {"train": "peopleDevTrain.txt", "test": "peopleDevTest.txt"}
TEST_FRACTION = 0.25
SPLIT_BY = ("identity", "image")


@dataclass(frozen=True)
class _Index:
    identities: list[str]  # eligible identities, sorted; the label is the position
    members: dict[str, list[Path]]  # split -> image paths
    split_source: str
    left_out: list[str]  # eligible identities that no split file lists


@register_datamodule("lfw")
class LFWDataModule(FileDataModule):
    layout = """
lfw-py/
  lfw_funneled/            (or lfw/, lfw-deepfunneled/, after image_set)
    Aaron_Eckhart/
      Aaron_Eckhart_0001.jpg
    ...
  peopleDevTrain.txt       optional, with peopleDevTest.txt: identity-disjoint split
  peopleDevTest.txt
"""
    source = (
        "LFW, http://vis-www.cs.umass.edu/lfw/ (no longer downloadable automatically; "
        "mirrors e.g. on Kaggle); no explicit licence, web news photographs for research use"
    )

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        resolution: int = 32,
        grayscale: bool = False,
        crop_fraction: float = 0.6,
        image_set: str = "funneled",
        min_images_per_identity: int = 20,
        split_by: str = "identity",
        split_seed: int = 0,
        **trial_options: Any,
    ) -> None:
        super().__init__(root=root, **trial_options)
        if image_set not in IMAGE_SETS:
            raise ValueError(f"unknown image_set {image_set!r}; valid: {', '.join(IMAGE_SETS)}")
        if split_by not in SPLIT_BY:
            raise ValueError(f"unknown split_by {split_by!r}; valid: {', '.join(SPLIT_BY)}")
        least = 2 if split_by == "image" else 1  # an identity in both splits needs two images
        if min_images_per_identity < least:
            raise ValueError(
                f"min_images_per_identity must be at least {least} with split_by={split_by!r}"
            )
        self.spec = ImageSpec(resolution, 1 if grayscale else 3, crop_fraction)
        self.input_shape = (self.spec.channels, resolution, resolution)
        self.mean = IMAGENET_GREY_MEAN if grayscale else IMAGENET_MEAN
        self.std = IMAGENET_GREY_STD if grayscale else IMAGENET_STD
        self.image_set = image_set
        self.min_images_per_identity = min_images_per_identity
        self.split_by = split_by
        self.split_seed = split_seed
        self._index: _Index | None = None

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.index().identities)

    @property
    def class_names(self) -> list[str]:
        return self.index().identities

    def load_split(self, split: str) -> ImageFileDataset:
        index = self.index()
        paths = index.members[split]
        label_of = {name: i for i, name in enumerate(index.identities)}
        names = [p.parent.name for p in paths]
        return ImageFileDataset(
            paths,
            [label_of[n] for n in names],
            [f"lfw/{n}/{p.stem}" for n, p in zip(names, paths, strict=True)],
            self.spec,
            self.mean,
            self.std,
            groups=names,
        )

    def index(self) -> _Index:
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def _build_index(self) -> _Index:
        base = self.root / "lfw-py"
        images_dir = self.require_dir(
            base / IMAGE_SETS[self.image_set],
            f"one folder per identity holding <Name>_<NNNN>.jpg (image_set={self.image_set!r})",
        )
        images = {
            folder.name: sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")
            for folder in sorted(images_dir.iterdir())
            if folder.is_dir()
        }
        if not any(images.values()):
            raise self.not_found(f"{images_dir} holds no identity folder with .jpg images")
        eligible = sorted(n for n, ps in images.items() if len(ps) >= self.min_images_per_identity)
        if not eligible:
            raise DatasetError(
                f"{images_dir}: no identity has at least {self.min_images_per_identity} images "
                f"(the most is {max(len(ps) for ps in images.values())})"
            )
        if self.split_by == "image":
            return self._image_split(images, eligible)
        present = [s for s, f in PEOPLE_FILES.items() if (base / f).is_file()]
        if len(present) == 1:
            missing = next(s for s in PEOPLE_FILES if s not in present)
            raise self.not_found(
                f"missing {base / PEOPLE_FILES[missing]}: expected the {missing} half of the "
                f"development split, next to {PEOPLE_FILES[present[0]]} (first line N, then N "
                "lines 'Name<TAB>count')"
            )
        if present:
            return self._people_split(base, images, eligible)
        parts = group_split(
            eligible, {"train": 1 - TEST_FRACTION, "test": TEST_FRACTION}, self.split_seed
        )
        members = {
            split: [p for i in sorted(rows) for p in images[eligible[i]]]
            for split, rows in parts.items()
        }
        return _Index(
            eligible, members, f"seeded identity split (split_seed={self.split_seed})", []
        )

    def _people_split(
        self, base: Path, images: dict[str, list[Path]], eligible: list[str]
    ) -> _Index:
        split_of: dict[str, str] = {}
        for split, filename in PEOPLE_FILES.items():
            path = base / filename
            for lineno, name, count in _read_people(path):
                if name in split_of:
                    raise DatasetError(
                        f"{path}:{lineno}: {name} is also in {PEOPLE_FILES[split_of[name]]}"
                    )
                if name not in images:
                    raise self.not_found(
                        f"{path}:{lineno}: {name} has no folder in "
                        f"{base / IMAGE_SETS[self.image_set]}"
                    )
                if count != len(images[name]):
                    raise DatasetError(
                        f"{path}:{lineno}: lists {count} images of {name}, its folder holds "
                        f"{len(images[name])}"
                    )
                split_of[name] = split
        members: dict[str, list[Path]] = {split: [] for split in PEOPLE_FILES}
        for name in eligible:
            if name in split_of:
                members[split_of[name]].extend(images[name])
        left_out = [name for name in eligible if name not in split_of]
        return _Index(eligible, members, " / ".join(PEOPLE_FILES.values()), left_out)

    def _image_split(self, images: dict[str, list[Path]], eligible: list[str]) -> _Index:
        rng = np.random.default_rng(self.split_seed)
        members: dict[str, list[Path]] = {"train": [], "test": []}
        for name in eligible:
            paths = images[name]
            order = rng.permutation(len(paths))
            held_out = set(order[: max(1, round(TEST_FRACTION * len(paths)))].tolist())
            for i, path in enumerate(paths):
                members["test" if i in held_out else "train"].append(path)
        return _Index(eligible, members, f"seeded image split (split_seed={self.split_seed})", [])

    def check_notes(self) -> list[str]:
        index = self.index()
        notes = [
            f"{len(index.identities)} identities with at least "
            f"{self.min_images_per_identity} images; split: {index.split_source}"
        ]
        if index.left_out:
            notes.append(
                f"{len(index.left_out)} eligible identities are in neither split file and are "
                f"left out: {', '.join(index.left_out[:5])}"
            )
        return notes

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "resolution": self.spec.resolution,
            "crop_fraction": self.spec.crop_fraction,
            "image_set": self.image_set,
            "min_images_per_identity": self.min_images_per_identity,
            "split_by": self.split_by,
            "split_seed": self.split_seed,
        }


def _read_people(path: Path) -> list[tuple[int, str, int]]:
    """(line number, name, image count) rows of a ``peopleDev*.txt`` file."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].strip().isdigit():
        first = lines[0] if lines else ""
        raise DatasetError(f"{path}:1: expected the number of people, got {first!r}")
    announced = int(lines[0])
    rows = []
    for lineno, line in enumerate(lines[1 : announced + 1], start=2):
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise DatasetError(f"{path}:{lineno}: expected 'Name<TAB>count', got {line!r}")
        rows.append((lineno, fields[0], int(fields[1])))
    if len(rows) != announced:
        raise DatasetError(
            f"{path}: the first line announces {announced} people, found {len(rows)}"
        )
    return rows
