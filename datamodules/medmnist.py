"""MedMNIST v2 2D datasets (Yang et al., Scientific Data 2023), read from their ``.npz`` files.

One datamodule per flag, registered under the flag's name: ``retinamnist`` (diabetic
retinopathy grade, 5 classes, from DeepDRiD) and the other single-label 2D sets
``pathmnist``, ``dermamnist``, ``octmnist``, ``pneumoniamnist``, ``breastmnist``,
``bloodmnist``, ``tissuemnist``, ``organamnist``, ``organcmnist``, ``organsmnist``.
ChestMNIST is left out: its 14 labels are multi-label, and an update here is the gradient of
a single-label cross-entropy.

File: ``root/<flag>.npz`` for 28 px, ``root/<flag>_<size>.npz`` for ``size`` 64/128/224 (the
MedMNIST+ release). Keys ``{train,val,test}_images`` (uint8, (N, H, W) grey or (N, H, W, 3)
RGB) and ``{train,val,test}_labels`` (integers, (N, 1)). The file is read with numpy, not the
``medmnist`` package (which writes ``~/.medmnist`` on import and insists on the official counts).

``download=True`` fetches the file from Zenodo record 10519652 (MedMNIST v3.0) and verifies
its MD5 (the values of ``medmnist/info.py`` 3.0.2); ``leakbench data check`` reports whether a
file on disk matches the official MD5. Splits: the official ``train``/``val``/``test``. The
images keep their native size (``input_shape`` = (C, size, size)); there is no patient id in
the files, so no ``group`` partition. Normalisation: mean 0.5, std 0.5 per channel, the
MedMNIST reference preprocessing.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leakbench.datamodules.base import DatasetError, FileDataModule, SampleDataset
from leakbench.registry import register_datamodule

SIZES = (28, 64, 128, 224)
ZENODO_RECORD = "https://zenodo.org/records/10519652/files"


@dataclass(frozen=True)
class Flag:
    name: str
    channels: int
    class_names: tuple[str, ...]
    licence: str
    md5: dict[int, str]  # image size -> MD5 of the official file


_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
    "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip

FLAGS = {
    f.name: f
    for f in (
        Flag(
            "pathmnist",
            3,
            (
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ),  # fmt: skip
            "CC BY 4.0",
            {
                28: "a8b06965200029087d5bd730944a56c1",
                64: "55aa9c1e0525abe5a6b9d8343a507616",
                128: "ac42d08fb904d92c244187169d1fd1d9",
                224: "2c51a510bcdc9cf8ddb2af93af1eadec",
            },
        ),
        Flag(
            "dermamnist",
            3,
            (
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ),  # fmt: skip
            "CC BY-NC 4.0",
            {
                28: "0744692d530f8e62ec473284d019b0c7",
                64: "b70a2f5635c6199aeaa28c31d7202e1f",
                128: "2defd784463fa5243564e855ed717de1",
                224: "8974907d8e169bef5f5b96bc506ae45d",
            },
        ),
        Flag(
            "octmnist",
            1,
            ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
            "CC BY 4.0",
            {
                28: "c68d92d5b585d8d81f7112f81e2d0842",
                64: "e229e9440236b774d9f0dfef9d07bdaf",
                128: "0a97e76651ace45c5d943ee3f65b63ae",
                224: "abc493b6d529d5de7569faaef2773ba3",
            },
        ),
        Flag(
            "pneumoniamnist",
            1,
            ("normal", "pneumonia"),
            "CC BY 4.0",
            {
                28: "28209eda62fecd6e6a2d98b1501bb15f",
                64: "8f4eceb4ccffa70c672198ea285246c6",
                128: "05b46931834c231683c68f40c47b2971",
                224: "d6a3c71de1b945ea11211b03746c1fe1",
            },
        ),
        Flag(
            "retinamnist",
            3,
            ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"),
            "CC BY 4.0",
            {
                28: "bd4c0672f1bba3e3a89f0e4e876791e4",
                64: "afda852cc34dcda56f86ad2b2457dbcc",
                128: "e48e916a24454daf90583d4e6efb1a18",
                224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
            },
        ),
        Flag(
            "breastmnist",
            1,
            ("malignant", "normal, benign"),
            "CC BY 4.0",
            {
                28: "750601b1f35ba3300ea97c75c52ff8f6",
                64: "742edef2a1fd1524b2efff4bd7ba9364",
                128: "363e4b3f8d712e9b5de15470a2aaadf1",
                224: "b56378a6eefa9fed602bb16d192d4c8b",
            },
        ),
        Flag(
            "bloodmnist",
            3,
            (
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ),  # fmt: skip
            "CC BY 4.0",
            {
                28: "7053d0359d879ad8a5505303e11de1dc",
                64: "2b94928a2ae4916078ca51e05b6b800b",
                128: "adace1e0ed228fccda1f39692059dd4c",
                224: "b718ff6835fcbdb22ba9eacccd7b2601",
            },
        ),
        Flag(
            "tissuemnist",
            1,
            (
                "collecting duct, connecting tubule",
                "distal convoluted tubule",
                "glomerular endothelial cells",
                "interstitial endothelial cells",
                "leukocytes",
                "podocytes",
                "proximal tubule segments",
                "thick ascending limb",
            ),  # fmt: skip
            "CC BY 4.0",
            {
                28: "ebe78ee8b05294063de985d821c1c34b",
                64: "123ece2eba09d0aa5d698fda57103344",
                128: "61b955355d7425a89687b06cca3ce0c2",
                224: "b077128c4a949f0a4eb01517f9037b9c",
            },
        ),
        Flag(
            "organamnist",
            1,
            _ORGANS,
            "CC BY 4.0",
            {
                28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
                64: "2dcccc29b88e6da5a01161ef20cda288",
                128: "eeae80d0a227a8d099027e1b3cfd3b60",
                224: "50747347e05c87dd3aaf92c49f9f3170",
            },
        ),
        Flag(
            "organcmnist",
            1,
            _ORGANS,
            "CC BY 4.0",
            {
                28: "b9ceb9546e10131b32923c5bbeaea2b1",
                64: "3ce34a8724ea6f548e6db4744d03b6a9",
                128: "773c1f009daa3fe5d9a2a201b2a7ed94",
                224: "050f5e875dc056f6768abf94ec9995d1",
            },
        ),
        Flag(
            "organsmnist",
            1,
            _ORGANS,
            "CC BY 4.0",
            {
                28: "9ab87b696fb54e2a387ebe992d6ed5f1",
                64: "53a6d115339d874c25e309a994ff46d3",
                128: "ded0c5fa01a95dc4978b956f613e9b8e",
                224: "b354719e553fbbb2513d5533f52a4cb1",
            },
        ),
    )
}


def npz_name(flag: str, size: int) -> str:
    """The official file name: ``retinamnist.npz``, ``retinamnist_224.npz``, ..."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


class MedMNISTDataModule(FileDataModule):
    """One MedMNIST 2D flag; concrete subclasses per flag are registered below."""

    flag: Flag
    splits = ("train", "val", "test")
    can_download = True
    source = (
        "MedMNIST v3.0, https://medmnist.com, Zenodo record 10519652 (download=True fetches it "
        "and checks its MD5); licence per flag: CC BY 4.0, DermaMNIST CC BY-NC 4.0"
    )

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        size: int = 28,
        **trial_options: Any,
    ) -> None:
        super().__init__(root=root, **trial_options)
        if size not in SIZES:
            raise ValueError(f"unknown MedMNIST size {size}; valid: {', '.join(map(str, SIZES))}")
        self.size = size
        self.input_shape = (self.flag.channels, size, size)
        self.num_classes = len(self.flag.class_names)
        self.class_names = list(self.flag.class_names)
        self.mean = (0.5,) * self.flag.channels
        self.std = (0.5,) * self.flag.channels

    @property
    def layout(self) -> str:  # type: ignore[override]
        return f"{npz_name(self.flag.name, self.size)}   keys " + ", ".join(
            f"{s}_images, {s}_labels" for s in self.splits
        )

    @property
    def path(self) -> Path:
        return self.root / npz_name(self.flag.name, self.size)

    @property
    def url(self) -> str:
        return f"{ZENODO_RECORD}/{npz_name(self.flag.name, self.size)}?download=1"

    def download_files(self) -> None:
        from torchvision.datasets.utils import check_integrity, download_url

        md5 = self.flag.md5[self.size]
        if check_integrity(str(self.path), md5):
            return
        download_url(self.url, str(self.root), self.path.name, md5)

    def load_split(self, split: str) -> SampleDataset:
        if self.download:
            self.download_files()
        path = self.require_file(
            self.path, f"the MedMNIST archive (download=True fetches {self.url})"
        )
        images, labels = self._read_npz(path, (f"{split}_images", f"{split}_labels"))
        images = self._check_images(path, f"{split}_images", images)
        labels = self._check_labels(path, f"{split}_labels", labels, len(images))
        pixels = torch.from_numpy(images)
        pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
        ids = [f"{self.flag.name}/{split}/{i}" for i in range(len(labels))]
        return SampleDataset(
            pixels.contiguous(), torch.from_numpy(labels), ids, self.mean, self.std
        )

    def _read_npz(self, path: Path, keys: tuple[str, str]) -> list[np.ndarray]:
        expected = ", ".join(f"{s}_images, {s}_labels" for s in self.splits)
        try:
            with np.load(path) as archive:
                missing = [k for k in keys if k not in archive.files]
                if not missing:
                    return [archive[k] for k in keys]
                found = ", ".join(archive.files) or "none"
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{path}: not a readable .npz archive ({exc})") from exc
        raise DatasetError(
            f"{path}: no key {', '.join(missing)}; expected {expected}, found {found}"
        )

    def _check_images(self, path: Path, key: str, images: np.ndarray) -> np.ndarray:
        c, s = self.flag.channels, self.size
        expected = (s, s) if c == 1 else (s, s, 3)
        if (
            images.dtype != np.uint8
            or images.ndim != len(expected) + 1
            or (images.shape[1:] != expected)
        ):
            raise DatasetError(
                f"{path}: {key} is {images.dtype} {images.shape}; expected uint8 "
                f"(N, {', '.join(map(str, expected))})"
            )
        if len(images) == 0:
            raise DatasetError(f"{path}: {key} holds no images")
        return images

    def _check_labels(self, path: Path, key: str, labels: np.ndarray, n: int) -> np.ndarray:
        labels = labels.reshape(len(labels), -1) if labels.ndim else labels
        if labels.ndim != 2 or labels.shape != (n, 1) or labels.dtype.kind not in "iu":
            raise DatasetError(
                f"{path}: {key} is {labels.dtype} {labels.shape}; expected integers ({n}, 1)"
            )
        labels = labels[:, 0].astype(np.int64)
        k = self.num_classes
        if labels.min() < 0 or labels.max() >= k:
            raise DatasetError(
                f"{path}: {key} ranges over {labels.min()}..{labels.max()}; expected 0..{k - 1}"
            )
        return labels

    def check_notes(self) -> list[str]:
        if not self.path.is_file():
            return []
        digest = hashlib.md5()
        with self.path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        official = self.flag.md5[self.size]
        if digest.hexdigest() == official:
            return [f"{self.path.name}: MD5 matches the official MedMNIST file"]
        return [
            f"{self.path.name}: MD5 {digest.hexdigest()} differs from the official {official} "
            "(not the released file)"
        ]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "size": self.size}


# One registered subclass per flag, kept as module attributes so that they pickle.
for _flag in FLAGS.values():
    _name = f"{_flag.name.removesuffix('mnist').capitalize()}MNISTDataModule"
    _cls = type(_name, (MedMNISTDataModule,), {"flag": _flag, "__module__": __name__})
    globals()[_name] = register_datamodule(_flag.name)(_cls)
