"""Defense entries, on a tiny defense track: ``leakbench defenses`` -> ``submit`` -> ``leaderboard
verify`` (the board's attacks on the setting's re-trained victim, in the sandbox, signed) ->
``leaderboard build`` (a page per defense track with the privacy-utility scatter); forged and
tampered defense entries are refused with the reason.

One run of the tiny track is submitted once per module; each test works on its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from leakbench.cli import main
from leakbench.leaderboard import EntryError, build_site, load_defense_entry, verify_entry
from leakbench.leaderboard.defense_board import load_defense_board
from leakbench.leaderboard.defense_entry import worst_case_records
from leakbench.leaderboard.entry import RECORDS_SUFFIX, content_sha256, sibling
from tests.browser import Browser, find_chromium

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("defense_board")

TRACK = {
    "track": {
        "name": "tiny-defense-board",
        "kind": "defense",
        "ranking": "psnr.median",
        "free": ["defenses"],
        "description": "synthetic defense track for tests",
        "attacks": ["bias", "idlg"],
        "utility": {"epochs": 1, "seeds": [0, 1], "lr": 0.01, "optimizer": "adam"},
        "defenses": [
            {"label": "none", "defense": "none"},
            {"label": "noise s=0.1", "defense": "noise", "options": {"scale": 0.1}},
        ],
        "verification": {
            "trials": 2,
            "private_transform": {"rotation": 5.0, "noise": 0.02},
            "tolerance": {"confidence": 0.95, "resamples": 200, "margin": 3.0, "ceiling": 60.0},
        },
    },
    "dataset": "synthetic-uniform",
    "dataset_options": {"input_shape": [1, 6, 6], "size": 48, "num_classes": 4},
    "model": "fcn",
    "model_options": {"widths": [16]},
    "batch_sizes": [1],
    "trials": 2,
    "grants": ["batch_size"],
    "attack_options": {"idlg": {"iterations": 5}, "noise-aware": {"iterations": 5}},
    "isolation": "in-process",
    "privacy_metrics": False,
}


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """(defense tracks dir, defense entries dir, run dir) of one run of the tiny track."""
    base = tmp_path_factory.mktemp("defense-board")
    tracks = base / "defense-tracks"
    tracks.mkdir()
    (tracks / "tiny-defense-board.yaml").write_text(yaml.safe_dump(TRACK))
    run = {**TRACK, "checkpoint_dir": str(base / "checkpoints"), "logger": "none", "threads": 1}
    (base / "run.yaml").write_text(yaml.safe_dump(run))
    argv = ["defenses", "--config", str(base / "run.yaml"), "--output_dir", str(base / "runs")]
    assert main([*argv, "--no_progress"]) == 0
    run_dir = base / "runs" / "tiny-defense-board"
    entries = base / "entries" / "defense-entries"
    argv = ["submit", str(run_dir), "--entries-dir", str(entries), "--submitter", "tests"]
    assert main([*argv, "--defense-tracks-dir", str(tracks)]) == 0
    return tracks, entries, run_dir, base / "checkpoints"


@pytest.fixture
def board(submitted, tmp_path, monkeypatch):
    """A private copy of the entries, a board key the board trusts, the tiny track's victims
    in the checkpoint cache: (tracks dir, entries dir, entry path by setting name)."""
    from leakbench.leaderboard import signing

    tracks, entries, _, checkpoints = submitted
    signing.generate_key(tmp_path / "board.pem", "tests", tmp_path / "trusted")
    monkeypatch.setattr(signing, "KEYS", tmp_path / "trusted")
    monkeypatch.setenv(signing.KEY_FILE_ENV, str(tmp_path / "board.pem"))
    monkeypatch.setenv("LEAKBENCH_CHECKPOINTS", str(checkpoints))
    copy = tmp_path / "entries" / "defense-entries"
    shutil.copytree(entries, copy)
    paths = {p.stem: p for p in (copy / "tiny-defense-board").glob("*.json")}
    return tracks, copy, paths


def _edit(path: Path, change) -> None:
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry, indent=2))


def test_a_defense_run_becomes_one_entry_per_setting_with_its_records(submitted):
    tracks, entries, run_dir, _ = submitted
    paths = sorted((entries / "tiny-defense-board").glob("*.json"))
    assert [p.stem for p in paths] == ["noise-s-0-1", "none"]
    noise = load_defense_entry(entries / "tiny-defense-board" / "noise-s-0-1.json", tracks)
    assert noise["setting"]["options"] == {"scale": 0.1} and noise["submitter"] == "tests"
    assert noise["attacks"]["noise-aware"]["adaptive"] is True
    assert noise["attacks"]["idlg"]["budget"] == "5 it (track; published 300 it)"
    assert noise["budget_note"].startswith("REDUCED budgets")
    records = sibling(entries / "tiny-defense-board" / "noise-s-0-1.json", RECORDS_SUFFIX)
    assert hashlib.sha256(records.read_bytes()).hexdigest() == noise["records"]["sha256"]
    assert noise["records"]["count"] == 6  # bias, idlg, noise-aware × 2 trials
    result = json.loads((run_dir / "settings" / "noise-s=0.1.json").read_text())
    assert noise["privacy"] == result["privacy"]
    none = load_defense_entry(entries / "tiny-defense-board" / "none.json", tracks)
    assert none["privacy"]["per_sample"]["psnr_max_median"] > 100  # bias is exact undefended


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda e: e["privacy"]["per_sample"].update(psnr_max_median=5.0),
            "privacy differs from its records in: privacy.per_sample.psnr_max_median",
        ),
        (
            lambda e: e["attacks"]["idlg"]["options"].update(iterations=1),
            "differs from the track in: the budget of idlg",
        ),
        (lambda e: e["protocol"].update(trials=1), "differs from the track in: trials"),
        (lambda e: e.update(track_sha256="0" * 64), "another version of defense track"),
    ],
)
def test_a_tampered_defense_entry_is_refused(board, tamper, reason):
    tracks, _, paths = board
    _edit(paths["noise-s-0-1"], tamper)
    with pytest.raises(EntryError, match=reason):
        load_defense_entry(paths["noise-s-0-1"], tracks)


def test_a_run_that_changed_the_protocol_is_refused_at_submit(submitted, tmp_path, capsys):
    tracks, _, run_dir, _ = submitted
    changed = dict(TRACK, trials=3)
    (tracks.parent / "other").mkdir(exist_ok=True)
    (tracks.parent / "other" / "tiny-defense-board.yaml").write_text(yaml.safe_dump(changed))
    code = main(
        [
            "submit",
            str(run_dir),
            "--entries-dir",
            str(tmp_path / "e"),
            "--defense-tracks-dir",
            str(tracks.parent / "other"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "changed the protocol of defense track 'tiny-defense-board'" in error
    assert "in: trials" in error


def test_a_defense_entry_round_trips_submit_verify_build(board, tmp_path):
    tracks, entries, paths = board
    block = verify_entry(paths["noise-s-0-1"], defense_tracks_dir=tracks, threads=1)
    # The board's attacks ran on the victim the entry attacked, in the sandbox, and signed.
    assert set(block["attacks"]) == {"bias", "idlg", "noise-aware"}
    assert block["attacks"]["noise-aware"]["adaptive"] is True
    entry = load_defense_entry(paths["noise-s-0-1"], tracks)
    assert block["victim_checkpoint"] == entry["victim"]["checkpoint"]
    assert block["trials"] == 2 and block["signature"]["algorithm"] == "ed25519"
    assert block["statistic"] == "psnr.median" and block["passed"], block["reason"]
    verification = [
        json.loads(line)
        for line in sibling(paths["noise-s-0-1"], ".verification.jsonl").read_text().splitlines()
    ]
    assert {r["isolation"] for r in verification} == {"sandbox"}
    assert len(verification) == 6  # one record per attack and trial
    worst = worst_case_records(verification)
    assert [len(r["metrics"]["samples"]) for r in worst] == [1, 1]
    # The site: a page for the defense track, the verified setting first, the scatter drawn.
    (tiny,) = [b for b in load_defense_board(entries, tracks) if b.name == "tiny-defense-board"]
    assert [(r.entry["name"], r.status) for r in tiny.rows] == [
        ("noise s=0.1", "verified"),
        ("none", "unverified"),
    ]
    out = tmp_path / "site"
    build_site(tmp_path / "entries" / "attack", out, defense_tracks_dir=tracks)
    page = (out / "defense" / "tiny-defense-board.html").read_text()
    assert page.count('<circle class="point') == 2
    assert "noise-aware" in page and "verified" in page
    assert 'href="defense/tiny-defense-board.html"' in (out / "index.html").read_text()


def test_forged_or_unsigned_defense_verifications_are_refused(board, tmp_path):
    from leakbench.leaderboard.signing import generate_key, load_private_key, sign

    tracks, _, paths = board
    path = paths["noise-s-0-1"]
    verify_entry(path, defense_tracks_dir=tracks, threads=1)
    signed = path.read_text()
    generate_key(tmp_path / "mine.pem", "mine", tmp_path / "my-keys")

    def unsigned(entry):
        del entry["verification"]["signature"]

    def own_key(entry):
        block = {k: v for k, v in entry["verification"].items() if k != "signature"}
        block["passed"] = True
        block["signature"] = sign(block, load_private_key(tmp_path / "mine.pem"))
        entry["verification"] = block

    def lower_claim(entry):  # claims less leakage after the board signed
        entry["privacy"]["per_sample"]["psnr_max_median"] -= 1
        entry["verification"]["entry_sha256"] = content_sha256(entry)

    def other_defense_code(entry):
        entry["verification"]["defense_code"]["files_sha256"] = "0" * 64

    for forge, reason in [
        (unsigned, "not signed"),
        (own_key, "does not trust"),
        (lower_claim, "privacy differs from its records"),
        (other_defense_code, "does not match the board's signature"),
        (lambda e: e.update(name="renamed"), "edited after verification"),
    ]:
        path.write_text(signed)
        _edit(path, forge)
        with pytest.raises(EntryError, match=reason):
            load_defense_entry(path, tracks)
    # The build refuses a forged entry in one line, as it does attack entries.
    path.write_text(signed)
    _edit(path, unsigned)
    with pytest.raises(EntryError, match="not signed"):
        build_site(tmp_path / "entries" / "attack", tmp_path / "s", defense_tracks_dir=tracks)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (Debian package)")
    instance = Browser(executable)
    yield instance
    instance.close()


def test_the_defense_page_renders_its_scatter_in_chromium(board, browser, tmp_path):
    tracks, _, _ = board
    out = tmp_path / "site"
    build_site(tmp_path / "entries" / "attack", out, defense_tracks_dir=tracks)
    browser.open((out / "defense" / "tiny-defense-board.html").as_uri())
    assert browser.console_errors() == []
    circles = browser.evaluate(
        "Array.from(document.querySelectorAll('#privacy-utility circle.point'),"
        " c => [c.dataset.name, c.getBBox().width > 0, c.getAttribute('cx')])"
    )
    assert sorted(c[0] for c in circles) == ["noise s=0.1", "none"]
    assert all(drawn for _, drawn, _ in circles)
    size = browser.evaluate(
        "(() => { const r = document.querySelector('#privacy-utility')"
        ".getBoundingClientRect(); return [r.width, r.height]; })()"
    )
    assert size[0] > 300 and size[1] > 200
    rows = browser.evaluate(
        "Array.from(document.querySelectorAll('table.defense tbody tr'), r => r.dataset.name)"
    )
    assert sorted(rows) == ["noise s=0.1", "none"]
    browser.open((out / "index.html").as_uri())
    assert browser.console_errors() == []
    link = browser.evaluate("document.querySelector('#defense-tracks a').href")
    assert link == (out / "defense" / "tiny-defense-board.html").as_uri()


def test_the_template_defense_clips_and_adds_noise_relative_to_each_tensor():
    import sys

    import torch

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1] / "leaderboards" / "template-defense" / "src")
    )
    try:
        from leakbench_template_defense import TemplateRelativeNoise
    finally:
        sys.path.pop(0)
    update = {"w": torch.full((100, 100), 0.5), "b": torch.full((10_000,), 1e-3)}
    defense = TemplateRelativeNoise(relative_scale=0.1, clip_norm=1.0)
    shared = defense.defend_update(None, None, None, update, torch.Generator().manual_seed(0))
    clipped = update["w"] / update["w"].norm()  # norm 50 clipped to 1; b (norm 0.1) is not
    for name, expected in (("w", clipped), ("b", update["b"])):
        noise = shared[name] - expected
        relative = float(noise.norm() / expected.norm())
        assert relative == pytest.approx(0.1, rel=0.05), name  # σ times the tensor's RMS
    again = defense.defend_update(None, None, None, update, torch.Generator().manual_seed(0))
    assert all(torch.equal(shared[k], again[k]) for k in shared)  # seeded by the client
    with pytest.raises(ValueError, match="clip_norm must be finite and > 0"):
        TemplateRelativeNoise(clip_norm=0.0)


def test_shipped_defense_tracks_declare_verification_and_their_entries_load(tmp_path):
    from leakbench.analysis.defense_track import DefenseTrack
    from leakbench.leaderboard.defense_entry import DEFENSE_ENTRIES, DEFENSE_TRACKS

    tracks = sorted(DEFENSE_TRACKS.glob("*.yaml"))
    assert len(tracks) == 6
    for path in tracks:
        track = DefenseTrack.load(path)
        meta = track.base["track"]
        assert meta["free"] == ["defenses"] and meta["ranking"] == "psnr.median", path.name
        assert {"trials", "private_transform", "tolerance"} <= set(meta["verification"])
        assert "REDUCED" in meta["description"], path.name  # the shipped budgets say so
    boards = load_defense_board(DEFENSE_ENTRIES)  # every shipped entry intact, signatures too
    shipped = [row for board in boards for row in board.rows]
    assert shipped, "no shipped defense entries"
    for row in shipped:
        assert row.entry["budget_note"].startswith("REDUCED budgets"), row.path
    out = tmp_path / "site"
    build_site(tmp_path / "no-attack-entries", out, defense_entries_dir=DEFENSE_ENTRIES)
    for board in boards:
        page = (out / "defense" / f"{board.name}.html").read_text()
        assert page.count('<circle class="point') == sum(
            r.privacy is not None and r.accuracy is not None for r in board.rows
        )


def _worst_case(psnr_by_trial: dict[int, list[float]]) -> list[dict]:
    """Records of one attack whose samples ``s<trial>-<k>`` score the given PSNRs."""
    return [
        {
            "trial": trial,
            "attack": "bias",
            "status": "ok",
            "metrics": {
                "samples": [
                    {"sample_id": f"s{trial}-{k}", "psnr": p, "ssim": 0.0, "success": p >= 30}
                    for k, p in enumerate(values)
                ]
            },
        }
        for trial, values in psnr_by_trial.items()
    ]


def _nulls(level: float, offsets: dict[int, list[float]]) -> dict[str, dict[str, float]]:
    return {
        str(t): {f"s{t}-{k}": level + o for k, o in enumerate(values)}
        for t, values in offsets.items()
    }


def test_near_chance_defenses_are_judged_over_the_null_reconstruction():
    """The transform lifts every uninformative reconstruction's PSNR (here by 3.4 dB, as it
    lifted the shipped digits board's): raw, an honest near-chance claim fails; over the null
    reconstruction it passes, and a claim 4 dB below what the records held still fails."""
    from leakbench.leaderboard.defense_entry import defense_figures
    from leakbench.leaderboard.verify import figures

    tolerance = {"confidence": 0.95, "resamples": 500, "margin": 3.0, "ceiling": 60.0}
    spread = {0: [-1.0, -0.2, 0.4, 1.1], 1: [-0.6, 0.0, 0.3, 0.9]}
    gains = {t: [0.5 + 0.1 * k for k in range(4)] for t in spread}  # a little above chance
    nulls = {"claimed": _nulls(7.5, spread), "verified": _nulls(10.9, spread)}

    def attacked(level: float, lowered: float = 0.0) -> list[dict]:
        return _worst_case(
            {
                t: [level + o + g - lowered for o, g in zip(spread[t], gains[t], strict=True)]
                for t in spread
            }
        )

    public, verification = attacked(7.5), attacked(10.9)
    claimed = float(np.median([s["psnr"] for r in public for s in r["metrics"]["samples"]]))
    raw = figures(
        worst_case_records(verification), claimed, 0.0, "psnr.median", tolerance, "defense", 1
    )
    assert not raw["passed"]  # what the board said before: 3.4 dB "more leakage"
    honest = defense_figures(verification, public, nulls, claimed, 0.0, "psnr.median", tolerance, 1)
    assert honest["passed"], honest["reason"]
    assert honest["verified"] == pytest.approx(raw["verified"], abs=1e-12)  # shown as measured
    assert honest["over_null"]["claimed"] == pytest.approx(honest["over_null"]["verified"])

    forged = attacked(7.5, lowered=4.0)
    verdict = defense_figures(
        verification, forged, nulls, claimed - 4.0, 0.0, "psnr.median", tolerance, 1
    )
    assert not verdict["passed"] and "\n" not in verdict["reason"]
    assert verdict["reason"].startswith(
        "claimed psnr.median over the null reconstruction -3.35 is below the lower end 0.65 - "
        "margin 3 of the 95% bootstrap interval"
    ), verdict["reason"]
    assert "as measured (dB): claimed 4.30, verified 11.70" in verdict["reason"]


def test_records_of_other_samples_than_the_draw_are_refused():
    from leakbench.leaderboard.defense_entry import over_null

    with pytest.raises(EntryError, match="sample s1-0 of trial 1 is not one the track's draw"):
        over_null(worst_case_records(_worst_case({1: [9.0]})), {"1": {"s9-9": 7.0}}, 60.0)


def _forge_lower(path: Path, by: float) -> None:
    """Lower every PSNR of the entry's records by ``by`` dB and make the entry agree with them
    (records hashes, privacy): a submission whose claim is lower than what its run measured."""
    from leakbench.analysis.defense_track import setting_privacy
    from leakbench.leaderboard.entry import outcome_sha256, records_text

    records = [json.loads(line) for line in sibling(path, RECORDS_SUFFIX).read_text().splitlines()]
    for record in records:
        for sample in record["metrics"]["samples"]:
            sample["psnr"] -= by
    text = records_text(records)
    sibling(path, RECORDS_SUFFIX).write_text(text)
    entry = json.loads(path.read_text())
    adaptive = [name for name, a in entry["attacks"].items() if a["adaptive"]]
    entry["records"].update(
        sha256=hashlib.sha256(text.encode()).hexdigest(), outcome_sha256=outcome_sha256(records)
    )
    entry["privacy"] = json.loads(
        json.dumps(setting_privacy(records, entry["protocol"]["success_psnr"], adaptive))
    )
    path.write_text(json.dumps(entry, indent=2))


def test_a_forged_lower_defense_claim_fails_verification_in_one_line(board, capsys):
    tracks, _, paths = board
    _forge_lower(paths["noise-s-0-1"], by=20.0)
    load_defense_entry(paths["noise-s-0-1"], tracks)  # intact as a submission
    code = main(
        [
            "leaderboard",
            "verify",
            str(paths["noise-s-0-1"]),
            "--defense-tracks-dir",
            str(tracks),
            "--threads",
            "1",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[-1].startswith("FAILED: claimed psnr.median over the null reconstruction -")
    assert "is below the lower end" in lines[-1] and "as measured (dB)" in lines[-1]
    assert not load_defense_entry(paths["noise-s-0-1"], tracks)["verification"]["passed"]


def test_the_chance_level_is_the_null_reconstruction_of_what_the_client_held(board):
    """The verification's null PSNRs follow from its revealed seeds: each sample of the track's
    split, changed by the private transform, against uniform grey, computed here by hand."""
    import torch

    from leakbench.protocol.private_transform import PrivateTransform
    from leakbench.registry import DATAMODULES

    tracks, _, paths = board
    block = verify_entry(paths["noise-s-0-1"], defense_tracks_dir=tracks, threads=1)
    samples = DATAMODULES.get("synthetic-uniform")(**TRACK["dataset_options"]).samples("test")
    position = {sid: i for i, sid in enumerate(samples.sample_ids)}
    transform = PrivateTransform.from_options(
        {
            "seed": block["seeds"]["private_transform"],
            **TRACK["track"]["verification"]["private_transform"],
        }
    )
    verified = block["null_psnr"]["verified"]
    assert sorted(verified) == ["0", "1"]
    for trial, nulls in verified.items():
        (sample_id,) = nulls  # B = 1
        pixels = samples.pixels[position[sample_id]][None].to(torch.float64)
        held = transform.pixels(pixels.to(torch.float32).to(torch.float64), int(trial))
        expected = 10 * np.log10(1 / float(((held - 0.5) ** 2).mean()))
        assert nulls[sample_id] == pytest.approx(expected, abs=1e-4)
    claimed = block["null_psnr"]["claimed"]
    records = sibling(paths["noise-s-0-1"], RECORDS_SUFFIX).read_text().splitlines()
    assert {(str(r["trial"]), *r["sample_ids"]) for r in map(json.loads, records)} == {
        (t, *ids) for t, ids in claimed.items()
    }


def test_a_verification_made_before_the_rule_is_restated_from_its_records(board):
    """An old block (no null PSNRs) is refused with what to do; ``--restate`` recomputes it
    from the shipped verification records (the seeds give the ground truth again), re-running
    nothing, and signs it."""
    from leakbench.leaderboard.signing import load_private_key, sign
    from leakbench.leaderboard.verify import restate_entry

    tracks, _, paths = board
    path = paths["noise-s-0-1"]
    fresh = verify_entry(path, defense_tracks_dir=tracks, threads=1)
    entry = json.loads(path.read_text())
    old = {
        k: v
        for k, v in entry["verification"].items()
        if k not in ("null_psnr", "over_null", "signature")
    }
    old["signature"] = sign(old, load_private_key(os.environ["LEAKBENCH_BOARD_KEY_FILE"]))
    entry["verification"] = old
    path.write_text(json.dumps(entry, indent=2))
    with pytest.raises(EntryError, match="predates the verdict over the null reconstruction"):
        load_defense_entry(path, tracks)
    restated = restate_entry(path, defense_tracks_dir=tracks, echo=lambda _: None)
    assert restated["restated"]["why"].startswith("verdict over the null reconstruction")
    for key in ("null_psnr", "over_null", "passed", "reason", "verified", "records_sha256"):
        assert restated[key] == fresh[key], key
    assert load_defense_entry(path, tracks)["verification"] == restated
    path.write_text(json.dumps({**entry, "kind": "attack"}))
    with pytest.raises(EntryError, match="only defense entries are restated"):
        restate_entry(path, defense_tracks_dir=tracks)
