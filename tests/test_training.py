"""Trained victims, content-addressed checkpoints, victim states as text, the reference
classifier. Tiny models on the 8×8 digits, one epoch, on the CPU."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from leakbench.cli import main
from leakbench.client import build_victim
from leakbench.models import training
from leakbench.models.checkpoint import CheckpointError, load_checkpoint, state_bytes
from leakbench.models.training import TrainedVictim, train_command, train_victim
from leakbench.protocol.victim import Victim, resolve_victim_state

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("training")

SMALL = {"widths": [16]}
RECIPE = {
    "model_options": SMALL,
    "epochs": 1,
    "batch_size": 64,
    "lr": 0.1,
    "seed": 5,
    "accelerator": "cpu",
}


def train_small(directory: Path, **changes: object) -> TrainedVictim:
    return train_victim("fcn", "digits", **{**RECIPE, **changes, "checkpoint_dir": directory})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedVictim:
    # One thread, as every test runs (conftest): CPU results are bit-identical per thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_small(tmp_path_factory.mktemp("checkpoints"))
    finally:
        torch.set_num_threads(threads)


def resolve(text: str, directory: Path, **changes: object) -> Victim:
    run = {
        "model": "fcn",
        "model_options": SMALL,
        "input_shape": (1, 8, 8),
        "num_classes": 10,
        "checkpoint_dir": directory,
        **changes,
    }
    return resolve_victim_state(text, **run)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_checkpoint(trained: TrainedVictim, tmp_path: Path) -> Path:
    for path in (trained.checkpoint.path, trained.checkpoint.card_path):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def write_named_by_hash(directory: Path, data: bytes) -> str:
    sha256 = hashlib.sha256(data).hexdigest()
    (directory / f"{sha256}.pt").write_bytes(data)
    return sha256


# ---------------------------------------------------------------- train, save, load


def test_checkpoint_round_trip_gives_the_trained_weights(trained: TrainedVictim) -> None:
    checkpoint = trained.checkpoint
    data = checkpoint.path.read_bytes()
    assert checkpoint.path.name == f"{hashlib.sha256(data).hexdigest()}.pt"
    assert data == state_bytes(trained.model.state_dict())
    loaded = load_checkpoint(checkpoint.sha256[:8], checkpoint.path.parent)
    assert loaded.sha256 == checkpoint.sha256
    assert same_weights(loaded.state, trained.model.state_dict())
    card = json.loads(checkpoint.card_path.read_text())
    expected = {
        "sha256": checkpoint.sha256,
        "model": "fcn",
        "model_options": SMALL,
        "dataset": "digits",
        "dataset_options": {},
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.1,
        "optimizer": "sgd",
        "seed": 5,
        "defense": "none",
        "defense_options": {},
        "test_accuracy": trained.test_accuracy,
        "accelerator": "cpu",
    }
    assert {k: card[k] for k in expected} == expected
    assert card["versions"]["torch"] == torch.__version__
    assert card["cpu_threads"] == 1
    assert card["train_seconds"] > 0
    # One SGD epoch of a 16-unit net on digits is far above chance (0.1).
    assert trained.test_accuracy > 0.5
    victim = resolve(checkpoint.sha256, checkpoint.path.parent)
    assert victim.checkpoint == victim.state_text == checkpoint.sha256
    assert same_weights(victim.build().state_dict(), trained.model.state_dict())


def test_same_seed_gives_the_same_checkpoint_hash(
    trained: TrainedVictim, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--model", "fcn", "--dataset", "digits", "--model-options", "{widths: [16]}"]
    argv += ["--epochs", "1", "--batch-size", "64", "--lr", "0.1", "--seed", "5"]
    argv += ["--accelerator", "cpu", "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()[:2])
    assert lines["checkpoint"] == trained.checkpoint.sha256
    assert lines["card"] == str(tmp_path / f"{trained.checkpoint.sha256}.json")
    other = train_small(tmp_path, seed=6)
    assert other.checkpoint.sha256 != trained.checkpoint.sha256


def test_training_with_a_defense_trains_on_what_it_shares(
    trained: TrainedVictim, tmp_path: Path
) -> None:
    noisy = train_small(tmp_path, defense="noise", defense_options={"scale": 0.05})
    assert noisy.checkpoint.card["defense"] == "noise"
    assert noisy.checkpoint.card["defense_options"] == {"scale": 0.05}
    assert noisy.checkpoint.sha256 != trained.checkpoint.sha256
    diff = max(
        float((noisy.model.state_dict()[k] - v).abs().max())
        for k, v in trained.model.state_dict().items()
    )
    assert diff > 1e-3
    # A zero-scale noise defense shares the plain gradient: the very same weights.
    silent = train_small(tmp_path, defense="noise", defense_options={"scale": 0.0})
    assert silent.checkpoint.sha256 == trained.checkpoint.sha256


def test_train_command_prints_hash_card_and_accuracy(tmp_path: Path) -> None:
    lines: list[str] = []
    status = train_command(
        "lenet-zhu",
        "digits",
        epochs=1,
        batch_size=128,
        optimizer="adam",
        lr=0.01,
        checkpoint_dir=str(tmp_path),
        accelerator="cpu",
        echo=lines.append,
    )
    assert status == 0
    sha256 = lines[0].split()[1]
    card = json.loads((tmp_path / f"{sha256}.json").read_text())
    assert lines[1].split()[1] == str(tmp_path / f"{sha256}.json")
    assert lines[2] == f"test accuracy  {card['test_accuracy']:.4f}"
    assert card["model"] == "lenet-zhu" and card["optimizer"] == "adam"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is unknown; valid: sgd, adam"),
        ({"dataset_options": {"seed": 3}}, "dataset_options seed=3 is set by training itself"),
        ({"defense": "noise", "defense_options": {"scale": -1}}, "noise scale must be"),
        ({"model_options": {"depth": 3}}, "model_options {'depth': 3} do not fit model 'fcn'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        train_small(tmp_path / "never", **changes)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- refusals when loading


def test_a_changed_byte_is_refused(trained: TrainedVictim, tmp_path: Path) -> None:
    directory = copy_checkpoint(trained, tmp_path)
    path = directory / trained.checkpoint.path.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    expected = f"checkpoint {path} has sha256 {actual}, expected {path.stem}: the file was changed"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path.stem[:12], directory)
    assert str(error.value) == expected
    with pytest.raises(CheckpointError, match="the file was changed"):
        resolve(path.stem, directory)


class Payload:
    """Stands for an object a malicious checkpoint would make the loader build."""


def test_a_pickled_object_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": Payload()}, buffer)
    sha256 = write_named_by_hash(tmp_path, buffer.getvalue())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(sha256, tmp_path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {tmp_path / sha256}.pt does not hold plain weights")
    assert "Payload" in message and "\n" not in message


def test_a_file_of_tensors_that_is_no_state_dict_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save([torch.zeros(2)], buffer)
    sha256 = write_named_by_hash(tmp_path, buffer.getvalue())
    with pytest.raises(CheckpointError, match="holds a list, expected a state_dict"):
        load_checkpoint(sha256, tmp_path)


def test_checkpoint_names_are_checked(trained: TrainedVictim, tmp_path: Path) -> None:
    directory = trained.checkpoint.path.parent
    with pytest.raises(CheckpointError, match="'abc123' is not a sha256: expected 8 to 64 hex"):
        load_checkpoint("abc123", directory)
    with pytest.raises(CheckpointError, match=f"no checkpoint 00000000 in {directory}"):
        load_checkpoint("00000000", directory)
    (tmp_path / f"{'ab' * 32}.pt").write_bytes(b"")
    (tmp_path / f"{'ab' * 4}{'cd' * 28}.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint prefix abababab is ambiguous"):
        load_checkpoint("abababab", tmp_path)
    alone = tmp_path / "alone"
    alone.mkdir()
    copy_checkpoint(trained, alone)
    (alone / f"{trained.checkpoint.sha256}.json").unlink()
    with pytest.raises(CheckpointError, match="has no card: expected"):
        load_checkpoint(trained.checkpoint.sha256, alone)


def test_a_checkpoint_of_another_victim_is_refused(trained: TrainedVictim, tmp_path: Path) -> None:
    directory = trained.checkpoint.path.parent
    sha256 = trained.checkpoint.sha256
    with pytest.raises(ValueError) as error:
        resolve(sha256, directory, model_options={"widths": [32]}, num_classes=5)
    assert str(error.value) == (
        f"model_state {sha256[:16]} was trained for another victim: its card has "
        "model_options {'widths': [16]} (run: {'widths': [32]}); num_classes 10 (run: 5)"
    )
    with pytest.raises(ValueError, match="its card has model 'fcn' \\(run: 'lenet-zhu'\\)"):
        resolve(sha256, directory, model="lenet-zhu", model_options={})
    # A card that lies about the architecture: the weights themselves are checked.
    liar = copy_checkpoint(trained, tmp_path)
    card_path = liar / f"{sha256}.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "model_options": {"widths": [32]}}))
    with pytest.raises(CheckpointError) as error:
        resolve(sha256, liar, model_options={"widths": [32]})
    assert str(error.value) == (
        f"checkpoint {sha256} does not fit the model Sequential: shape (state vs model) of "
        "1.weight (16, 64) vs (32, 64), 1.bias (16,) vs (32,), 3.weight (10, 16) vs (10, 32)"
    )


# ---------------------------------------------------------------- victim states as text


def test_random_states_are_the_seeded_initialisations(tmp_path: Path) -> None:
    seeded = build_victim("fcn", (1, 8, 8), 10, seed=3, **SMALL).state_dict()
    victim = resolve("random(3)", tmp_path, seed=9)
    assert (victim.seed, victim.state, victim.state_text) == (3, None, "random(3)")
    assert same_weights(victim.build().state_dict(), seeded)
    assert resolve(" random ", tmp_path, seed=3).seed == 3
    double = resolve("random(3)", tmp_path, dtype=torch.float64).build()
    assert next(double.parameters()).dtype == torch.float64


@pytest.mark.parametrize("text", ["random(-1)", "random()", "Random", "12345", "xyz12345"])
def test_unreadable_states_are_refused(tmp_path: Path, text: str) -> None:
    expected = (
        f"model_state {text!r} is not a victim state: expected random, random(<seed>) or a "
        "checkpoint sha256 (8 to 64 hex digits)"
    )
    with pytest.raises(ValueError) as error:
        resolve(text, tmp_path)
    assert str(error.value) == expected


def test_a_checkpoint_state_survives_the_spec_round_trip(trained: TrainedVictim) -> None:
    victim = resolve(trained.checkpoint.sha256[:10], trained.checkpoint.path.parent)
    again = Victim.from_spec(victim.spec())
    assert again.checkpoint == trained.checkpoint.sha256
    assert same_weights(again.build().state_dict(), trained.model.state_dict())


# ---------------------------------------------------------------- the reference classifier


@pytest.mark.slow
def test_reference_classifier_is_trained_once_then_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = training.reference_classifier("digits", cache_dir=tmp_path, shipped=False)
    assert not first.training
    assert first.test_accuracy >= 0.95  # measured: 0.981
    pointers = list(tmp_path.glob("trained-*.json"))
    assert len(pointers) == 1
    assert json.loads(pointers[0].read_text())["checkpoint"] == first.sha256

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached reference classifier was trained again")

    monkeypatch.setattr(training, "train_victim", no_training)
    second = training.reference_classifier("digits", cache_dir=tmp_path, shipped=False)
    assert (second.sha256, second.test_accuracy) == (first.sha256, first.test_accuracy)
    assert same_weights(second.state_dict(), first.state_dict())
    from leakbench.registry import DATAMODULES

    samples = DATAMODULES.get("digits")().samples("test")
    images = torch.stack([samples[i][0] for i in range(len(samples))])
    labels = torch.tensor([samples[i][1] for i in range(len(samples))])
    with torch.no_grad():
        correct = int((second(images).argmax(dim=1) == labels).sum())
    assert correct / len(labels) == first.test_accuracy
    pixels = images * 0.3761 + 0.3054
    assert torch.equal(second.predict_pixels(pixels), second(images).argmax(dim=1))


@pytest.mark.parametrize("dataset", ["lfw-subset", "digits"])
def test_embedded_datasets_ship_their_reference_classifier(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run trains nothing: the shipped checkpoint, made by `leakbench train` with the
    dataset's current recipe, is loaded (hash checked) and scores its card's test accuracy."""

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reference classifier was trained although one ships")

    monkeypatch.setattr(training, "train_victim", no_training)
    reference = training.reference_classifier(dataset, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing cached
    card_path = training.SHIPPED_REFERENCE_DIR / f"{reference.sha256}.json"
    card = json.loads(card_path.read_text())
    from leakbench.registry import DATAMODULES

    datamodule = DATAMODULES.get(dataset)()
    recipe = training.reference_recipe(tuple(datamodule.input_shape))
    assert {k: card[k] for k in recipe} == recipe and card["dataset"] == dataset
    assert card["defense"] == "none" and card["dataset_options"] == {}
    accuracy = training.accuracy_on(reference.network, datamodule.samples("test"))
    assert accuracy == card["test_accuracy"] == reference.test_accuracy
    assert accuracy >= 0.95  # measured: 1.000 (lfw-subset), 0.981 (digits)


def test_reference_recipe_depends_on_the_input_size() -> None:
    assert training.reference_recipe((1, 8, 8))["model"] == "fcn"
    assert training.reference_recipe((1, 28, 28))["model"] == "fcn"
    assert training.reference_recipe((3, 32, 32))["model"] == "convnet"
