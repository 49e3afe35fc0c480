"""Tiny copies of each dataset in its real on-disk format, for tests and end-to-end runs.

Every ``write_<name>_fixture(root)`` writes files the way the upstream release lays them out
(JPEG/PNG images, split and ground-truth text/CSV files, npz archives) under ``root`` and
returns the folder to pass as the datamodule's ``root``. Images are uniform colours drawn from
a fixed seed, so the same call always writes the same bytes, and every split holds enough
images for several trials of batch size 4 with the datamodule's default options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from leakbench.datamodules.celeba import ATTRIBUTE_FILE, IDENTITY_FILE, PARTITION_FILE
from leakbench.datamodules.isic import CLASSES_2018, HAM_IMAGE_DIRS
from leakbench.datamodules.medmnist import FLAGS, npz_name

# LFW: (name, image count, development split); Fay_Fox and Gus_Gray fall below 20 images.
LFW_PEOPLE = (
    ("Ann_Archer", 20, "train"),
    ("Bob_Brown", 21, "train"),
    ("Cid_Chan", 20, "train"),
    ("Fay_Fox", 3, "train"),
    ("Dee_Dunn", 20, "test"),
    ("Eve_Estes", 22, "test"),
    ("Gus_Gray", 2, "test"),
)
# CelebA: identity number -> (image count, split code); identity 106 is below 30 images.
CELEBA_IDENTITIES = {
    101: (30, 0),
    102: (31, 0),
    103: (30, 0),
    106: (2, 0),
    104: (30, 1),
    105: (30, 2),
    107: (30, 2),
}
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
CELEBA_LANDMARKS = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
    "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
).split()
# Chest X-ray: split folder -> class folder -> file stems (Kermany naming); person1 is in both
# train and test, as patients can be in the official release.
CHESTXRAY_FILES = {
    "train": {
        "NORMAL": [
            "IM-0001-0001", "IM-0001-0002", "IM-0002-0001", "NORMAL2-IM-0003-0001",
            "NORMAL2-IM-0004-0001", "IM-0005-0001",
        ],
        "PNEUMONIA": [
            "person1_bacteria_1", "person1_bacteria_2", "person2_virus_3", "person3_bacteria_4",
            "person4_virus_5", "person5_bacteria_6", "person6_virus_7",
        ],
    },
    "val": {
        "NORMAL": ["NORMAL2-IM-0020-0001", "NORMAL2-IM-0021-0001"],
        "PNEUMONIA": ["person20_bacteria_40", "person21_virus_41"],
    },
    "test": {
        "NORMAL": [
            "IM-0010-0001", "IM-0011-0001", "IM-0011-0002", "NORMAL2-IM-0012-0001",
            "IM-0013-0001",
        ],
        "PNEUMONIA": [
            "person10_virus_20", "person10_virus_21", "person11_bacteria_22",
            "person12_bacteria_23", "person13_virus_24", "person1_bacteria_30",
        ],
    },
}  # fmt: skip


class _Painter:
    """Writes uniform-colour images with colours from one seeded stream."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def write(self, path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = 1 if mode == "L" else 3
        colour = tuple(int(v) for v in self.rng.integers(40, 216, channels))
        image = Image.new(mode, size, colour[0] if mode == "L" else colour)
        if path.suffix.lower() == ".png":
            image.save(path)
        else:
            image.save(path, format="JPEG", quality=95)


def write_lfw_fixture(
    root: Path, image_size: tuple[int, int] = (50, 50), people_files: bool = True
) -> Path:
    """torchvision's LFWPeople layout: ``lfw-py/lfw_funneled/<Name>/<Name>_<NNNN>.jpg``.

    Writes ``peopleDevTrain.txt``/``peopleDevTest.txt`` (unless ``people_files`` is False)
    and ``lfw-names.txt``. The real images are 250×250; ``image_size`` keeps them small.
    """
    base = Path(root) / "lfw-py"
    painter = _Painter(seed=1)
    for name, count, _ in LFW_PEOPLE:
        for number in range(1, count + 1):
            painter.write(base / "lfw_funneled" / name / f"{name}_{number:04d}.jpg", image_size)
    if people_files:
        for split, filename in (("train", "peopleDevTrain.txt"), ("test", "peopleDevTest.txt")):
            rows = [f"{name}\t{count}" for name, count, s in LFW_PEOPLE if s == split]
            (base / filename).write_text("\n".join([str(len(rows)), *rows]) + "\n")
    names = sorted((name, count) for name, count, _ in LFW_PEOPLE)
    (base / "lfw-names.txt").write_text("".join(f"{n}\t{c}\n" for n, c in names))
    return Path(root)


def write_celeba_fixture(root: Path, image_size: tuple[int, int] = (36, 44)) -> Path:
    """torchvision's CelebA layout under ``celeba/``: aligned JPEGs and the five text files.

    File numbers are shuffled across identities, as in the release; the real crops are
    178×218 (``image_size`` keeps the aspect, smaller).
    """
    base = Path(root) / "celeba"
    rng = np.random.default_rng(2)
    owners = [i for i, (count, _) in CELEBA_IDENTITIES.items() for _ in range(count)]
    owners = [owners[k] for k in rng.permutation(len(owners))]
    files = [f"{k:06d}.jpg" for k in range(1, len(owners) + 1)]
    painter = _Painter(seed=3)
    for file in files:
        painter.write(base / "img_align_celeba" / file, image_size)
    (base / PARTITION_FILE).write_text(
        "".join(f"{f} {CELEBA_IDENTITIES[i][1]}\n" for f, i in zip(files, owners, strict=True))
    )
    (base / IDENTITY_FILE).write_text(
        "".join(f"{f} {i}\n" for f, i in zip(files, owners, strict=True))
    )
    attributes = rng.choice(["-1", " 1"], size=(len(files), len(CELEBA_ATTRIBUTES)))
    _write_celeba_table(
        base / ATTRIBUTE_FILE, " ".join(CELEBA_ATTRIBUTES), files, [" ".join(r) for r in attributes]
    )
    boxes = rng.integers(0, 200, size=(len(files), 4))
    _write_celeba_table(
        base / "list_bbox_celeba.txt",
        "image_id x_1 y_1 width height",
        files,
        [" ".join(map(str, r)) for r in boxes],
    )
    points = rng.integers(60, 160, size=(len(files), len(CELEBA_LANDMARKS)))
    _write_celeba_table(
        base / "list_landmarks_align_celeba.txt",
        " ".join(CELEBA_LANDMARKS),
        files,
        [" ".join(map(str, r)) for r in points],
    )
    return Path(root)


def _write_celeba_table(path: Path, header: str, files: list[str], rows: list[str]) -> None:
    lines = [str(len(files)), header, *(f"{f} {r}" for f, r in zip(files, rows, strict=True))]
    path.write_text("\n".join(lines) + "\n")


def write_medmnist_fixture(
    root: Path,
    flag: str = "retinamnist",
    size: int = 28,
    counts: Mapping[str, int] | None = None,
) -> Path:
    """``<flag>[_<size>].npz`` with the six official keys; labels (N, 1) cover every class."""
    info = FLAGS[flag]
    counts = counts or {"train": 24, "val": 8, "test": 16}
    rng = np.random.default_rng(4)
    shape = (size, size) if info.channels == 1 else (size, size, 3)
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % len(info.class_names))
        arrays[f"{split}_labels"] = labels.reshape(n, 1).astype(np.uint8)
    Path(root).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(Path(root) / npz_name(flag, size), **arrays)
    return Path(root)


def write_retinamnist_fixture(root: Path, size: int = 28) -> Path:
    return write_medmnist_fixture(root, "retinamnist", size)


def write_isic_fixture(
    root: Path, edition: str = "2018", image_size: tuple[int, int] = (48, 36)
) -> Path:
    """The ISIC release of ``edition`` (``2018``, ``ham10000`` or ``2017``).

    The real images are 600×450 (HAM10000) or larger; ``image_size`` keeps the landscape shape.
    """
    root = Path(root)
    painter = _Painter(seed=5)
    if edition == "2018":
        _write_isic_2018(root, painter, image_size)
    elif edition == "ham10000":
        _write_ham10000(root, painter, image_size)
    elif edition == "2017":
        _write_isic_2017(root, painter, image_size)
    else:
        raise ValueError(f"unknown ISIC edition {edition!r}")
    return root


def _write_isic_2018(root: Path, painter: _Painter, image_size: tuple[int, int]) -> None:
    number = 24306
    for split, per_class in (("Training", 3), ("Validation", 1), ("Test", 2)):
        stem = f"ISIC2018_Task3_{split}"
        truth = [f"image,{','.join(CLASSES_2018)}"]
        groupings = ["image,lesion_id,diagnosis_confirm_type"]
        for k in range(per_class * len(CLASSES_2018)):
            image = f"ISIC_{number:07d}"
            number += 1
            painter.write(root / f"{stem}_Input" / f"{image}.jpg", image_size)
            onehot = ["1.0" if c == k % len(CLASSES_2018) else "0.0" for c in range(7)]
            truth.append(f"{image},{','.join(onehot)}")
            groupings.append(f"{image},HAM_{k // 2:07d},histopathology")
        # The Training and Validation zips extract to a folder; the Test CSV sits in root.
        folder = root if split == "Test" else root / f"{stem}_GroundTruth"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}_GroundTruth.csv").write_text("\n".join(truth) + "\n")
        if split == "Training":
            (root / f"{stem}_LesionGroupings.csv").write_text("\n".join(groupings) + "\n")


def _write_ham10000(root: Path, painter: _Painter, image_size: tuple[int, int]) -> None:
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization,dataset"]
    codes = [c.lower() for c in CLASSES_2018]
    number = 24306
    for lesion in range(40):
        for _ in range(1 + lesion % 2):
            image = f"ISIC_{number:07d}"
            folder = HAM_IMAGE_DIRS[number % 2]
            number += 1
            painter.write(root / folder / f"{image}.jpg", image_size)
            dx = codes[lesion % len(codes)]
            rows.append(f"HAM_{lesion:07d},{image},{dx},histo,45.0,female,back,vidir_modern")
    root.mkdir(parents=True, exist_ok=True)
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")


def _write_isic_2017(root: Path, painter: _Painter, image_size: tuple[int, int]) -> None:
    number = 0
    for split, per_class in (("Training", 4), ("Validation", 2), ("Test_v2", 3)):
        data = root / f"ISIC-2017_{split}_Data"
        truth = ["image_id,melanoma,seborrheic_keratosis"]
        metadata = ["image_id,age_approximate,sex"]
        for k in range(per_class * 3):
            image = f"ISIC_{number:07d}"
            number += 1
            painter.write(data / f"{image}.jpg", image_size)
            painter.write(data / f"{image}_superpixels.png", image_size)  # shipped alongside
            melanoma, keratosis = k % 3 == 0, k % 3 == 1
            truth.append(f"{image},{float(melanoma)},{float(keratosis)}")
            metadata.append(f"{image},55,male")
        (data / f"ISIC-2017_{split}_Data_metadata.csv").write_text("\n".join(metadata) + "\n")
        (root / f"ISIC-2017_{split}_Part3_GroundTruth.csv").write_text("\n".join(truth) + "\n")


def write_chestxray_fixture(root: Path) -> Path:
    """The Kermany ``{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` folders, mixed image sizes
    and modes (most grey, one RGB, as in the release)."""
    root = Path(root)
    painter = _Painter(seed=6)
    for split, classes in CHESTXRAY_FILES.items():
        for name, stems in classes.items():
            for k, stem in enumerate(stems):
                size = (40, 48) if k % 2 else (48, 36)
                mode = "RGB" if (split, name, k) == ("train", "PNEUMONIA", 0) else "L"
                painter.write(root / split / name / f"{stem}.jpeg", size, mode)
    return root


# Registered dataset name -> writer of a fixture that loads with the default options.
FIXTURE_WRITERS: dict[str, Callable[[Path], Path]] = {
    "lfw": write_lfw_fixture,
    "celeba": write_celeba_fixture,
    "retinamnist": write_retinamnist_fixture,
    "isic": write_isic_fixture,
    "chestxray": write_chestxray_fixture,
}
