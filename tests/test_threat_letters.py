"""The SoK's threat-model letters (Carletti et al., USENIX Security 2025) on every attack, track
and entry: the order of the letters, every attack's letter, tracks that refuse an attack whose
letter they do not admit (in one line), ``leakbench list`` and the entry's record of both."""

from __future__ import annotations

import pytest
import yaml

from leakbench.capabilities import (
    CAPABILITY_KNOWLEDGE,
    THREAT_MODELS,
    Capability,
    admitted_letters,
    grants_beyond,
    implied_threat_model,
    threat_model_of,
)
from leakbench.cli import main
from leakbench.client import protocol_from_spec
from leakbench.leaderboard import TRACKS, build_site, make_entry, render, write_entry
from leakbench.leaderboard.entry import load_schema
from leakbench.registry import ATTACKS, read_index

# The letter the SoK gives each built-in attack's paper (or, for attacks it does not list, the
# letter of the closest it does: ExAN and improved R-GAP are closed forms like R-GAP and SPEAR).
EXPECTED_LETTERS = {
    "bias": "A",
    "dlg": "A",
    "idlg": "A",
    "inverting-gradients": "B",
    "rgap": "B",
    "improved-rgap": "B",
    "exan": "B",
    "exan-cnn": "B",
    "fishing": "F",
    "robbing-the-fed": "G",
    "gradinversion": "E",
    "cocktail-party": "B",
    # The adaptive attacks extend Inverting Gradients' objective with a model of the defense.
    "soteria-skip": "B",
    "mask-aware": "B",
    "quantization-aware": "B",
    "noise-aware": "B",
    "mixup-unmixing": "B",
    "instahide-decoding": "B",
}
NEW_TRACKS = {
    "digits-fcn-imprint": "G",
    "digits-fcn-imprint-fedavg": "G",
    "lfw-subset-resnet18-gradinversion": "E",
    "lfw-subset-fcn-cocktail-b64": "B",
}


def test_the_letters_are_ordered_by_what_they_know_as_in_the_sok_table():
    assert admitted_letters("A") == ["A"]
    assert admitted_letters("C") == ["A", "B", "C"]
    assert admitted_letters("E") == ["A", "B", "C", "D", "E"]
    assert admitted_letters("F") == ["A", "B", "C", "F"]
    assert admitted_letters("G") == ["A", "B", "C", "D", "F", "G"]
    assert admitted_letters("H") == ["A", "B", "C", "D", "F", "G", "H"]
    # E (client data distribution) and F (manipulation) know different things: neither admits
    # the other, and nothing but a missing letter would know both.
    assert not threat_model_of("E").admits(THREAT_MODELS["F"])
    assert not threat_model_of("F").admits(THREAT_MODELS["E"])
    with pytest.raises(ValueError, match="no SoK threat model holds all of"):
        implied_threat_model({Capability.BATCHNORM_STATISTICS, Capability.SERVER_MODEL})
    with pytest.raises(ValueError, match=r"threat model 'Z': expected one of the SoK's letters"):
        threat_model_of("Z")


def test_every_capability_raises_the_letter_it_stands_for():
    assert set(CAPABILITY_KNOWLEDGE) == set(Capability)
    letters = {c: implied_threat_model({c}).letter for c in Capability}
    assert letters == {
        Capability.BATCH_SIZE: "A",
        Capability.LABELS: "B",
        Capability.LOCAL_HYPERPARAMETERS: "C",
        Capability.SURROGATE_DATA: "D",
        Capability.BATCHNORM_STATISTICS: "E",
        Capability.SERVER_MODEL: "F",
        Capability.CLIENT_CODE: "F",
    }
    both = {Capability.SERVER_MODEL, Capability.SURROGATE_DATA}
    assert implied_threat_model(both).letter == "G"
    assert grants_beyond("B", {Capability.BATCH_SIZE, Capability.SURROGATE_DATA}) == [
        Capability.SURROGATE_DATA
    ]


def test_every_built_in_attack_declares_its_letter_and_needs_no_more():
    built_in = {n: c for n, c in ATTACKS.items() if c.__module__.startswith("leakbench.")}
    assert {n: c.threat_letter for n, c in built_in.items()} == EXPECTED_LETTERS
    for name, cls in built_in.items():
        # What the attack requires under FedSGD stays within the letter it declares.
        assert cls.sok_threat_model().letter == cls.threat_letter, name
    # A protocol's extra requirement raises the letter: Inverting Gradients needs the local
    # hyperparameters under FedAvg, the SoK's training details (C).
    assert ATTACKS.get("inverting-gradients").sok_threat_model(["fedavg"]).letter == "C"
    facts = read_index()["attack"]
    assert {n: f["threat_letters"]["fedsgd"] for n, f in facts.items()} == EXPECTED_LETTERS


def test_leakbench_list_shows_each_attacks_letter(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def letter_line(attack: str) -> str:
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{attack} "))
        return lines[at + 3].strip()

    assert letter_line("gradinversion") == "SoK letter: E (statistics-informed eavesdropper)"
    assert letter_line("robbing-the-fed") == "SoK letter: G (data-enhanced manipulator)"
    expected = "SoK letter: B (informed eavesdropper); C under fedavg"
    assert letter_line("inverting-gradients") == expected


def test_the_new_tracks_state_their_letter_and_admit_their_attacks_and_grants():
    for name, letter in NEW_TRACKS.items():
        config = yaml.safe_load((TRACKS / f"{name}.yaml").read_text())
        assert config["track"]["threat_model"] == letter
        granted = {Capability(g) for g in config["grants"]}
        assert grants_beyond(letter, granted) == []
        protocols = protocol_from_spec(config.get("client_protocol", "fedsgd")).names()
        for attack in config["attacks"]:
            assumed = ATTACKS.get(attack).sok_threat_model(protocols)
            assert threat_model_of(letter).admits(assumed), (name, attack)


@pytest.mark.parametrize(
    ("track", "attack", "assumed"),
    [
        ("lfw-subset-fcn-cocktail-b64", "gradinversion", "E (statistics-informed eavesdropper)"),
        ("lfw-subset-fcn-cocktail-b64", "robbing-the-fed", "G (data-enhanced manipulator)"),
        ("lfw-subset-resnet18-gradinversion", "robbing-the-fed", "G (data-enhanced manipulator)"),
    ],
)
def test_an_attack_refuses_a_track_whose_threat_model_it_exceeds_in_one_line(
    track, attack, assumed, tmp_path, capsys
):
    config = yaml.safe_load((TRACKS / f"{track}.yaml").read_text())
    submission = {**config, "attacks": [attack], "attack_options": {}, "logger": "none"}
    path = tmp_path / "submission.yaml"
    path.write_text(yaml.safe_dump(submission))
    runs = tmp_path / "runs"
    code = main(["run", "--config", str(path), "--output-dir", str(runs)])
    err = capsys.readouterr().err
    letter = config["track"]["threat_model"]
    assert code == 2
    assert err.count("\n") == 1
    assert f"attack {attack!r} assumes threat model {assumed}, which the track" in err
    assert f"admits {', '.join(admitted_letters(letter))}) does not admit" in err
    assert not runs.exists(), "nothing is written for a refused run"


def tiny_track(letter: str, grants: list[str]) -> dict:
    return {
        "track": {
            "name": "tiny-letters",
            "kind": "attack",
            "ranking": "psnr.median",
            "free": ["attacks", "attack_options"],
            "threat_model": letter,
            "description": "synthetic track for tests",
            "verification": {
                "trials": 1,
                "private_transform": {"max_shift": 1, "flip": False, "brightness": 0.0},
                "tolerance": {"confidence": 0.95, "resamples": 10, "margin": 3.0},
            },
        },
        "dataset": "synthetic-uniform",
        "dataset_options": {"input_shape": [1, 6, 6], "num_classes": 3, "size": 8},
        "model": "fcn",
        "model_options": {"widths": [8]},
        "attacks": ["bias"],
        "batch_sizes": [1],
        "trials": 1,
        "grants": grants,
        "logger": "none",
        "covariates": [],
        "privacy_metrics": False,
    }


def test_a_track_that_grants_more_than_its_letter_knows_is_refused(tmp_path, capsys):
    path = tmp_path / "track.yaml"
    path.write_text(yaml.safe_dump(tiny_track("B", ["batch_size", "surrogate_data"])))
    assert main(["run", "--config", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "track 'tiny-letters' (threat model B (informed eavesdropper), admits A, B) " in err
    assert "grants surrogate_data, which that threat model does not know" in err


def test_the_entry_schema_takes_every_capability_a_track_can_grant():
    schema = load_schema()["properties"]["protocol"]["properties"]["grants"]["items"]["enum"]
    assert sorted(schema) == sorted(c.value for c in Capability)


@pytest.mark.parametrize(
    ("letter", "grants"),
    [
        ("B", ["batch_size"]),
        ("E", ["batch_size", "batchnorm_statistics"]),
        ("G", ["surrogate_data", "server_model"]),
    ],
)
def test_the_entry_records_the_attacks_and_the_tracks_letter(tmp_path, letter, grants):
    tracks = tmp_path / "tracks"
    tracks.mkdir()
    track = tiny_track(letter, grants)
    (tracks / "tiny-letters.yaml").write_text(yaml.safe_dump(track))
    run = {**track, "output_dir": str(tmp_path / "runs"), "run_name": "r", "threads": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", "--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    entry = make_entry(tmp_path / "runs" / "r", "bias__none__b1", tracks_dir=tracks)
    assert entry["threat_model"] == {"attack": "A", "track": letter}
    assert entry["protocol"]["grants"] == grants
    # The tables and the site show both letters; the site's filter offers every letter.
    write_entry(tmp_path / "runs" / "r", "bias__none__b1", tmp_path / "entries", tracks_dir=tracks)
    table = render(tmp_path / "entries", tracks)["tiny-letters.md"]
    assert f"SoK threat model {letter} ({threat_model_of(letter).name})" in table
    header, _, row = table.splitlines()[-3:]
    assert header.startswith("| rank | name | attack | threat model | defense |")
    assert row.startswith("| - | bias | bias | A | none |")
    build_site(tmp_path / "entries", tmp_path / "site", tracks)
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'data-name="bias" data-threat-model="A"' in index
    assert f'<option value="{letter}" data-admits="{" ".join(admitted_letters(letter))}">' in index
