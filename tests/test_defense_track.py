"""Defense tracks: the track file, the privacy statistics (failures apart, the per-sample worst
case with intervals), budgets, and small tracks end to end through ``leakbench defenses``."""

import hashlib
import json

import pytest

from leakbench.analysis.defense_track import (
    DefenseTrack,
    bootstrap_median,
    budget_text,
    setting_privacy,
    wilson_interval,
)
from leakbench.config import ConfigError


def write(tmp_path, text):
    path = tmp_path / "track.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("track: {name: t, kind: attack}\n", "track.kind is 'attack', expected 'defense'"),
        (
            "track: {name: t, kind: defense, defenses: [{defense: none}]}\ndefense: noise\n",
            "'defense' is set per setting in track.defenses",
        ),
        (
            "track: {name: t, kind: defense, defenses: [{name: noise}]}\n",
            "track.defenses[0] = {'name': 'noise'}; expected keys defense, options, label",
        ),
        ("track: {name: t, kind: defense, defenses: []}\n", "lists no defense setting"),
        (
            "track: {name: t, kind: defense, defenses: [{defense: none}, {defense: none}]}\n",
            "two defense settings share a label",
        ),
        (
            "track: {name: t, kind: defense, defenses: [{defense: none}], utility: {epoch: 1}}\n",
            "track.utility",
        ),
        ("track: [unclosed\n", "line 2 column 1: invalid YAML"),
        (
            "track: {name: t, kind: defense, defenses: [{defense: none}]}\nbatch_sizes: [1, 8]\n",
            "a defense track has one batch size",
        ),
        (
            "track: {name: t, kind: defense, defenses: [{defense: none}], "
            "utility: {batch_size: 32}}\n",
            "victims train at the track's batch size",
        ),
        (
            "track: {name: t, kind: defense, defenses: [{defense: none, protocol: fedavg}]}\n",
            "expected keys defense, options, label, client_protocol",
        ),
    ],
)
def test_bad_track_files_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as excinfo:
        DefenseTrack.load(write(tmp_path, text))
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value).strip()


def record(attack, trial, psnrs, status="ok", iip=None, task=None, error=None):
    samples = []
    for i, psnr in enumerate(psnrs):
        sample = {"sample_id": f"s{trial}-{i}", "psnr": psnr}
        if iip is not None:
            sample["iip_pixel"] = iip[i]
        if task is not None:
            sample["task_leakage"] = task[i]
        samples.append(sample)
    return {
        "attack": attack,
        "trial": trial,
        "status": status,
        "error": error,
        "budget": {"used": {"iterations": 10}},
        "metrics": {"samples": samples, "iip_gallery_size": 100},
    }


def test_failed_trials_are_counted_apart_and_never_scored_as_privacy():
    records = [
        # A failed attack's grey image scores ~7 dB in the records: it must not count.
        record("dlg", 0, [7.0, 7.0], status="failed", error="diverged"),
        record("dlg", 1, [12.0, 14.0]),
        record("bias", 0, [40.0, 9.0], iip=[True, False], task=[True, True]),
        record("bias", 1, [8.0, 13.0], iip=[False, False], task=[False, True]),
        record("noise-aware", 0, [10.0, 31.0], iip=[False, True], task=[False, False]),
        record("noise-aware", 1, [9.0, 11.0], status="timeout", error="timeout"),
    ]
    privacy = setting_privacy(records, 30.0, adaptive=["noise-aware"])
    dlg = privacy["attacks"]["dlg"]
    assert (dlg["trials"], dlg["failed"], dlg["failure_reasons"]) == (2, 1, ["diverged"])
    assert dlg["psnr_median"] == 13.0  # over the completed trial only
    assert privacy["attacks"]["noise-aware"]["adaptive"] is True
    assert privacy["failed_trials"] == 2 and privacy["total_trials"] == 6
    # Per sample, the best completed attack: trial 0 → 40 (bias), 31 (noise-aware);
    # trial 1 → 12 (dlg; bias 8), 14 (dlg; bias 13).
    per_sample = privacy["per_sample"]
    assert per_sample["samples"] == 4 and per_sample["psnr_max_median"] == (14 + 31) / 2
    assert per_sample["success_rate"] == 0.5
    assert per_sample["iip_rate"] == 0.5  # s0-0 by bias, s0-1 by noise-aware
    assert per_sample["task_leakage_rate"] == 0.75
    assert per_sample["best_attack_counts"] == {"bias": 1, "dlg": 2, "noise-aware": 1}
    assert per_sample["iip_chance"] == 0.01
    assert (privacy["worst_attack"], privacy["worst_attack_psnr_median"]) == ("noise-aware", 20.5)
    assert privacy["worst_attack_adaptive"] is True
    # A trial no attack completed is not a private sample either: it is counted.
    only_failures = setting_privacy([record("dlg", 0, [7.0], status="failed")], 30.0, [])
    assert only_failures["per_sample"]["samples"] == 0
    assert only_failures["per_sample"]["trials_without_completed_attack"] == 1
    assert only_failures["worst_attack"] is None


def test_intervals():
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    median, interval = bootstrap_median([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert median == 3.5 and 1.5 <= interval[0] <= interval[1] <= 5.5
    assert bootstrap_median([[1.0, 5.0]]) == (3.0, None)  # one trial: no interval


def test_budgets_say_whether_they_are_the_published_ones():
    assert budget_text("inverting-gradients", {"iterations": 24000, "restarts": 1}) == (
        "24000 it × 1 restart (published)"
    )
    assert budget_text("dlg", {"iterations": 50}) == "50 it (track; published 300 it)"
    assert budget_text("bias", {}) == "closed form"


TRACK = """
track:
  name: tiny-defenses
  kind: defense
  attacks: [bias, idlg, fishing]
  utility: {epochs: 1, seeds: [0, 1], lr: 0.01, optimizer: adam}
  defenses:
    - {label: none, defense: none}
    - {label: "noise s=0.1", defense: noise, options: {scale: 0.1}}
    - {label: "dp eps=8", defense: dp-sgd, options: {max_grad_norm: 1.0, epsilon: 8.0}}
    - {label: "secagg K=2", defense: none, client_protocol: {name: aggregate, clients: 2}}
dataset: synthetic-uniform
dataset_options: {input_shape: [1, 6, 6], size: 48, num_classes: 4}
model: fcn
model_options: {widths: [16]}
batch_sizes: [1]
trials: 2
grants: [batch_size, local_hyperparameters]
attack_options: {idlg: {iterations: 5}, noise-aware: {iterations: 5}}
isolation: in-process
privacy_metrics: false
logger: LOGGER
checkpoint_dir: CHECKPOINTS
"""


def test_a_small_track_measures_each_setting_on_its_own_victim_at_one_batch_size(
    tmp_path, monkeypatch
):
    import wandb

    from leakbench.cli import main
    from leakbench.models.training import trained_once

    checkpoints = tmp_path / "checkpoints"
    track_file = tmp_path / "track.yaml"
    track_file.write_text(TRACK.replace("LOGGER", "wandb").replace("CHECKPOINTS", str(checkpoints)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # W&B keeps the mode of the process's first run (conftest: disabled)
    out = tmp_path / "out"
    assert (
        main(["defenses", "--config", str(track_file), "--output_dir", str(out), "--no_progress"])
        == 0
    )
    wandb.teardown()  # waits until the offline run's files are written
    folder = out / "tiny-defenses"
    table = json.loads((folder / "privacy_utility.json").read_text())
    none, noise, dp, secagg = table["rows"]
    # fishing needs client code, which the track does not grant: listed with the reason.
    assert "client_code" in none["attacks_not_applicable"]["fishing"]
    # Generic attacks on every setting; the adaptive one only where its defense names it.
    assert set(none["attack_options"]) == {"bias", "idlg"}
    assert set(noise["attack_options"]) == {"bias", "idlg", "noise-aware"}
    assert noise["privacy"]["attacks"]["noise-aware"]["adaptive"] is True
    assert noise["attack_options"]["noise-aware"]["noise_std"] == 0.1
    assert noise["attack_options"]["noise-aware"]["iterations"] == 5  # the track's budget
    assert none["attack_options"]["idlg"] == {"iterations": 5}
    # Undefended, the bias attack is exact on one sample; the noise takes that away.
    assert none["worst_psnr_attack"] == "bias" and none["worst_psnr_median"] > 100
    assert none["success_rate"] == 1.0 and noise["worst_psnr_median"] < 40
    # Each setting is attacked on the victim trained with it, at the track's batch size.
    recipe = dict(
        checkpoint_dir=checkpoints,
        model_options={"widths": [16]},
        dataset_options={"input_shape": [1, 6, 6], "size": 48, "num_classes": 4},
        epochs=1,
        lr=0.01,
        optimizer="adam",
    )
    noisy = [
        trained_once(
            "fcn",
            "synthetic-uniform",
            seed=s,
            batch_size=1,
            defense="noise",
            defense_options={"scale": 0.1},
            **recipe,
        )
        for s in (0, 1)
    ]
    assert noise["accuracy_per_seed"] == [v.test_accuracy for v in noisy]
    config = (folder / "noise-s=0.1" / "config.yaml").read_text()
    assert noisy[0].checkpoint.sha256 in config
    # DP-SGD: σ calibrated over the training, and the attacked round's own ε.
    assert 7.99 <= dp["training_epsilon"] <= 8.0
    assert dp["accounting"]["steps"] == 48 and dp["accounting"]["sample_rate"] == 1 / 48
    from leakbench.defenses.dp_sgd import epsilon_spent

    sigma = dp["accounting"]["noise_multiplier"]
    assert dp["round_epsilon"] == epsilon_spent(sigma, 1.0, 1, 1e-5)
    # Secure aggregation of 2 clients: trials of 2 samples, victims trained at 2; iDLG
    # (one sample at most) cannot run there.
    assert secagg["client_protocol"]["name"] == "aggregate"
    assert "at most 1" in secagg["attacks_not_applicable"]["idlg"]
    assert secagg["privacy"]["per_sample"]["samples"] == 4
    # The machine-readable result of each setting, with the hash of its canonical records.
    result = json.loads((folder / "settings" / "noise-s=0.1.json").read_text())
    text = (folder / "settings" / result["records"]["file"]).read_text()
    assert result["records"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert result["records"]["count"] == len(text.splitlines()) == 6  # 3 attacks × 2 trials
    assert result["attacks"]["noise-aware"]["budget"].endswith(
        "(track; published 24000 it × 1 restart)"
    )
    assert result["setting"]["defense"] == "noise"
    for name in ("privacy_utility.md", "privacy_utility.csv", "privacy_utility.png"):
        assert (folder / name).stat().st_size > 0
    markdown = (folder / "privacy_utility.md").read_text()
    assert "noise-aware | yes | 5 it × 1 restart" in markdown
    assert "at or above 30 dB" in markdown  # the undefended worst case is strong here
    # The table and the scatter went to the track's own (offline) W&B run.
    (offline,) = (folder / "wandb").glob("offline-run-*")
    media = offline / "files" / "media"
    (logged,) = (media / "table").glob("privacy_utility_*.table.json")
    assert [r[0] for r in json.loads(logged.read_text())["data"]] == [
        "none",
        "noise s=0.1",
        "dp eps=8",
        "secagg K=2",
    ]
    assert list((media / "images").glob("privacy_utility_scatter_*.png"))


def test_a_defense_that_cannot_run_under_the_track_protocol_is_a_row_that_says_so(tmp_path):
    from leakbench.analysis.defense_track import run_defense_track

    settings = [line for line in TRACK.splitlines() if "noise s=0.1" in line or "secagg" in line]
    text = TRACK.replace("LOGGER", "none").replace("CHECKPOINTS", str(tmp_path / "checkpoints"))
    for line in settings:
        text = text.replace(line + "\n", "")
    text = text.replace("attacks: [bias, idlg, fishing]", "attacks: [bias]")
    text += "client_protocol: {name: fedavg, lr: 0.1, local_steps: 2}\n"
    track_file = tmp_path / "track.yaml"
    track_file.write_text(text)
    lines = []
    rows = run_defense_track(
        DefenseTrack.load(track_file),
        output_dir=tmp_path / "out",
        progress=False,
        echo=lines.append,
    )
    none, dp = (r.row() for r in rows)
    assert none["worst_psnr_attack"] == "bias"
    assert (
        dp["privacy"] == {}
        and "cannot run under the client protocol 'fedavg'" in dp["not_applicable"]
    )
    table = (tmp_path / "out" / "tiny-defenses" / "privacy_utility.md").read_text()
    assert (
        "| dp eps=8 | not applicable: dp-sgd cannot run under the client protocol 'fedavg'" in table
    )


def test_shipped_tracks_load_and_a_setting_may_bring_its_own_victim():
    from pathlib import Path

    from leakbench.analysis.defense_track import _model_options
    from leakbench.config import RunConfig

    folder = Path(__file__).resolve().parents[1] / "leaderboards" / "defense-tracks"
    tracks = {t.name: t for t in map(DefenseTrack.load, sorted(folder.glob("*.yaml")))}
    assert {(t.batch_size, t.base["client_protocol"] != "fedsgd") for t in tracks.values()} == {
        (b, fedavg) for b in (1, 8, 32) for fedavg in (False, True)
    }
    track = tracks["digits-fcn-b8-fedsgd"]
    precode = next(s for s in track.settings if s.defense == "precode")
    assert precode.model == "precode"
    config = RunConfig.from_mapping({"model": "fcn", "model_options": {"widths": [256]}})
    assert _model_options(config, precode) == {"base": "fcn", "base_options": {"widths": [256]}}
    none = track.settings[0]
    assert none.model is None and _model_options(config, none) == {"widths": [256]}
    secagg = next(s for s in track.settings if s.client_protocol)
    assert secagg.client_protocol == {"name": "aggregate", "clients": 4}
