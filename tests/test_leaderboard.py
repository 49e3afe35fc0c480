"""Tracks, entries, verification, tables and the site, on a tiny synthetic track.

One run of the tiny track (an honest random attack, the exact bias attack, and two attacks that
cheat through the public protocol) is submitted once per module; each test works on its own
copy of the entries.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import tests.components  # noqa: F401  (registers noisy-copy-test)
import tests.leaderboard_attacks  # noqa: F401  (registers the cheating attacks)
from leakbench.cli import main
from leakbench.leaderboard import (
    LEADERBOARDS,
    TRACKS,
    EntryError,
    build_site,
    load_board,
    load_entry,
    make_entry,
    render,
    submit,
    validate_entry,
    verify_entry,
)
from leakbench.leaderboard.entry import RECORDS_SUFFIX, content_sha256, read_records, sibling
from leakbench.leaderboard.verify import MIN_TRIALS

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("leaderboard")

DATA = {"input_shape": [1, 6, 6], "num_classes": 3, "size": 16}
TRACK = {
    "track": {
        "name": "tiny-test",
        "kind": "attack",
        "ranking": "psnr.median",
        "free": ["attacks", "attack_options"],
        "description": "synthetic track for tests",
        "verification": {
            "trials": 2,
            "private_transform": {"rotation": 5.0, "noise": 0.02},
            "tolerance": {"confidence": 0.95, "resamples": 200, "margin": 3.0, "ceiling": 60.0},
        },
    },
    "dataset": "synthetic-uniform",
    "dataset_options": DATA,
    "model": "fcn",
    "model_options": {"widths": [8]},
    "attacks": ["noisy-copy-test"],
    "batch_sizes": [1],
    "trials": 2,
}
CHEATS = {"dataset_options": DATA, "trials": 2, "seed": 0}
ATTACKS = {
    "noisy-copy-test": {},
    "bias": {},
    "memorise-plan-test": CHEATS,
    "enumerate-dataset-test": CHEATS,
}


def run_track(base: Path, tracks: Path, name: str, **changes) -> Path:
    config = {
        **TRACK,
        **changes,
        "output_dir": str(base / "runs"),
        "run_name": name,
        "logger": "none",
        "threads": 1,
    }
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--no-progress"]) == 0
    return base / "runs" / name


@pytest.fixture(scope="module")
def board_key(tmp_path_factory):
    """A board key pair for these tests: (private key file, folder of trusted public keys)."""
    from leakbench.leaderboard.signing import generate_key

    base = tmp_path_factory.mktemp("keys")
    generate_key(base / "board.pem", "tests", base / "trusted")
    return base / "board.pem", base / "trusted"


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """(tracks dir, entries dir, run dir) of one run of every attack of ATTACKS."""
    base = tmp_path_factory.mktemp("board")
    tracks = base / "tracks"
    tracks.mkdir()
    (tracks / "tiny-test.yaml").write_text(yaml.safe_dump(TRACK))
    run_dir = run_track(base, tracks, "all", attacks=list(ATTACKS), attack_options=ATTACKS)
    submit(run_dir, entries_dir=base / "entries", tracks_dir=tracks, submitter="tests")
    return tracks, base / "entries", run_dir


@pytest.fixture
def board(submitted, tmp_path, board_key, monkeypatch):
    """A private copy of the submitted entries: (tracks dir, entries dir, entry path by name).
    The board trusts the tests' key only, which verification signs with."""
    from leakbench.leaderboard import signing

    monkeypatch.setattr(signing, "KEYS", board_key[1])
    monkeypatch.setenv(signing.KEY_FILE_ENV, str(board_key[0]))
    tracks, entries, _ = submitted
    copy = tmp_path / "entries"
    shutil.copytree(entries, copy)
    paths = {p.stem.removesuffix("-b1"): p for p in (copy / "tiny-test").glob("*.json")}
    return tracks, copy, paths


def ranks(entries: Path, tracks: Path) -> dict[str, tuple[str, str]]:
    (tiny,) = [b for b in load_board(entries, tracks) if b.name == "tiny-test"]
    return {row.entry["name"]: (row.rank_text, row.status) for row in tiny.rows}


def test_a_track_run_becomes_entries_with_their_records(submitted, board):
    tracks, entries, paths = board
    _, _, run_dir = submitted
    assert sorted(paths) == sorted(ATTACKS)
    summary = json.loads((run_dir / "summary.json").read_text())["cells"]
    for name, path in paths.items():
        entry = load_entry(path, tracks)
        assert entry["protocol"]["batch_size"] == 1 and entry["records"]["trials"] == 2
        assert entry["results"]["psnr"] == summary[f"{name}__none__b1"]["psnr"]
        records = read_records(sibling(path, RECORDS_SUFFIX))
        assert [r["trial"] for r in records] == [0, 1] and {r["attack"] for r in records} == {name}
        assert sibling(path, ".grid.png").is_file()
    bias = load_entry(paths["bias"], tracks)
    assert bias["attack"]["distribution"] == {"name": "leakbench", "version": "0.1.0"}
    assert bias["attack"]["hparams"] == {"relative_threshold": 0.0}  # defaults included
    assert bias["attack"]["code"]["distribution"] == "leakbench"
    noisy = load_entry(paths["noisy-copy-test"], tracks)["attack"]
    assert noisy["distribution"] is None and noisy["code"]["distribution"] is None
    # `leaderboard entry` is the same code path, for one cell.
    code = main(
        [
            "leaderboard",
            "entry",
            str(run_dir),
            "--cell",
            "bias__none__b1",
            "--name",
            "bias again",
            "--entries-dir",
            str(entries),
            "--tracks-dir",
            str(tracks),
        ]
    )
    again = load_entry(entries / "tiny-test" / "bias-again-b1.json", tracks)
    assert code == 0 and again["records"] == bias["records"]


def test_the_outcome_hash_is_the_same_for_two_runs_of_one_configuration(submitted, tmp_path):
    tracks, entries, _ = submitted
    run_dir = run_track(tmp_path, tracks, "again", attacks=["bias"])
    entry = make_entry(run_dir, "bias__none__b1", tracks_dir=tracks)
    first = load_entry(entries / "tiny-test" / "bias-b1.json", tracks)
    assert entry["records"]["outcome_sha256"] == first["records"]["outcome_sha256"]


def test_unverified_claims_are_listed_apart_and_never_ranked(board):
    tracks, entries, _ = board
    assert ranks(entries, tracks) == {
        name: ("-", "unverified")
        for name in ("bias", "enumerate-dataset-test", "memorise-plan-test", "noisy-copy-test")
    }
    table = render(entries, tracks)["tiny-test.md"].splitlines()
    assert table[-4].startswith("| - | bias |")  # by name: a claim alone earns no place
    assert table[-1].startswith("| - | noisy-copy-test |") and table[-1].endswith("unverified |")


def test_honest_entries_verify_and_the_seeds_stay_secret_until_the_run_ends(
    board, tmp_path, board_key
):
    tracks, entries, paths = board
    for name in ("bias", "noisy-copy-test"):
        block = verify_entry(
            paths[name], tracks_dir=tracks, runs_dir=tmp_path / "v", threads=1, echo=print
        )
        assert block["passed"], block["reason"]
        assert block["seeds"]["seed"] > 2**64 and block["trials"] == 2
        (run_dir,) = (tmp_path / "v").glob(f"verify-tiny-test-{name}-b1-*")
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert block["commitments"] == {k: saved[k] for k in ("seed", "private_transform")}
        written = "".join(
            p.read_text() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".png"
        )
        for secret in block["seeds"].values():
            assert str(secret) not in written
        shutil.rmtree(tmp_path / "v")
    assert ranks(entries, tracks)["bias"] == ("1", "verified")
    assert ranks(entries, tracks)["noisy-copy-test"] == ("2", "verified")
    entry = load_entry(paths["bias"], tracks)  # the verified entry loads: its block checks out
    assert entry["verification"]["verified"] == 60.0  # capped at the track's ceiling
    from leakbench.leaderboard.signing import trusted_keys

    assert list(trusted_keys(board_key[1])) == [entry["verification"]["signature"]["key"]]


def test_cheating_attacks_fail_verification_and_leave_the_ranking(board):
    tracks, entries, paths = board
    for name in ("memorise-plan-test", "enumerate-dataset-test"):
        block = verify_entry(paths[name], tracks_dir=tracks, threads=1, echo=print)
        assert not block["passed"] and block["claimed"] == 300.0
        # Far below the claim: with a gain of at least 5 % on every sample, no public image
        # comes within a few dB of the private one.
        assert block["interval"][1] < 45, block["reason"]
    assert ranks(entries, tracks) == {
        "bias": ("-", "unverified"),
        "noisy-copy-test": ("-", "unverified"),
        "enumerate-dataset-test": ("-", "failed"),
        "memorise-plan-test": ("-", "failed"),
    }
    table = render(entries, tracks)["tiny-test.md"]
    assert "| - | memorise-plan-test |" in table and table.rstrip().endswith("| failed |")


def _edit(path: Path, change) -> None:
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry, indent=2))


def _set_psnr(entry):
    entry["results"]["psnr"]["median"] = 99.0


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda p: _edit(p, _set_psnr), "results differ from its records in: results.psnr.median"),
        (
            lambda p: sibling(p, RECORDS_SUFFIX).write_text(
                sibling(p, RECORDS_SUFFIX).read_text().replace('"status":"ok"', '"status":"xx"', 1)
            ),
            "records hash does not match",
        ),
        (lambda p: _edit(p, lambda e: e.update(track="no-such-track")), "unknown track"),
        (lambda p: _edit(p, lambda e: e["results"].update(failed="0")), "invalid leaderboard"),
        (lambda p: sibling(p, RECORDS_SUFFIX).unlink(), "records file"),
        (lambda p: _edit(p, lambda e: e["attack"].update(name="bias")), "records belong to"),
        (lambda p: _edit(p, lambda e: e["protocol"].update(trials=3)), "protocol differs"),
    ],
)
def test_a_tampered_entry_is_refused_everywhere(board, tmp_path, capsys, tamper, reason):
    tracks, entries, paths = board
    tamper(paths["noisy-copy-test"])
    with pytest.raises(EntryError, match=reason):
        load_entry(paths["noisy-copy-test"], tracks)
    for argv in (
        ["leaderboard", "verify", str(paths["noisy-copy-test"])],
        ["leaderboard", "build", "--out-dir", str(tmp_path / "site")],
        ["leaderboard", "render", "--out-dir", str(tmp_path / "tables")],
    ):
        capsys.readouterr()
        assert main([*argv, "--tracks-dir", str(tracks)] + _entries(argv, entries)) == 2
        error = capsys.readouterr().err
        assert reason.split(":")[0] in error and error.count("\n") == 1
    assert not (tmp_path / "site").exists() and not (tmp_path / "tables").exists()


def _entries(argv: list[str], entries: Path) -> list[str]:
    return [] if argv[1] == "verify" else ["--entries-dir", str(entries)]


def test_an_entry_edited_after_verification_is_refused(board):
    tracks, _, paths = board
    verify_entry(paths["noisy-copy-test"], tracks_dir=tracks, threads=1, echo=print)
    load_entry(paths["noisy-copy-test"], tracks)
    _edit(paths["noisy-copy-test"], lambda e: e.update(submitter="someone else"))
    with pytest.raises(EntryError, match="edited after verification"):
        load_entry(paths["noisy-copy-test"], tracks)
    _edit(paths["noisy-copy-test"], lambda e: e.update(submitter="tests"))
    load_entry(paths["noisy-copy-test"], tracks)
    _edit(paths["noisy-copy-test"], lambda e: e["verification"].update(passed=False))
    with pytest.raises(EntryError, match="does not match the board's signature"):
        load_entry(paths["noisy-copy-test"], tracks)


def _forge_fresh_block(entry: dict, path: Path) -> None:
    """A block made from scratch: fresh seeds and their commitments, the entry's own records
    as the "verification", the figures recomputed from them, the entry's hash: all consistent."""
    import secrets

    from leakbench.leaderboard.verify import VERIFICATION_RECORDS, commitment, figures

    records = sibling(path, RECORDS_SUFFIX)
    shutil.copy(records, sibling(path, VERIFICATION_RECORDS))
    block = dict(entry["verification"])
    del block["signature"]
    seeds = {"seed": secrets.randbits(128), "private_transform": secrets.randbits(128)}
    transform = {"seed": seeds["private_transform"], **block["private_transform"]}
    block.update(
        seeds=seeds,
        commitments={"seed": commitment(seeds["seed"]), "private_transform": commitment(transform)},
        records_sha256=__import__("hashlib").sha256(records.read_bytes()).hexdigest(),
        **figures(
            read_records(records),
            entry["results"]["psnr"]["median"],
            entry["results"]["success_rate"],
            block["statistic"],
            block["tolerance"],
            entry["kind"],
            seeds["seed"],
        ),
    )
    block["entry_sha256"] = content_sha256(entry)
    entry["verification"] = block


def _forge_with_own_key(entry: dict, key_file: Path) -> None:
    from leakbench.leaderboard.signing import load_private_key, sign

    block = dict(entry["verification"])
    block["entry_sha256"] = content_sha256(entry)
    block["signature"] = sign(block, load_private_key(key_file))
    entry["verification"] = block


def test_forged_verifications_are_refused_with_the_reason(board, tmp_path, capsys):
    """Each way a submitter could fake a verified mark, refused by load, render and build."""
    from leakbench.leaderboard.signing import generate_key

    tracks, entries, paths = board
    verify_entry(paths["bias"], tracks_dir=tracks, threads=1, echo=print)
    generate_key(tmp_path / "mine.pem", "mine", tmp_path / "my-keys")
    signed = json.loads(paths["bias"].read_text())
    copy_of = paths["noisy-copy-test"]
    originals = [paths["bias"], copy_of, sibling(paths["bias"], ".verification.jsonl")]
    honest = {p: p.read_text() for p in originals}

    def copied(entry):  # another entry's verified block, its hash recomputed
        entry["verification"] = dict(signed["verification"])
        entry["verification"]["entry_sha256"] = content_sha256(entry)

    def edited_hparams(entry):  # the options changed, the block's hash recomputed
        entry["attack"]["hparams"]["relative_threshold"] = 0.5
        entry["verification"]["entry_sha256"] = content_sha256(entry)

    forgeries = [
        (paths["bias"], lambda e: _forge_fresh_block(e, paths["bias"]), "not signed"),
        (paths["bias"], lambda e: _forge_with_own_key(e, tmp_path / "mine.pem"), "not trust"),
        (copy_of, copied, "does not match the board's signature"),
        (paths["bias"], edited_hparams, "does not match the board's signature"),
        (paths["bias"], lambda e: e["attack"]["code"].update(version="9.9"), "edited after"),
        (paths["bias"], lambda e: e.update(name="bias, renamed"), "edited after verification"),
    ]
    for path, forge, reason in forgeries:
        if path == copy_of:
            shutil.copy(
                sibling(paths["bias"], ".verification.jsonl"), sibling(path, ".verification.jsonl")
            )
        _edit(path, forge)
        with pytest.raises(EntryError, match=reason):
            load_entry(path, tracks)
        for argv in (
            ["render", "--out-dir", str(tmp_path / "t")],
            ["build", "--out-dir", str(tmp_path / "s")],
        ):
            capsys.readouterr()
            code = main(
                ["leaderboard", *argv, "--tracks-dir", str(tracks), "--entries-dir", str(entries)]
            )
            error = capsys.readouterr().err
            assert code == 2 and error.count("\n") == 1 and reason.split(":")[0] in error
        for restored, text in honest.items():
            restored.write_text(text)
        sibling(copy_of, ".verification.jsonl").unlink(missing_ok=True)
    # Records edited, every hash the entry holds recomputed: the signature no longer covers it.
    records = sibling(paths["bias"], RECORDS_SUFFIX)
    records.write_text(records.read_text().replace('"trial":1', '"trial":1,"x":1', 1))
    _edit(
        paths["bias"],
        lambda e: e["records"].update(
            sha256=__import__("hashlib").sha256(records.read_bytes()).hexdigest()
        ),
    )
    with pytest.raises(EntryError):
        load_entry(paths["bias"], tracks)


def test_verify_refuses_an_attack_that_is_not_installed_as_it_ran(board, monkeypatch, capsys):
    from leakbench.registry import ATTACKS as REGISTRY

    tracks, _, paths = board
    argv = ["leaderboard", "verify", str(paths["bias"]), "--tracks-dir", str(tracks)]
    monkeypatch.setitem(REGISTRY._items, "bias", tests.components.NoisyCopy)  # other code
    code = main(argv)
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "the installed attack 'bias' is not the code the entry ran" in error
    monkeypatch.delitem(REGISTRY._items, "bias")
    code = main(argv)
    error = capsys.readouterr().err
    assert code == 2 and "attack 'bias' is not installed: use leakbench 0.1.0" in error


def test_a_run_that_changed_the_protocol_is_refused(submitted, tmp_path):
    tracks, _, _ = submitted
    run_dir = run_track(tmp_path, tracks, "b", trials=1)
    with pytest.raises(ValueError, match="changed the protocol of track 'tiny-test' in: trials"):
        make_entry(run_dir, "noisy-copy-test__none__b1", tracks_dir=tracks)


def test_schema_rejects_string_typed_numbers(board):
    tracks, _, paths = board
    entry = load_entry(paths["bias"], tracks)
    entry["results"]["psnr"]["median"] = "12.3"
    with pytest.raises(ValueError, match="invalid leaderboard entry at results/psnr/median"):
        validate_entry(entry)


def test_the_site_renders_deterministically(board, tmp_path):
    tracks, entries, paths = board
    first = build_site(entries, tmp_path / "one", tracks)
    second = build_site(entries, tmp_path / "two", tracks)
    relative = [p.relative_to(tmp_path / "one") for p in first]
    assert relative == [p.relative_to(tmp_path / "two") for p in second]
    assert all(
        (tmp_path / "one" / r).read_bytes() == (tmp_path / "two" / r).read_bytes() for r in relative
    )
    index = (tmp_path / "one" / "index.html").read_text()
    assert index.count('<tr class="unverified"') == len(paths)
    page = tmp_path / "one" / "tiny-test" / "bias-b1.html"
    assert page.is_file() and 'src="bias-b1.grid.png"' in page.read_text()
    assert (tmp_path / "one" / "tiny-test" / "bias-b1.grid.png").is_file()
    # A rebuild replaces an earlier build; a folder that is not a site is left alone.
    build_site(entries, tmp_path / "one", tracks)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no leakbench site"):
        build_site(entries, tmp_path / "other", tracks)


def test_shipped_tracks_are_valid_run_configs_that_declare_verification():
    from leakbench.config import RunConfig

    tracks = sorted(TRACKS.glob("*.yaml"))
    assert tracks and sorted((LEADERBOARDS / "tracks").glob("*.yaml")) != []
    for path in tracks:
        config = RunConfig.load(path)
        assert config.track["name"] == path.stem
        if config.track["kind"] == "attack":
            verification = config.track["verification"]
            assert {"trials", "private_transform", "tolerance"} <= set(verification)
            assert verification["trials"] >= MIN_TRIALS, path.name
            assert verification["private_transform"]["noise"] > 0


def test_shipped_entries_tables_and_site_are_what_the_commands_make(tmp_path):
    entries = LEADERBOARDS / "entries"
    boards = load_board(entries)
    rows = [row for board in boards for row in board.rows]
    assert rows, "no shipped entries"
    # Every shipped entry was verified by the board and is signed with its key (load_board
    # checked each signature against leaderboards/keys).
    assert all(row.status in ("verified", "failed") for row in rows)
    tables = render(entries)
    assert sorted(tables) == sorted(p.name for p in (LEADERBOARDS / "tables").iterdir())
    for name, text in tables.items():
        assert (LEADERBOARDS / "tables" / name).read_text() == text, name
    built = build_site(entries, tmp_path / "site")
    shipped = LEADERBOARDS / "site"
    for path in built:
        assert (shipped / path.relative_to(tmp_path / "site")).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("trials,samples", [(1, 5), (2, 1), (3, 7), (10, 4), (10, 256)])
def test_bootstrap_medians_are_numpys_bit_for_bit(trials: int, samples: int) -> None:
    """The verification's bootstrap finds each resample's median without building it; the
    figures signed into every block must stay exactly what np.median gives (ties, capped
    values, odd and even sizes)."""
    import numpy as np

    from leakbench.metrics import bootstrap_medians

    rng = np.random.default_rng(samples)
    for values in (
        rng.normal(20, 5, (trials, samples)),
        np.round(rng.normal(20, 5, (trials, samples))),  # ties
        np.minimum(rng.normal(55, 10, (trials, samples)), 60.0),  # capped at the ceiling
    ):
        picks = rng.integers(0, trials, (500, trials))
        expected = np.median(values[picks].reshape(len(picks), -1), axis=1)
        assert np.array_equal(bootstrap_medians(values, picks), expected)
