"""``chestxray``: pediatric pneumonia from chest X-rays (Kermany et al., Cell 2018).

Layout (the Kaggle "chest-xray-pneumonia" archive, folder ``chest_xray/``):
``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. Labels: NORMAL 0, PNEUMONIA 1. Files
other than .jpeg/.jpg/.png (``.DS_Store``) are skipped; an empty class folder is an error.

Patients, parsed from the file names: ``person<P>_bacteria_<N>.jpeg`` and
``person<P>_virus_<N>.jpeg`` are patient ``person<P>``; ``IM-<P>-<N>.jpeg`` and
``NORMAL2-IM-<P>-<N>.jpeg`` are patients ``IM-<P>`` and ``NORMAL2-IM-<P>``; any other name is
its own patient. They are the groups of the ``group`` client partition.

Splits: ``split_by="official"`` (default) keeps the archive's folders (its ``val`` holds 16
images; ``leakbench data check`` reports patients found in more than one folder).
``split_by="patient"`` pools every split folder present and makes a patient-disjoint split,
seeded by ``split_seed``, with 70/10/20% of the patients in ``train``/``val``/``test``.

Preprocessing: grey; a centered square of the shorter side resized to ``resolution``
(default 32), as PneumoniaMNIST does. Normalisation: mean 0.5, std 0.5 (the MedMNIST
convention for the same images). No download: the data sits behind Kaggle and Mendeley logins.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakbench.datamodules.base import FileDataModule, ImageFileDataset, ImageSpec
from leakbench.datamodules.partition import group_split
from leakbench.registry import register_datamodule

CLASSES = ("NORMAL", "PNEUMONIA")
SPLIT_DIRS = ("train", "val", "test")
EXTENSIONS = (".jpeg", ".jpg", ".png")
PATIENT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_BY = ("official", "patient")
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$"),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+$"),
)


def patient_of(stem: str) -> str:
    """The patient id in a Kermany file name (without extension); the name itself if none."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


@dataclass(frozen=True)
class _Image:
    path: Path
    folder: str  # the split folder it lies in
    label: int

    @property
    def sample_id(self) -> str:
        return f"chestxray/{self.folder}/{CLASSES[self.label]}/{self.path.stem}"

    @property
    def patient(self) -> str:
        return patient_of(self.path.stem)


@register_datamodule("chestxray")
class ChestXrayDataModule(FileDataModule):
    splits = ("train", "val", "test")
    num_classes = 2
    class_names = list(CLASSES)
    layout = """
train/
  NORMAL/IM-0115-0001.jpeg ...
  PNEUMONIA/person1_bacteria_1.jpeg ...
val/
  NORMAL/ ...  PNEUMONIA/ ...
test/
  NORMAL/ ...  PNEUMONIA/ ...
"""
    source = (
        "Kermany et al. 2018, Mendeley Data doi:10.17632/rscbjbr9sj.2 (ChestXRay2017), or the "
        "Kaggle mirror paultimothymooney/chest-xray-pneumonia (folder chest_xray/); CC BY 4.0"
    )

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        resolution: int = 32,
        split_by: str = "official",
        split_seed: int = 0,
        **trial_options: Any,
    ) -> None:
        super().__init__(root=root, **trial_options)
        if split_by not in SPLIT_BY:
            raise ValueError(f"unknown split_by {split_by!r}; valid: {', '.join(SPLIT_BY)}")
        self.split_by = split_by
        self.split_seed = split_seed
        self.spec = ImageSpec(resolution, 1, 1.0)
        self.input_shape = (1, resolution, resolution)
        self.mean = (0.5,)
        self.std = (0.5,)

    def load_split(self, split: str) -> ImageFileDataset:
        if self.split_by == "official":
            images = self._folder(split)
        else:
            pooled = [image for folder in self._present_folders() for image in self._folder(folder)]
            parts = group_split([i.patient for i in pooled], PATIENT_FRACTIONS, self.split_seed)
            images = [pooled[i] for i in parts[split]]
        return ImageFileDataset(
            [i.path for i in images],
            [i.label for i in images],
            [i.sample_id for i in images],
            self.spec,
            self.mean,
            self.std,
            groups=[i.patient for i in images],
        )

    def _present_folders(self) -> list[str]:
        present = [s for s in SPLIT_DIRS if (self.require_root() / s).is_dir()]
        if not present:
            raise self.not_found(f"{self.root} holds none of the folders {', '.join(SPLIT_DIRS)}")
        return present

    def _folder(self, folder: str) -> list[_Image]:
        split_dir = self.require_dir(self.root / folder, "the class folders NORMAL/, PNEUMONIA/")
        images = []
        for label, name in enumerate(CLASSES):
            class_dir = self.require_dir(split_dir / name, f"the {name} X-rays of {folder}")
            paths = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in EXTENSIONS)
            if not paths:
                raise self.not_found(
                    f"{class_dir} holds no image; expected {', '.join(EXTENSIONS)} files"
                )
            images += [_Image(p, folder, label) for p in paths]
        return images

    def check_notes(self) -> list[str]:
        folders_of: dict[str, set[str]] = defaultdict(set)
        unparsed = 0
        for folder in self._present_folders():
            for image in self._folder(folder):
                folders_of[image.patient].add(folder)
                unparsed += image.patient == image.path.stem
        shared = sorted(p for p, fs in folders_of.items() if len(fs) > 1)
        notes = [f"{len(folders_of)} patients; {unparsed} file names carry no patient id"]
        if shared:
            notes.append(
                f"{len(shared)} patients appear in more than one split folder (e.g. {shared[0]}); "
                "split_by=patient gives patient-disjoint splits"
            )
        return notes

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "resolution": self.spec.resolution,
            "split_by": self.split_by,
            "split_seed": self.split_seed,
        }
