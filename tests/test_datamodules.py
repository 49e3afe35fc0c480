"""The face and medical datamodules on tiny copies of each dataset in its real on-disk format."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from leakbench.cli import main
from leakbench.datamodules import fixtures
from leakbench.datamodules.base import (
    DatasetError,
    DatasetNotFoundError,
    ImageFileDataset,
    TrialDataset,
)
from leakbench.datamodules.check import check_dataset
from leakbench.datamodules.chestxray import patient_of
from leakbench.datamodules.partition import (
    dirichlet_partition,
    group_partition,
    group_split,
    iid_partition,
)
from leakbench.registry import DATAMODULES

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("datamodules")

DEFAULT_DATASETS = sorted(fixtures.FIXTURE_WRITERS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One read-only fixture per dataset (and per ISIC edition); tests that damage data copy it."""
    base = tmp_path_factory.mktemp("data")
    roots = {name: write(base / name) for name, write in fixtures.FIXTURE_WRITERS.items()}
    for edition in ("ham10000", "2017"):
        roots[f"isic-{edition}"] = fixtures.write_isic_fixture(base / f"isic-{edition}", edition)
    return roots


def make(name: str, root: Path, **options: object):
    return DATAMODULES.get(name)(root=root, **options)


def copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / root.name))


def ids_and_labels(dataset) -> list[tuple[str, int]]:
    return [(dataset.sample_ids[i], int(dataset.labels[i])) for i in range(len(dataset))]


def assert_pixels_match_file(dm, dataset: ImageFileDataset, i: int) -> None:
    """The fixture images are uniform, so every model-input pixel, de-normalised with the
    module's mean/std, must equal the file's colour as PIL decodes it (JPEG: within 2/255)."""
    x, _, _ = dataset[i]
    mode = "L" if dm.input_shape[0] == 1 else "RGB"
    with Image.open(dataset.paths[i]) as image:
        colour = np.asarray(image.convert(mode), dtype=np.float64).reshape(-1, len(dm.mean))
    expected = torch.tensor(colour.mean(axis=0) / 255, dtype=torch.float32).view(-1, 1, 1)
    pixels = x * torch.tensor(dm.std).view(-1, 1, 1) + torch.tensor(dm.mean).view(-1, 1, 1)
    assert x.shape == dm.input_shape
    assert torch.allclose(pixels, expected.expand_as(pixels), atol=2 / 255)


# ---------------------------------------------------------------- loading: shapes, labels


def test_lfw_identities_labels_and_pixels(data: dict[str, Path]) -> None:
    dm = make("lfw", data["lfw"])
    assert dm.class_names == ["Ann_Archer", "Bob_Brown", "Cid_Chan", "Dee_Dunn", "Eve_Estes"]
    assert (dm.num_classes, dm.input_shape) == (5, (3, 32, 32))
    train, test = dm.samples("train"), dm.samples("test")
    assert (len(train), len(test)) == (61, 42)  # Fay_Fox (3) and Gus_Gray (2) are below 20
    for dataset in (train, test):
        for sid, label in ids_and_labels(dataset):
            name = sid.split("/")[1]
            assert sid.startswith(f"lfw/{name}/{name}_") and label == dm.class_names.index(name)
    assert set(test.groups) == {"Dee_Dunn", "Eve_Estes"}  # peopleDevTest.txt
    assert set(train.groups).isdisjoint(test.groups)
    assert_pixels_match_file(dm, test, 0)
    grey = make("lfw", data["lfw"], grayscale=True, resolution=16)
    assert (grey.input_shape, grey.mean, grey.std) == ((1, 16, 16), (0.449,), (0.226,))
    assert_pixels_match_file(grey, grey.samples("test"), 5)


def test_lfw_seeded_identity_split_and_image_split(tmp_path: Path) -> None:
    root = fixtures.write_lfw_fixture(tmp_path, people_files=False)
    eligible = {"Ann_Archer", "Bob_Brown", "Cid_Chan", "Dee_Dunn", "Eve_Estes"}
    tests = []
    for split_seed in range(4):
        dm = make("lfw", root, split_seed=split_seed)
        train, test = set(dm.samples("train").groups), set(dm.samples("test").groups)
        assert train.isdisjoint(test) and train | test == eligible and len(test) == 1
        tests.append(test)
    assert len({frozenset(t) for t in tests}) > 1  # the seed picks the identities

    by_image = make("lfw", root, split_by="image", min_images_per_identity=3)
    train, test = by_image.samples("train"), by_image.samples("test")
    assert set(train.groups) == set(test.groups) == eligible | {"Fay_Fox"}
    assert set(train.sample_ids).isdisjoint(test.sample_ids)
    assert test.groups.count("Fay_Fox") == 1 and test.groups.count("Bob_Brown") == 5


def test_celeba_identity_and_attribute_targets(data: dict[str, Path]) -> None:
    dm = make("celeba", data["celeba"])
    assert dm.class_names == [f"identity {i}" for i in (101, 102, 103, 104, 105, 107)]
    sizes = {s: len(dm.samples(s)) for s in dm.splits}
    assert sizes == {"train": 91, "val": 30, "test": 60}  # identity 106 has 2 < 30 images
    groups = {s: set(dm.samples(s).groups) for s in dm.splits}
    assert groups == {"train": {"101", "102", "103"}, "val": {"104"}, "test": {"105", "107"}}
    test = dm.samples("test")
    for sid, label in ids_and_labels(test):
        assert sid.startswith("celeba/") and dm.class_names[label] in (
            "identity 105",
            "identity 107",
        )
    assert_pixels_match_file(dm, test, 3)

    smiling = make("celeba", data["celeba"], target="Smiling")
    lines = (data["celeba"] / "celeba" / "list_attr_celeba.txt").read_text().splitlines()
    column = lines[1].split().index("Smiling") + 1
    truth = {f"celeba/{r.split()[0][:-4]}": int(r.split()[column] == "1") for r in lines[2:]}
    train = smiling.samples("train")
    assert smiling.num_classes == 2 and len(train) == 93
    assert all(truth[sid] == label for sid, label in ids_and_labels(train))
    with pytest.raises(ValueError, match="unknown CelebA target 'Smile'; valid: identity, 5_o"):
        make("celeba", data["celeba"], target="Smile").samples("train")


def test_medmnist_reads_npz_exactly(data: dict[str, Path], tmp_path: Path) -> None:
    dm = make("retinamnist", data["retinamnist"])
    assert (dm.input_shape, dm.num_classes, dm.mean) == ((3, 28, 28), 5, (0.5, 0.5, 0.5))
    with np.load(data["retinamnist"] / "retinamnist.npz") as archive:
        images, labels = archive["test_images"], archive["test_labels"]
    test = dm.samples("test")
    assert len(test) == 16 and test.groups is None
    for i in (0, 7, 15):
        x, y, sid = test[i]
        expected = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255
        assert torch.allclose(x * 0.5 + 0.5, expected, atol=1e-6)
        assert (y, sid) == (int(labels[i, 0]), f"retinamnist/test/{i}")
    fixtures.write_retinamnist_fixture(tmp_path, size=64)
    assert make("retinamnist", tmp_path, size=64).samples("val")[0][0].shape == (3, 64, 64)
    fixtures.write_medmnist_fixture(tmp_path, "pneumoniamnist")
    pneumonia = make("pneumoniamnist", tmp_path)
    assert pneumonia.samples("train")[0][0].shape == (1, 28, 28) and pneumonia.num_classes == 2
    assert {"dermamnist", "organsmnist"} <= set(DATAMODULES.names())
    assert "chestmnist" not in DATAMODULES.names()  # multi-label


def test_isic_2018_edition(data: dict[str, Path]) -> None:
    dm = make("isic", data["isic"])
    assert dm.class_names == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    sizes = {s: len(dm.samples(s)) for s in dm.splits}
    assert sizes == {"train": 21, "val": 7, "test": 14}  # nested and root-level ground truths
    for split in dm.splits:
        samples = dm.samples(split)
        assert [label for _, label in ids_and_labels(samples)] == [
            k % 7 for k in range(len(samples))
        ]
    assert dm.samples("train").groups[:4] == [
        "HAM_0000000",
        "HAM_0000000",
        "HAM_0000001",
        "HAM_0000001",
    ]
    assert dm.samples("test").groups is None  # no LesionGroupings file for the test split
    assert_pixels_match_file(dm, dm.samples("test"), 2)


def test_isic_ham10000_is_lesion_disjoint(data: dict[str, Path]) -> None:
    dm = make("isic", data["isic-ham10000"], edition="ham10000")
    parts = {s: dm.samples(s) for s in dm.splits}
    assert sum(len(p) for p in parts.values()) == 60
    lesions = {s: set(p.groups) for s, p in parts.items()}
    assert [len(lesions[s]) for s in dm.splits] == [28, 4, 8]  # 70/10/20% of 40 lesions
    assert not (lesions["train"] & lesions["val"] or lesions["train"] & lesions["test"])
    assert not lesions["val"] & lesions["test"]
    for sid, label in ids_and_labels(parts["test"]):
        lesion = parts["test"].groups[parts["test"].sample_ids.index(sid)]
        assert label == int(lesion[4:]) % 7  # the fixture's dx cycles over the 7 classes


def test_isic_2017_edition(data: dict[str, Path]) -> None:
    dm = make("isic", data["isic-2017"], edition="2017")
    assert dm.class_names == ["melanoma", "seborrheic_keratosis", "nevus"]
    test = dm.samples("test")
    assert len(test) == 9 and [y for _, y in ids_and_labels(test)] == [0, 1, 2] * 3
    with pytest.raises(ValueError, match="needs a group id"):
        make("isic", data["isic-2017"], edition="2017", num_clients=2, partition="group").clients()


def test_chestxray_official_and_patient_splits(data: dict[str, Path]) -> None:
    dm = make("chestxray", data["chestxray"])
    assert (dm.input_shape, dm.num_classes, dm.mean) == ((1, 32, 32), 2, (0.5,))
    test = dm.samples("test")
    assert [len(dm.samples(s)) for s in dm.splits] == [13, 4, 11]
    assert ids_and_labels(test)[0] == ("chestxray/test/NORMAL/IM-0010-0001", 0)
    assert ids_and_labels(test)[-1] == ("chestxray/test/PNEUMONIA/person1_bacteria_30", 1)
    train = dm.samples("train")
    rgb = train.sample_ids.index("chestxray/train/PNEUMONIA/person1_bacteria_1")
    assert_pixels_match_file(dm, train, rgb)  # an RGB file, read as grey
    assert "person1" in set(train.groups) & set(test.groups)  # the official split shares it

    by_patient = make("chestxray", data["chestxray"], split_by="patient")
    parts = {s: by_patient.samples(s) for s in by_patient.splits}
    patients = {s: set(p.groups) for s, p in parts.items()}
    assert sum(len(p) for p in parts.values()) == 28
    assert not (patients["train"] & patients["test"] or patients["val"] & patients["test"])
    assert not patients["train"] & patients["val"]


def test_patient_ids_from_kermany_names() -> None:
    assert patient_of("person1000_bacteria_2931") == "person1000"
    assert patient_of("person7_virus_15") == "person7"
    assert patient_of("IM-0115-0001") == "IM-0115"
    assert patient_of("NORMAL2-IM-1427-0001") == "NORMAL2-IM-1427"
    assert patient_of("scan_42") == "scan_42"


def test_root_defaults_to_leakbench_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEAKBENCH_DATA", str(tmp_path))
    assert DATAMODULES.get("lfw")().root == tmp_path / "lfw"
    assert DATAMODULES.get("retinamnist")().root == tmp_path / "retinamnist"
    monkeypatch.delenv("LEAKBENCH_DATA")
    assert DATAMODULES.get("chestxray")().root == Path("data") / "chestxray"


# ---------------------------------------------------------------- trials: seeds and ids


@pytest.mark.parametrize("name", DEFAULT_DATASETS)
def test_same_seed_same_batches_and_ids(data: dict[str, Path], name: str) -> None:
    def trials(seed: int) -> list[dict]:
        dm = make(name, data[name], batch_size=4, num_trials=3, seed=seed)
        return [dm.trials()[t] for t in range(3)]

    first, again, other = trials(5), trials(5), trials(6)
    for a, b in zip(first, again, strict=True):
        assert a["sample_ids"] == b["sample_ids"] and torch.equal(a["images"], b["images"])
        assert torch.equal(a["labels"], b["labels"]) and a["client"] == 0
        assert len(set(a["sample_ids"])) == 4
    assert [t["sample_ids"] for t in first] != [t["sample_ids"] for t in other]


def test_single_client_plan_is_unchanged() -> None:
    """The plan without clients walks seeded permutations of the whole split, as before the
    federated options existed (quickstart and recorded runs depend on it)."""
    dm = DATAMODULES.get("lfw-subset")(batch_size=3, num_trials=20, seed=7)
    rng = np.random.default_rng(7)
    order = np.concatenate([rng.permutation(40)[:39] for _ in range(2)])
    assert np.array_equal(dm.trials().plan, order[:60].reshape(20, 3))


# ---------------------------------------------------------------- client partitions


def test_iid_partition_sizes_and_cover() -> None:
    parts = iid_partition(103, 4, seed=1)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 4, 1), strict=True))


def test_dirichlet_partition_is_seeded_and_skews_labels() -> None:
    labels = np.arange(2000) % 10

    def top_share(parts: list[np.ndarray]) -> float:
        shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts if len(p)]
        return float(np.mean(shares))

    skewed = dirichlet_partition(labels, 5, alpha=0.05, seed=3)
    assert np.array_equal(np.sort(np.concatenate(skewed)), np.arange(2000))
    again = dirichlet_partition(labels, 5, alpha=0.05, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))
    other = dirichlet_partition(labels, 5, alpha=0.05, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(skewed, other, strict=True))
    assert top_share(skewed) > 0.5
    assert top_share(dirichlet_partition(labels, 5, alpha=1000.0, seed=3)) < 0.15
    with pytest.raises(ValueError, match="alpha must be positive"):
        dirichlet_partition(labels, 5, alpha=0.0, seed=3)


def test_group_partition_keeps_groups_whole() -> None:
    groups = [f"g{i % 13}" for i in range(100)] + ["big"] * 20
    parts = group_partition(groups, 4, seed=2)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(120))
    owners = [{groups[i] for i in p} for p in parts]
    assert all(a.isdisjoint(b) for k, a in enumerate(owners) for b in owners[k + 1 :])
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 20  # the biggest group
    with pytest.raises(ValueError, match="only 14"):
        group_partition(groups, 15, seed=2)


def test_group_split_disjoint_parts() -> None:
    groups = [f"p{i // 3}" for i in range(30)]  # 10 groups of 3
    parts = group_split(groups, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [21, 3, 6]
    seen = [{groups[i] for i in p} for p in parts.values()]
    assert all(a.isdisjoint(b) for k, a in enumerate(seen) for b in seen[k + 1 :])
    with pytest.raises(ValueError, match="2 groups are too few"):
        group_split(["a", "b"], {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)


def test_trials_draw_from_one_client(data: dict[str, Path]) -> None:
    dm = make("lfw", data["lfw"], batch_size=4, num_trials=6, num_clients=2, partition="group")
    clients = dm.clients()
    test = dm.samples("test")
    owners = [{test.groups[i] for i in c} for c in clients]
    assert owners[0].isdisjoint(owners[1]) and owners[0] | owners[1] == {"Dee_Dunn", "Eve_Estes"}
    trials = dm.trials()
    assert sorted({trials[t]["client"] for t in range(6)}) == [0, 1]
    for t in range(6):
        item = trials[t]
        members = {test.sample_ids[i] for i in clients[item["client"]]}
        assert set(item["sample_ids"]) <= members
    pinned = make(
        "retinamnist",
        data["retinamnist"],
        batch_size=2,
        num_trials=4,
        num_clients=3,
        partition="dirichlet",
        dirichlet_alpha=1.0,
        client=1,
    )
    members = {pinned.samples("test").sample_ids[i] for i in pinned.clients()[1]}
    for t in range(4):
        assert (
            pinned.trials()[t]["client"] == 1 and set(pinned.trials()[t]["sample_ids"]) <= members
        )
    assert pinned.describe()["partition"] == {
        "num_clients": 3, "scheme": "dirichlet", "dirichlet_alpha": 1.0, "seed": 0, "client": 1,
    }  # fmt: skip


def test_client_without_a_full_batch_is_refused() -> None:
    samples = DATAMODULES.get("lfw-subset")().samples("test")
    clients = [np.arange(3), np.arange(3, 40)]
    with pytest.raises(ValueError, match="client 0 holds 3 samples, fewer than the batch size 4"):
        TrialDataset(samples, 4, 2, seed=0, clients=clients, client=0)
    assert TrialDataset(samples, 4, 3, seed=0, clients=clients).trial_clients.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "layout_line"),
    [
        ("lfw", "lfw_funneled/"),
        ("celeba", "img_align_celeba/"),
        ("retinamnist", "retinamnist.npz"),
        ("isic", "ISIC2018_Task3_Training_Input/"),
        ("chestxray", "PNEUMONIA/"),
    ],
)
def test_missing_root_shows_layout_and_source(tmp_path: Path, name: str, layout_line: str) -> None:
    dm = make(name, tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError) as caught:
        dm.samples(dm.split)
    message = str(caught.value)
    assert f"dataset root {tmp_path / 'absent'} does not exist" in message
    assert layout_line in message and "where to get it:" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_split_files_are_named(data: dict[str, Path], tmp_path: Path) -> None:
    celeba = copy(data["celeba"], tmp_path)
    (celeba / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing .*list_eval_partition.txt: expected"):
        make("celeba", celeba).samples("test")

    lfw = copy(data["lfw"], tmp_path)
    (lfw / "lfw-py" / "peopleDevTest.txt").unlink()
    with pytest.raises(
        DatasetNotFoundError, match=r"missing .*peopleDevTest.txt: expected the test"
    ):
        make("lfw", lfw).samples("train")

    isic = copy(data["isic"], tmp_path)
    shutil.rmtree(isic / "ISIC2018_Task3_Validation_GroundTruth")
    with pytest.raises(DatasetNotFoundError, match="ISIC2018_Task3_Validation_GroundTruth.csv"):
        make("isic", isic, split="val").samples("val")

    chest = copy(data["chestxray"], tmp_path)
    shutil.rmtree(chest / "val")
    with pytest.raises(DatasetNotFoundError, match=r"missing folder .*val: expected the class"):
        make("chestxray", chest).samples("val")
    assert len(make("chestxray", chest).samples("test")) == 11  # other splits still load

    with pytest.raises(DatasetNotFoundError, match=r"retinamnist_64.npz: expected the MedMNIST"):
        make("retinamnist", data["retinamnist"], size=64).samples("test")


def test_truncated_and_unreadable_images_name_the_file(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lfw = copy(data["lfw"], tmp_path)
    dm = make("lfw", lfw)
    test = dm.samples("test")
    victim = test.paths[0]
    victim.write_bytes(victim.read_bytes()[:-40])  # cut inside the compressed scan
    # Even with PIL told to pad truncated files globally, a dataset read must fail.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError, match=f"{victim}: unreadable or truncated image"):
        test[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the read

    chest = copy(data["chestxray"], tmp_path)
    broken = chest / "test" / "NORMAL" / "IM-0010-0001.jpeg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=f"{broken}: unreadable or truncated image"):
        make("chestxray", chest).samples("test")[0]


def test_images_listed_but_absent_are_named(data: dict[str, Path], tmp_path: Path) -> None:
    isic = copy(data["isic"], tmp_path)
    gone = isic / "ISIC2018_Task3_Test_Input" / "ISIC_0024336.jpg"
    gone.unlink()
    with pytest.raises(
        DatasetNotFoundError, match=f"1 image files listed in .* are missing: {gone}"
    ):
        make("isic", isic).samples("test")

    celeba = copy(data["celeba"], tmp_path)
    gone = make("celeba", celeba).samples("val").paths[-1]
    gone.unlink()
    with pytest.raises(DatasetNotFoundError, match=f"listed in .*list_eval_partition.txt .*{gone}"):
        make("celeba", celeba).samples("val")


def test_csv_with_unknown_or_missing_columns(data: dict[str, Path], tmp_path: Path) -> None:
    isic = copy(data["isic"], tmp_path)
    truth = isic / "ISIC2018_Task3_Test_GroundTruth.csv"
    lines = truth.read_text().splitlines()
    truth.write_text("\n".join([lines[0] + ",FOO", *(row + ",0.0" for row in lines[1:])]) + "\n")
    with pytest.raises(
        DatasetError, match=f"{truth}: unknown columns FOO; expected columns image, MEL"
    ):
        make("isic", isic).samples("test")

    ham = copy(data["isic-ham10000"], tmp_path)
    metadata = ham / "HAM10000_metadata.csv"
    metadata.write_text(metadata.read_text().replace(",dx,", ",diagnosis,", 1))
    with pytest.raises(DatasetError, match="missing columns dx; unknown columns diagnosis"):
        make("isic", ham, edition="ham10000").samples("train")

    two = copy(data["isic"], tmp_path / "again")
    truth = two / "ISIC2018_Task3_Test_GroundTruth.csv"
    lines = truth.read_text().splitlines()
    lines[2] = lines[2].replace("0.0", "1.0", 1)  # two classes in one row
    truth.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=f"{truth}:3: expected exactly one class set to 1"):
        make("isic", two).samples("test")


def test_npz_without_expected_keys_or_shapes(tmp_path: Path) -> None:
    path = tmp_path / "retinamnist.npz"
    np.savez_compressed(path, train_images=np.zeros((4, 28, 28, 3), np.uint8))
    with pytest.raises(
        DatasetError,
        match=r"retinamnist.npz: no key test_images, test_labels; "
        r"expected train_images, train_labels, val_images.*found train_images",
    ):
        make("retinamnist", tmp_path).samples("test")
    np.savez_compressed(
        path, test_images=np.zeros((4, 28, 28), np.uint8), test_labels=np.zeros((4, 1), np.uint8)
    )
    with pytest.raises(
        DatasetError,
        match=r"test_images is uint8 \(4, 28, 28\); expected uint8 "
        r"\(N, 28, 28, 3\)",
    ):
        make("retinamnist", tmp_path).samples("test")
    np.savez_compressed(
        path, test_images=np.zeros((4, 28, 28, 3), np.uint8), test_labels=np.full((4, 1), 5)
    )
    with pytest.raises(DatasetError, match=r"test_labels ranges over 5..5; expected 0..4"):
        make("retinamnist", tmp_path).samples("test")
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DatasetError, match="not a readable .npz archive"):
        make("retinamnist", tmp_path).samples("test")


def test_malformed_text_files_name_file_and_line(data: dict[str, Path], tmp_path: Path) -> None:
    lfw = copy(data["lfw"], tmp_path)
    people = lfw / "lfw-py" / "peopleDevTrain.txt"
    people.write_text(people.read_text().replace("Bob_Brown\t21", "Bob_Brown 21"))
    with pytest.raises(DatasetError, match=r"peopleDevTrain.txt:3: expected 'Name<TAB>count'"):
        make("lfw", lfw).samples("train")

    celeba = copy(data["celeba"], tmp_path)
    partition = celeba / "celeba" / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace(" 0\n", " train\n", 1))
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt:\d+: expected '<image>.jpg"):
        make("celeba", celeba).samples("train")


def test_download_only_where_upstream_has_a_stable_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="'lfw' has no stable public download URL"):
        make("lfw", tmp_path, download=True)

    calls = []

    def fake_download_url(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, root, filename, md5))  # stands in for Zenodo: no network in tests
        fixtures.write_medmnist_fixture(Path(root), "retinamnist", 128)

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download_url)
    dm = make("retinamnist", tmp_path / "medmnist", size=128, download=True)
    dm.prepare_data()
    assert calls == [
        (
            "https://zenodo.org/records/10519652/files/retinamnist_128.npz?download=1",
            str(tmp_path / "medmnist"),
            "retinamnist_128.npz",
            "e48e916a24454daf90583d4e6efb1a18",
        )
    ]
    assert dm.samples("train")[0][0].shape == (3, 128, 128)


# ---------------------------------------------------------------- the data check command


def test_data_check_counts_and_problems(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_check(argv: list[str]) -> tuple[int, str]:
        code = main(argv)
        return code, capsys.readouterr().out

    code, text = run_check(["data", "check", "chestxray", "--root", str(data["chestxray"])])
    assert code == 0 and "split val: 4 images of 4 groups, 2 of 2 classes present" in text
    assert "  PNEUMONIA  6" in text and "1 patients appear in more than one split" in text

    code, text = run_check(["data", "check", "isic", "--root", str(data["isic-2017"]),
                            "--dataset-options", "{edition: 2017}"])  # fmt: skip
    assert code == 0 and "split train: 12 images, 3 of 3 classes present" in text

    code, text = run_check(["data", "check", "retinamnist", "--root", str(data["retinamnist"])])
    assert code == 0 and "differs from the official bd4c0672f1bba3e3a89f0e4e876791e4" in text

    code, text = run_check(["data", "check", "lfw", "--root", str(tmp_path / "nowhere")])
    assert code == 1 and "lfw_funneled/" in text and "where to get it" in text

    chest = copy(data["chestxray"], tmp_path)
    bad = chest / "train" / "NORMAL" / "IM-0001-0002.jpeg"
    bad.write_bytes(bad.read_bytes()[:-40])
    code, text = run_check(["data", "check", "chestxray", "--root", str(chest), "--decode"])
    assert code == 1 and f"PROBLEM: split train: {bad}: unreadable or truncated" in text
    assert "all 4 images decode" in text  # the val split is intact

    with pytest.raises(ValueError, match="unknown dataset 'lwf'"):
        check_dataset("lwf")
    with pytest.raises(
        ValueError, match="unknown option 'editon' .* expected one of: root, edition"
    ):
        check_dataset("isic", str(data["isic"]), {"editon": "2017"})


# ---------------------------------------------------------------- torchvision's own readers


def test_fixtures_match_torchvision_readers(data: dict[str, Path]) -> None:
    """torchvision's LFWPeople and CelebA, minus their md5 checks, read our fixtures the same."""
    from torchvision.datasets import CelebA, LFWPeople

    class UncheckedLFW(LFWPeople):
        def _check_integrity(self) -> bool:
            return True

    class UncheckedCelebA(CelebA):
        def _check_integrity(self) -> bool:
            return True

    ours = make("lfw", data["lfw"])
    theirs = UncheckedLFW(str(data["lfw"]), split="test")
    eligible = [p for p in theirs.data if Path(p).parent.name in ours.class_names]
    assert sorted(eligible) == sorted(str(p) for p in ours.samples("test").paths)

    ours = make("celeba", data["celeba"])
    theirs = UncheckedCelebA(str(data["celeba"]), split="test", target_type="identity")
    assert [f"celeba/{f[:-4]}" for f in theirs.filename] == ours.samples("test").sample_ids
    assert [str(int(i)) for i in theirs.identity[:, 0]] == ours.samples("test").groups
    smiling = make("celeba", data["celeba"], target="Smiling").samples("val")
    theirs = UncheckedCelebA(str(data["celeba"]), split="valid", target_type="attr")
    column = theirs.attr_names.index("Smiling")
    assert theirs.attr[:, column].tolist() == smiling.labels.tolist()


# ---------------------------------------------------------------- digits (scikit-learn, embedded)


def test_digits_splits_labels_and_pixels() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = DATAMODULES.get("digits")()
    assert (dm.input_shape, dm.num_classes) == ((1, 8, 8), 10)
    assert dm.class_names == [str(d) for d in range(10)]
    train, test = dm.samples("train"), dm.samples("test")
    assert (len(train), len(test)) == (1437, 360)
    # Stratified: every digit keeps its share (its 20 % rounded) in the test split.
    assert torch.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    train_index = [int(s.split("/")[1]) for s in train.sample_ids]
    test_index = [int(s.split("/")[1]) for s in test.sample_ids]
    assert sorted(train_index + test_index) == list(range(1797))
    assert test.sample_ids[:5] == [f"digits/{i:04d}" for i in (21, 24, 28, 34, 35)]
    for dataset, index in ((train, train_index), (test, test_index)):
        assert dataset.labels.tolist() == digits.target[index].tolist()
        x, y, sid = dataset[7]
        pixels = x * dm.std[0] + dm.mean[0]
        expected = torch.from_numpy(digits.images[index[7]] / 16).float().unsqueeze(0)
        assert x.shape == (1, 8, 8) and y == int(digits.target[index[7]])
        assert torch.allclose(pixels, expected, atol=1e-6)
    # The stated normalisation is the train split's, to the 4 digits it is given with.
    train_pixels = torch.from_numpy(digits.images[train_index] / 16)
    assert float(train_pixels.mean()) == pytest.approx(dm.mean[0], abs=5e-5)
    assert float(train_pixels.std(unbiased=False)) == pytest.approx(dm.std[0], abs=5e-5)
    assert dm.describe() == {
        "dataset": "digits",
        "split_seed": 0,
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "mean": [0.3054],
        "std": [0.3761],
        "split": "test",
        "partition": {
            "num_clients": 1,
            "scheme": "iid",
            "dirichlet_alpha": 0.5,
            "seed": 0,
            "client": None,
        },
    }


def test_digits_trials_are_deterministic() -> None:
    def plan(seed: int) -> list[list[str]]:
        trials = DATAMODULES.get("digits")(batch_size=4, num_trials=3, seed=seed).trials()
        return [trials[t]["sample_ids"] for t in range(3)]

    assert plan(1) == plan(1)
    assert plan(1) != plan(2)
    first = DATAMODULES.get("digits")(batch_size=4, num_trials=1, seed=1).trials()[0]
    again = DATAMODULES.get("digits")(batch_size=4, num_trials=1, seed=1).trials()[0]
    assert torch.equal(first["images"], again["images"])
    assert first["images"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    "model", ["fcn", "fcn-exan", "fcn3", "lenet-zhu", "cnn6", "cnn6-d", "resnet18"]
)
def test_zoo_models_take_digits(model: str) -> None:
    from leakbench.client import build_victim

    victim = build_victim(model, (1, 8, 8), 10, seed=0).eval()
    assert victim(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_convnet_cannot_take_digits() -> None:
    """Its two 3×3 max-pools shrink 8×8 to 2×2 and then to nothing."""
    from leakbench.client import build_victim

    with pytest.raises(RuntimeError, match="Output size is too small"):
        build_victim("convnet", (1, 8, 8), 10, seed=0)
