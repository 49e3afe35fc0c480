"""``celeba``: CelebA (Liu et al., ICCV 2015), aligned faces; identity or one attribute.

Reads torchvision's ``CelebA`` layout with PIL (torchvision's class md5-checks every text
file): under ``root/celeba/``

- ``img_align_celeba/000001.jpg`` ... (178×218 aligned crops),
- ``list_eval_partition.txt``: ``000001.jpg 0`` per line, 0/1/2 = train/val/test,
- ``identity_CelebA.txt``: ``000001.jpg 2880`` per line,
- ``list_attr_celeba.txt`` (read only for an attribute target): a count line, a header of the
  40 attribute names, then ``000001.jpg -1  1 ...`` per image.

No download: the upstream is a Google Drive folder behind a quota, not a stable URL.

Task: ``target="identity"`` (default) among identities with at least
``min_images_per_identity`` images in the whole dataset (default 30); labels index their
identity numbers in ascending order. Or ``target=<attribute name>`` (e.g. ``"Smiling"``): two
classes, 0 for -1 and 1 for +1.

Splits: the official partition ``train``/``val``/``test``, which is identity-disjoint.
Preprocessing: a centered square of 80% of the shorter side (142×142 px of the 178×218
crops) resized to ``resolution`` (default 32), RGB or grey (``grayscale``).
Normalisation: ImageNet mean/std (grey: their channel average 0.449/0.226).
Client groups (partition ``group``): the identity number.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from leakbench.registry import register_datamodule

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
ATTRIBUTE_FILE = "list_attr_celeba.txt"


@dataclass(frozen=True)
class _Index:
    split_of: dict[str, int]  # image file -> split code, in partition file order
    identity_of: dict[str, int]
    label_of: dict[str, int]  # image file -> label; images outside the task are absent
    class_names: list[str]


@register_datamodule("celeba")
class CelebADataModule(FileDataModule):
    splits = ("train", "val", "test")
    layout = """
celeba/
  img_align_celeba/
    000001.jpg ...
  list_eval_partition.txt     '000001.jpg 0'  (0 train, 1 val, 2 test)
  identity_CelebA.txt         '000001.jpg 2880'
  list_attr_celeba.txt        count line, 40 attribute names, '000001.jpg -1 1 ...'
                              (only for an attribute target)
"""
    source = (
        "CelebA, https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive; the aligned "
        "images and the Anno/Eval text files); non-commercial research and education only, "
        "per the CelebA agreement"
    )

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        target: str = "identity",
        min_images_per_identity: int = 30,
        resolution: int = 32,
        grayscale: bool = False,
        crop_fraction: float = 0.8,
        **trial_options: Any,
    ) -> None:
        super().__init__(root=root, **trial_options)
        if min_images_per_identity < 1:
            raise ValueError("min_images_per_identity must be at least 1")
        self.target = target
        self.min_images_per_identity = min_images_per_identity
        self.spec = ImageSpec(resolution, 1 if grayscale else 3, crop_fraction)
        self.input_shape = (self.spec.channels, resolution, resolution)
        self.mean = IMAGENET_GREY_MEAN if grayscale else IMAGENET_MEAN
        self.std = IMAGENET_GREY_STD if grayscale else IMAGENET_STD
        self._index: _Index | None = None

    @property
    def base(self) -> Path:
        return self.root / "celeba"

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.index().class_names)

    @property
    def class_names(self) -> list[str]:
        return self.index().class_names

    def load_split(self, split: str) -> ImageFileDataset:
        index = self.index()
        code = SPLIT_CODES[split]
        files = [f for f, c in index.split_of.items() if c == code and f in index.label_of]
        if not files:
            raise DatasetError(
                f"{self.base / PARTITION_FILE}: no image of split {split!r} (code {code}) "
                f"belongs to the task ({self._task()})"
            )
        images_dir = self.require_dir(
            self.base / "img_align_celeba", "the aligned images 000001.jpg ..."
        )
        paths = [images_dir / f for f in files]
        self.require_images(paths, str(self.base / PARTITION_FILE))
        return ImageFileDataset(
            paths,
            [index.label_of[f] for f in files],
            [f"celeba/{Path(f).stem}" for f in files],
            self.spec,
            self.mean,
            self.std,
            groups=[str(index.identity_of[f]) for f in files],
        )

    def index(self) -> _Index:
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def _task(self) -> str:
        if self.target == "identity":
            return f"identities with at least {self.min_images_per_identity} images"
        return f"attribute {self.target}"

    def _build_index(self) -> _Index:
        partition_path = self.require_file(
            self.base / PARTITION_FILE, "lines '<image>.jpg <0|1|2>' (train, val, test)"
        )
        identity_path = self.require_file(
            self.base / IDENTITY_FILE, "lines '<image>.jpg <identity number>'"
        )
        split_of = _read_pairs(partition_path, "<image>.jpg <0|1|2>")
        bad = next(((f, c) for f, c in split_of.items() if c not in (0, 1, 2)), None)
        if bad:
            raise DatasetError(f"{partition_path}: split code {bad[1]} of {bad[0]} is not 0/1/2")
        identity_of = _read_pairs(identity_path, "<image>.jpg <identity number>")
        unknown = [f for f in split_of if f not in identity_of]
        if unknown:
            raise DatasetError(
                f"{identity_path}: no identity for {len(unknown)} images of {PARTITION_FILE}, "
                f"e.g. {unknown[0]}"
            )
        if self.target == "identity":
            counts = Counter(identity_of[f] for f in split_of)
            kept = sorted(i for i, n in counts.items() if n >= self.min_images_per_identity)
            if not kept:
                raise DatasetError(
                    f"{identity_path}: no identity has at least {self.min_images_per_identity} "
                    f"images (the most is {max(counts.values())})"
                )
            rank = {identity: label for label, identity in enumerate(kept)}
            label_of = {f: rank[identity_of[f]] for f in split_of if identity_of[f] in rank}
            return _Index(split_of, identity_of, label_of, [f"identity {i}" for i in kept])
        attributes = self._read_attribute()
        missing = [f for f in split_of if f not in attributes]
        if missing:
            raise DatasetError(
                f"{self.base / ATTRIBUTE_FILE}: no row for {len(missing)} images of "
                f"{PARTITION_FILE}, e.g. {missing[0]}"
            )
        label_of = {f: attributes[f] for f in split_of}
        return _Index(split_of, identity_of, label_of, [f"not {self.target}", self.target])

    def _read_attribute(self) -> dict[str, int]:
        """Image -> 0/1 value of the target attribute."""
        path = self.require_file(
            self.base / ATTRIBUTE_FILE,
            "a count line, a line of 40 attribute names, then '<image>.jpg' and ±1 per attribute",
        )
        lines = path.read_text().splitlines()
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise DatasetError(f"{path}:1: expected the number of images, then attribute names")
        names = lines[1].split()
        if self.target not in names:
            raise ValueError(
                f"unknown CelebA target {self.target!r}; valid: identity, {', '.join(names)}"
            )
        column = names.index(self.target) + 1
        values = {}
        for lineno, line in enumerate(lines[2:], start=3):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != len(names) + 1 or fields[column] not in ("1", "-1"):
                raise DatasetError(
                    f"{path}:{lineno}: expected '<image>.jpg' and {len(names)} values of ±1, "
                    f"got {line!r}"
                )
            values[fields[0]] = int(fields[column] == "1")
        if len(values) != int(lines[0]):
            raise DatasetError(
                f"{path}: the first line announces {int(lines[0])} images, found {len(values)}"
            )
        return values

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "target": self.target,
            "min_images_per_identity": self.min_images_per_identity,
            "resolution": self.spec.resolution,
            "crop_fraction": self.spec.crop_fraction,
        }


def _read_pairs(path: Path, expected: str) -> dict[str, int]:
    """``<image> <int>`` lines as a dict, in file order."""
    pairs: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise DatasetError(f"{path}:{lineno}: expected '{expected}', got {line!r}")
        pairs[fields[0]] = int(fields[1])
    if not pairs:
        raise DatasetError(f"{path}: empty; expected lines '{expected}'")
    return pairs
