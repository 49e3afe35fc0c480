"""``isic``: dermoscopic lesion diagnosis from the ISIC challenges, three editions.

``edition="2018"`` (default): ISIC 2018 Task 3 (Codella et al., 2019; its training set is
HAM10000, Tschandl et al., 2018), 7 classes MEL, NV, BCC, AKIEC, BKL, DF, VASC.

- images ``ISIC2018_Task3_{Training,Validation,Test}_Input/ISIC_<7 digits>.jpg``;
- ground truth ``ISIC2018_Task3_{...}_GroundTruth.csv``, in ``root`` or in the
  ``ISIC2018_Task3_{...}_GroundTruth/`` folder its zip extracts to: columns ``image`` and the
  seven one-hot class columns (``score_weight``/``validation_weight`` are tolerated);
- optional ``ISIC2018_Task3_{...}_LesionGroupings.csv`` (``image``, ``lesion_id``, optional
  ``diagnosis_confirm_type``): the lesion of each image, for ``group`` client partitions.

Splits: the official Training/Validation/Test as ``train``/``val``/``test``.

``edition="ham10000"``: the HAM10000 release itself, ``HAM10000_metadata.csv`` (``lesion_id``,
``image_id``, ``dx``; ``dx_type``, ``age``, ``sex``, ``localization``, ``dataset`` tolerated)
with images in ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``; same 7 classes
(``dx`` mel, nv, bcc, akiec, bkl, df, vasc). No official split: a lesion-disjoint split
seeded by ``split_seed`` puts 70/10/20% of the lesions in ``train``/``val``/``test``.

``edition="2017"``: ISIC 2017 Part 3 (Codella et al., 2018), 3 classes melanoma, seborrheic
keratosis, nevus (neither flag set). Images ``ISIC-2017_{Training,Validation,Test_v2}_Data/
ISIC_<7 digits>.jpg``, ground truth ``ISIC-2017_{...}_Part3_GroundTruth.csv`` with columns
``image_id``, ``melanoma``, ``seborrheic_keratosis``; official splits; no lesion ids.

A ground-truth or metadata CSV with a column outside these lists is refused: its labels
would mean something else. No download: the ISIC archive serves the files through its
challenge site, not a stable checksummed URL.

Preprocessing: a centered square of the shorter side, resized to ``resolution`` (default 32;
64 for a finer benchmark), RGB. Normalisation: ImageNet mean/std.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakbench.datamodules.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    FileDataModule,
    ImageFileDataset,
    ImageSpec,
)
from leakbench.datamodules.partition import group_split
from leakbench.registry import register_datamodule

CLASSES_2018 = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
CLASSES_2017 = ("melanoma", "seborrheic_keratosis", "nevus")
SPLIT_NAMES_2018 = {"train": "Training", "val": "Validation", "test": "Test"}
SPLIT_NAMES_2017 = {"train": "Training", "val": "Validation", "test": "Test_v2"}
HAM_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
HAM_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
EDITIONS = ("2018", "ham10000", "2017")


@dataclass(frozen=True)
class _Split:
    image_ids: list[str]
    labels: list[int]
    paths: list[Path]
    lesions: list[str] | None
    listed_in: Path


@register_datamodule("isic")
class ISICDataModule(FileDataModule):
    splits = ("train", "val", "test")
    layout = """
edition 2018:
  ISIC2018_Task3_Training_Input/ISIC_0024306.jpg ...   (also _Validation_, _Test_)
  ISIC2018_Task3_Training_GroundTruth.csv               image,MEL,NV,BCC,AKIEC,BKL,DF,VASC
    (or ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv)
  ISIC2018_Task3_Training_LesionGroupings.csv           optional: image,lesion_id,...
edition ham10000:
  HAM10000_metadata.csv                                 lesion_id,image_id,dx,...
  HAM10000_images_part_1/ISIC_0024306.jpg ...
  HAM10000_images_part_2/ISIC_0029306.jpg ...
edition 2017:
  ISIC-2017_Training_Data/ISIC_0000000.jpg ...          (also _Validation_, _Test_v2_)
  ISIC-2017_Training_Part3_GroundTruth.csv              image_id,melanoma,seborrheic_keratosis
"""
    source = (
        "ISIC challenge data, https://challenge.isic-archive.com/data/ (2017 Part 3; 2018 Task 3); "
        "HAM10000, https://doi.org/10.7910/DVN/DBW86T (Harvard Dataverse); 2018 / HAM10000 "
        "under CC BY-NC 4.0, 2017 under the terms on the ISIC data page"
    )

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        edition: str | int = "2018",
        resolution: int = 32,
        split_seed: int = 0,
        **trial_options: Any,
    ) -> None:
        super().__init__(root=root, **trial_options)
        edition = str(edition)  # YAML reads `edition: 2017` as a number
        if edition not in EDITIONS:
            raise ValueError(f"unknown ISIC edition {edition!r}; valid: {', '.join(EDITIONS)}")
        self.edition = edition
        self.split_seed = split_seed
        self.class_names = list(CLASSES_2017 if edition == "2017" else CLASSES_2018)
        self.num_classes = len(self.class_names)
        self.spec = ImageSpec(resolution, 3, 1.0)
        self.input_shape = (3, resolution, resolution)
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    def load_split(self, split: str) -> ImageFileDataset:
        if self.edition == "2018":
            part = self._split_2018(split)
        elif self.edition == "ham10000":
            part = self._split_ham(split)
        else:
            part = self._split_2017(split)
        self.require_images(part.paths, str(part.listed_in))
        return ImageFileDataset(
            part.paths,
            part.labels,
            [f"isic/{i}" for i in part.image_ids],
            self.spec,
            self.mean,
            self.std,
            groups=part.lesions,
        )

    def _split_2018(self, split: str) -> _Split:
        stem = f"ISIC2018_Task3_{SPLIT_NAMES_2018[split]}"
        gt_name = f"{stem}_GroundTruth.csv"
        nested = self.root / f"{stem}_GroundTruth" / gt_name
        gt_path = nested if nested.is_file() else self.root / gt_name
        self.require_file(
            gt_path,
            f"columns image,{','.join(CLASSES_2018)} (one-hot), in {self.root} "
            f"or in {nested.parent}",
        )
        rows = _read_csv(gt_path, ("image", *CLASSES_2018), ("score_weight", "validation_weight"))
        image_ids, labels = [], []
        for lineno, row in rows:
            flags = [_flag(gt_path, lineno, row, c) for c in CLASSES_2018]
            if sum(flags) != 1:
                raise DatasetError(f"{gt_path}:{lineno}: expected exactly one class set to 1")
            image_ids.append(row["image"])
            labels.append(flags.index(1))
        images_dir = self.require_dir(self.root / f"{stem}_Input", "the ISIC_<id>.jpg images")
        lesions = None
        groupings = self.root / f"{stem}_LesionGroupings.csv"
        if groupings.is_file():
            lesion_of = {
                row["image"]: row["lesion_id"]
                for _, row in _read_csv(
                    groupings, ("image", "lesion_id"), ("diagnosis_confirm_type",)
                )
            }
            unknown = [i for i in image_ids if i not in lesion_of]
            if unknown:
                raise DatasetError(
                    f"{groupings}: no lesion_id for {len(unknown)} images, e.g. {unknown[0]}"
                )
            lesions = [lesion_of[i] for i in image_ids]
        paths = [images_dir / f"{i}.jpg" for i in image_ids]
        return _Split(image_ids, labels, paths, lesions, gt_path)

    def _split_ham(self, split: str) -> _Split:
        path = self.require_file(
            self.root / "HAM10000_metadata.csv", "columns lesion_id,image_id,dx,... (HAM10000)"
        )
        rows = _read_csv(
            path,
            ("lesion_id", "image_id", "dx"),
            ("dx_type", "age", "sex", "localization", "dataset"),
        )
        codes = [c.lower() for c in CLASSES_2018]
        for lineno, row in rows:
            if row["dx"] not in codes:
                raise DatasetError(
                    f"{path}:{lineno}: dx {row['dx']!r} is not one of {', '.join(codes)}"
                )
        parts = group_split([row["lesion_id"] for _, row in rows], HAM_FRACTIONS, self.split_seed)
        chosen = [rows[i][1] for i in parts[split]]
        located: dict[str, Path] = {}
        for folder in HAM_IMAGE_DIRS:
            if (self.root / folder).is_dir():
                located.update((p.stem, p) for p in (self.root / folder).glob("*.jpg"))
        if not located:
            raise self.not_found(
                f"no images in {' or '.join(str(self.root / d) for d in HAM_IMAGE_DIRS)}"
            )
        image_ids = [row["image_id"] for row in chosen]
        paths = [located.get(i, self.root / HAM_IMAGE_DIRS[0] / f"{i}.jpg") for i in image_ids]
        return _Split(
            image_ids,
            [codes.index(row["dx"]) for row in chosen],
            paths,
            [row["lesion_id"] for row in chosen],
            path,
        )

    def _split_2017(self, split: str) -> _Split:
        name = SPLIT_NAMES_2017[split]
        gt_path = self.require_file(
            self.root / f"ISIC-2017_{name}_Part3_GroundTruth.csv",
            "columns image_id,melanoma,seborrheic_keratosis",
        )
        rows = _read_csv(gt_path, ("image_id", "melanoma", "seborrheic_keratosis"), ())
        image_ids, labels = [], []
        for lineno, row in rows:
            melanoma = _flag(gt_path, lineno, row, "melanoma")
            keratosis = _flag(gt_path, lineno, row, "seborrheic_keratosis")
            if melanoma and keratosis:
                raise DatasetError(f"{gt_path}:{lineno}: both melanoma and seborrheic_keratosis")
            image_ids.append(row["image_id"])
            labels.append(0 if melanoma else 1 if keratosis else 2)
        images_dir = self.require_dir(
            self.root / f"ISIC-2017_{name}_Data", "the ISIC_<id>.jpg images"
        )
        paths = [images_dir / f"{i}.jpg" for i in image_ids]
        return _Split(image_ids, labels, paths, None, gt_path)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "edition": self.edition,
            "resolution": self.spec.resolution,
            "split_seed": self.split_seed,
        }


def _read_csv(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...]
) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; the header must hold ``required`` and nothing unknown."""
    with path.open(newline="") as f:
        header_line = f.readline()
        delimiter = "\t" if "\t" in header_line and "," not in header_line else ","
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        unknown = [c for c in columns if c not in required and c not in optional]
        if missing or unknown:
            problem = "; ".join(
                p
                for p in (
                    f"missing columns {', '.join(missing)}" if missing else "",
                    f"unknown columns {', '.join(unknown)}" if unknown else "",
                )
                if p
            )
            allowed = f" (optionally {', '.join(optional)})" if optional else ""
            raise DatasetError(
                f"{path}: {problem}; expected columns {', '.join(required)}{allowed}"
            )
        reader.fieldnames = columns
        rows = []
        for row in reader:
            if None in row:  # DictReader files surplus fields under the key None
                raise DatasetError(f"{path}:{reader.line_num}: more fields than columns")
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    if not rows:
        raise DatasetError(f"{path}: no rows below the header")
    return rows


def _flag(path: Path, lineno: int, row: dict[str, str], column: str) -> int:
    """A 0/1 ground-truth cell (written 0, 1, 0.0 or 1.0)."""
    try:
        value = float(row[column])
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        raise DatasetError(f"{path}:{lineno}: {column} is {row[column]!r}; expected 0 or 1")
    return int(value)
