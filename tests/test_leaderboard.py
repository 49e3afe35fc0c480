"""Tracks, entries and tables: a protocol run becomes a validated entry and a ranked row."""

import json

import pytest
import yaml

import tests.components  # noqa: F401
from leakbench.cli import main
from leakbench.leaderboard import LEADERBOARDS, make_entry, render, validate_entry

TRACK = {
    "track": {
        "name": "tiny-test",
        "kind": "attack",
        "ranking": "psnr.median",
        "free": ["attacks", "attack_options"],
        "description": "synthetic track for tests",
    },
    "dataset": "synthetic-uniform",
    "dataset_options": {"input_shape": [1, 6, 6], "num_classes": 3, "size": 16},
    "model": "fcn",
    "model_options": {"widths": [8]},
    "attacks": ["noisy-copy-test"],
    "batch_sizes": [1],
    "trials": 2,
}


@pytest.fixture
def track_dir(tmp_path):
    tracks = tmp_path / "tracks"
    tracks.mkdir()
    (tracks / "tiny-test.yaml").write_text(yaml.safe_dump(TRACK))
    return tracks


def run_track(tmp_path, track_dir, name, **changes):
    config = {
        **TRACK,
        **changes,
        "output_dir": str(tmp_path / "runs"),
        "run_name": name,
        "logger": "none",
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--no-progress"]) == 0
    return tmp_path / "runs" / name


def test_track_run_becomes_a_valid_entry_and_a_ranked_table(tmp_path, track_dir):
    run_dir = run_track(tmp_path, track_dir, "a")
    entry = make_entry(run_dir, "noisy-copy-test__none__b1", tracks_dir=track_dir)
    assert entry["track"] == "tiny-test" and entry["protocol"]["batch_size"] == 1
    assert entry["results"]["trials"] == 2

    entries = tmp_path / "entries"
    code = main(
        [
            "leaderboard",
            "entry",
            str(run_dir),
            "--cell",
            "noisy-copy-test__none__b1",
            "--entries-dir",
            str(entries),
            "--tracks-dir",
            str(track_dir),
        ]
    )
    assert code == 0
    second = json.loads(json.dumps(entry))
    second["name"] = "better"
    second["results"]["psnr"]["median"] = 99.0
    (entries / "tiny-test" / "better-b1.json").write_text(json.dumps(second))
    tables = render(entries, track_dir)
    rows = tables["tiny-test.md"].splitlines()
    assert rows[-2].startswith("| 1 | better |") and rows[-1].startswith("| 2 | noisy-copy-test |")
    assert tables["tiny-test.csv"].splitlines()[0].startswith("rank,name,attack")


def test_a_run_that_changed_the_protocol_is_refused(tmp_path, track_dir):
    run_dir = run_track(tmp_path, track_dir, "b", trials=1)
    with pytest.raises(ValueError, match="changed the protocol of track 'tiny-test' in: trials"):
        make_entry(run_dir, "noisy-copy-test__none__b1", tracks_dir=track_dir)


def test_schema_rejects_string_typed_numbers(tmp_path, track_dir):
    run_dir = run_track(tmp_path, track_dir, "c")
    entry = make_entry(run_dir, "noisy-copy-test__none__b1", tracks_dir=track_dir)
    entry["results"]["psnr"]["median"] = "12.3"
    with pytest.raises(ValueError, match="invalid leaderboard entry at results/psnr/median"):
        validate_entry(entry)


def test_shipped_tracks_are_valid_run_configs():
    from leakbench.config import RunConfig

    tracks = sorted((LEADERBOARDS / "tracks").glob("*.yaml"))
    assert tracks
    for path in tracks:
        config = RunConfig.load(path)
        assert config.track["name"] == path.stem
