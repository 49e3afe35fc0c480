"""``leakbench leaderboard figures`` on small fixture entries whose records are written here,
signed with a key made here: every printed figure is asserted exactly, from numbers chosen so
that each count is known by hand."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leakbench.cli import main
from leakbench.config import RunConfig
from leakbench.leaderboard.entry import (
    PROTOCOL_KEYS,
    RECORDS_SUFFIX,
    SCHEMA_VERSION,
    content_sha256,
    outcome_sha256,
    records_text,
    result_fields,
    sha256_file,
)
from leakbench.leaderboard.verify import VERIFICATION_RECORDS, commitment, figures
from leakbench.metrics import label_multisets, psnr_rate
from leakbench.protocol.records import trial_seed
from leakbench.results import cell_key

BATCH = 4
TRACK = {
    "track": {
        "name": "tiny-figures",
        "kind": "attack",
        "ranking": "psnr.median",
        "free": ["attacks", "attack_options"],
        "threat_model": "G",
        "description": "fixture track of the figures tests",
        "verification": {
            "trials": 2,
            "private_transform": {"noise": 0.02},
            "tolerance": {"confidence": 0.95, "resamples": 200, "margin": 3.0, "ceiling": 60.0},
        },
    },
    "dataset": "synthetic-uniform",
    "dataset_options": {"input_shape": [1, 6, 6], "num_classes": 3, "size": 16},
    "model": "fcn",
    "attacks": ["robbing-the-fed", "gradinversion", "cocktail-party"],
    "batch_sizes": [BATCH],
    "trials": 2,
    "seed": 0,
    "success_psnr": 40.0,
}


def record(trial: int, attack: str, psnrs, *, aligned=None, labels=None, inferred=None) -> dict:
    """A trial record as the harness writes it, with the fields the aggregates read."""
    aligned = aligned or psnrs
    samples = [
        {
            "sample_id": f"s{trial}-{i}",
            "matched_reconstruction": i,
            "mse": 10 ** (-p / 10),
            "psnr": p,
            "ssim": 0.5,
            "psnr_scale_aligned": a,
            "label_correct": None,
            "success": p >= TRACK["success_psnr"],
        }
        for i, (p, a) in enumerate(zip(psnrs, aligned, strict=True))
    ]
    return {
        "attack": attack,
        "batch_size": BATCH,
        "budget": {"limits": {}, "used": {"iterations": 0, "seconds": 0.1}},
        "cell": cell_key(attack, "none", BATCH),
        "client_protocol": {"name": "fedsgd"},
        "defense": "none",
        "error": None,
        "inferred_labels": inferred,
        "labels": labels or [0] * BATCH,
        "metrics": {"samples": samples, "batch_size_correct": None},
        "seed": trial_seed(TRACK["seed"], trial),
        "status": "ok",
        "time_s": 0.1,
        "trial": trial,
    }


def write_entry(
    entries: Path, tracks: Path, attack: str, hparams: dict, runs: list, verified, key=None
) -> Path:
    """An entry of the fixture track with these records; with ``verified`` records, a
    verification block signed by ``key`` (figures recomputed from them, as the board does)."""
    track_file = tracks / "tiny-figures.yaml"
    protocol = RunConfig.from_mapping(dict(TRACK)).to_dict()
    text = records_text(runs)
    entry = {
        "schema_version": SCHEMA_VERSION,
        "track": "tiny-figures",
        "track_sha256": sha256_file(track_file),
        "kind": "attack",
        "name": attack,
        "attack": {
            "name": attack,
            "options": {},
            "hparams": hparams,
            "code": {"distribution": "leakbench", "version": "0", "files_sha256": "0" * 64},
            "distribution": {"name": "leakbench", "version": "0"},
        },
        "defense": {"name": "none", "options": {}},
        "protocol": {**{k: protocol[k] for k in PROTOCOL_KEYS}, "batch_size": BATCH},
        "results": result_fields(runs),
        "records": {
            "trials": len(runs),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "outcome_sha256": outcome_sha256(runs),
        },
        "environment": {"leakbench": "0", "torch": "0", "python": "3", "device": "cpu"},
        "threat_model": {"attack": "G", "track": "G"},
        "date": "2026-12-02",
    }
    path = entries / "tiny-figures" / f"{attack}-b{BATCH}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.stem + RECORDS_SUFFIX).write_text(text)
    if verified is not None:
        from leakbench.leaderboard.signing import load_private_key, sign

        verified_text = records_text(verified)
        path.with_name(path.stem + VERIFICATION_RECORDS).write_text(verified_text)
        seeds = {"seed": 7, "private_transform": 8}
        transform = TRACK["track"]["verification"]["private_transform"]
        tolerance = TRACK["track"]["verification"]["tolerance"]
        block = {
            "date": "2026-12-02",
            "leakbench": "0",
            "git_commit": None,
            "seeds": seeds,
            "commitments": {
                "seed": commitment(seeds["seed"]),
                "private_transform": commitment({"seed": 8, **transform}),
            },
            "private_transform": transform,
            "data": "fixture",
            "sandbox": "fixture",
            "trials": len(verified),
            "failed": 0,
            "records_sha256": hashlib.sha256(verified_text.encode()).hexdigest(),
            **figures(
                verified,
                entry["results"]["psnr"]["median"],
                entry["results"]["success_rate"],
                "psnr.median",
                tolerance,
                "attack",
                seeds["seed"],
            ),
            "tolerance": tolerance,
            "entry_sha256": content_sha256(entry),
            "attack_code": entry["attack"]["code"],
        }
        block["signature"] = sign(block, load_private_key(key))
        entry["verification"] = block
    path.write_text(json.dumps(entry, indent=2) + "\n")
    return path


# Robbing the Fed with k = 16 bins at B = 4: expected exact fraction (15/16)^3 = 0.823974609375.
IMPRINT_RUN = [[130.0, 120.0, 45.0, 12.0], [140.0, 60.0, 35.0, 20.0]]
IMPRINT_VERIFIED = [[101.0, 99.0, 41.0, 39.0], [150.0, 10.0, 11.0, 12.0]]
LABELS = [[0, 0, 1, 1], [0, 1, 1, 1]]
RESTORED_RUN = [[1, 0, 0, 1], [0, 0, 1, 1]]  # the first multiset equal; the second holds 3 of 4
RESTORED_VERIFIED = [[2, 2, 2, 2], [1, 1, 0, 0]]  # none; 3 of 4


@pytest.fixture
def board(tmp_path):
    """(entries, tracks, trusted keys) of three fixture entries: Robbing the Fed and
    GradInversion verified, the cocktail party not."""
    from leakbench.leaderboard.signing import generate_key

    tracks, entries = tmp_path / "tracks", tmp_path / "entries"
    tracks.mkdir()
    (tracks / "tiny-figures.yaml").write_text(yaml.safe_dump(TRACK, sort_keys=False))
    generate_key(tmp_path / "board.pem", "tests", tmp_path / "trusted")
    key = tmp_path / "board.pem"
    imprint = [record(t, "robbing-the-fed", p) for t, p in enumerate(IMPRINT_RUN)]
    imprint_verified = [record(t, "robbing-the-fed", p) for t, p in enumerate(IMPRINT_VERIFIED)]
    write_entry(entries, tracks, "robbing-the-fed", {"bins": 16}, imprint, imprint_verified, key)
    grad = [
        record(t, "gradinversion", [10.0, 11.0, 12.0, 13.0], labels=y, inferred=r)
        for t, (y, r) in enumerate(zip(LABELS, RESTORED_RUN, strict=True))
    ]
    grad_verified = [
        record(t, "gradinversion", [20.0, 21.0, 22.0, 23.0], labels=y, inferred=r)
        for t, (y, r) in enumerate(zip(LABELS, RESTORED_VERIFIED, strict=True))
    ]
    write_entry(entries, tracks, "gradinversion", {}, grad, grad_verified, key)
    cocktail = [
        record(t, "cocktail-party", [8.0, 9.0, 10.0, 11.0], aligned=[14.0, 15.0, 16.0, 17.0])
        for t in range(2)
    ]
    write_entry(entries, tracks, "cocktail-party", {}, cocktail, None)
    return entries, tracks, tmp_path / "trusted"


def figures_cli(capsys, board, *tracks: str) -> tuple[int, str, str]:
    entries, folder, keys = board
    argv = ["leaderboard", "figures", *tracks, "--entries-dir", str(entries)]
    code = main([*argv, "--tracks-dir", str(folder), "--keys-dir", str(keys)])
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str, entry: str) -> dict[str, list[str]]:
    """The figure rows of one entry: label -> the words after it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {entry}-b{BATCH}:"))
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("    ") or line.startswith("    Table"):
            break
        label, _, rest = line.strip().partition("  ")
        table[label] = rest.split()
    return table


def test_run_and_verification_figures_and_the_imprint_expectation_are_exact(capsys, board):
    code, out, err = figures_cli(capsys, board, "tiny-figures")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("tiny-figures (SoK threat model G; synthetic-uniform")
    assert "  robbing-the-fed-b4: robbing-the-fed, B = 4, fedsgd; verification passed" in out
    imprint = rows(out, "robbing-the-fed")
    assert imprint["trials (failed)"] == ["2", "(0)", "2", "(0)"]
    # Medians of [12, 20, 35, 45, 60, 120, 130, 140] and [10, 11, 12, 39, 41, 99, 101, 150].
    assert imprint["PSNR median (dB)"] == ["52.50", "40.00"]
    # >= 100 dB: 3 of 8 and 2 of 8; >= 40 dB: 5 of 8 and 4 of 8.
    exact = imprint["images at >= 100 dB (exact)"]
    assert exact[:4] == ["0.375", "0.250", "expected", "0.824:"]
    assert " ".join(exact[4:]) == "(1 - 1/k)^(B - 1), k = 16 equally likely bins, B = 4 (FedSGD)"
    assert imprint["images at >= 40 dB (success)"] == ["0.625", "0.500"]
    assert "label multisets exact (trials)" not in imprint  # the imprint restores no labels


def test_label_multisets_are_counted_per_trial(capsys, board):
    code, out, _ = figures_cli(capsys, board, "tiny-figures")
    grad = rows(out, "gradinversion")
    assert grad["label multisets exact (trials)"] == ["1/2", "0/2"]
    assert grad["labels restored (multiset)"] == ["7/8", "3/8"]
    assert grad["PSNR median (dB)"] == ["11.50", "21.50"]
    assert "expected" not in " ".join(sum(grad.values(), []))  # no expected figure defined


def test_an_unverified_entry_shows_its_run_and_scale_aligned_figures(capsys, board):
    _, out, _ = figures_cli(capsys, board, "tiny-figures")
    assert "  cocktail-party-b4: cocktail-party, B = 4, fedsgd; verification unverified" in out
    cocktail = rows(out, "cocktail-party")
    assert cocktail["PSNR median (dB)"] == ["9.50", "-"]
    assert cocktail["scale-aligned PSNR median (dB)"] == ["15.50", "-"]


def test_each_new_attack_has_its_paper_and_says_what_was_not_found(capsys, board):
    from leakbench.leaderboard.entry_figures import PAPERS

    assert set(PAPERS) == {"robbing-the-fed", "gradinversion", "cocktail-party"}
    _, out, _ = figures_cli(capsys, board, "tiny-figures")
    for attack in PAPERS:
        assert f"  paper of {attack}: {PAPERS[attack].citation}" in out
    cocktail = out[out.index("  paper of cocktail-party") :].split("  paper of ")[1]
    assert "not found: no figure of the paper could be read" in cocktail
    assert "Table 1 (ImageNet, ResNet-50, B = 8" in out  # GradInversion's label restoration


def test_no_track_named_shows_every_track_with_entries(capsys, board):
    code, out, _ = figures_cli(capsys, board)
    assert code == 0 and out.startswith("tiny-figures (")


def test_a_tampered_entry_is_refused_in_one_line_and_the_others_still_shown(capsys, board):
    entries = board[0]
    records = entries / "tiny-figures" / f"cocktail-party-b{BATCH}{RECORDS_SUFFIX}"
    records.write_text(records.read_text().replace('"psnr":8.0', '"psnr":80.0'))
    code, out, err = figures_cli(capsys, board, "tiny-figures")
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("leakbench: error: ") and "its records hash does not match" in line
    assert "robbing-the-fed-b4:" in out and "cocktail-party-b4:" not in out


def test_an_unknown_track_is_refused_before_any_work(capsys, board):
    code, out, err = figures_cli(capsys, board, "tiny-figures", "no-such-track")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no-such-track" in err


def test_the_metrics_count_failed_trials_as_nothing_restored():
    ok = record(
        0, "gradinversion", [100.0, 99.0, 40.0, 39.9], labels=[3, 3, 1, 2], inferred=[3, 1, 1, 2]
    )
    failed = {**record(1, "gradinversion", [10.0] * 4, labels=[0, 1, 2, 3]), "status": "failed"}
    assert psnr_rate([ok, failed], 100.0) == 1 / 8
    assert psnr_rate([ok, failed], 40.0) == 3 / 8
    assert psnr_rate([], 40.0) is None
    assert label_multisets([ok, failed]) == {
        "trials": 2,
        "reported": 1,
        "exact": 0,
        "labels": 8,
        "restored": 3,
    }


NO_TORCH = """
import contextlib, io, sys
from leakbench.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "lightning", "sklearn") if m in sys.modules))
"""


def test_entries_without_an_expected_figure_are_read_without_torch(board):
    entries, tracks, keys = board
    (entries / "tiny-figures" / f"robbing-the-fed-b{BATCH}.json").unlink()  # the one needing torch
    argv = ["leaderboard", "figures", "tiny-figures", "--entries-dir", str(entries)]
    argv += ["--tracks-dir", str(tracks), "--keys-dir", str(keys)]
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines()[-1] == "0 []"
