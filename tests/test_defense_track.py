"""Defense tracks: the worst case over attacks, the track file, and a small track end to end."""

import pytest

from leakbench.analysis.defense_track import (
    DefenseSetting,
    DefenseTrack,
    UtilityRecipe,
    with_training_accounting,
    worst_case,
)
from leakbench.config import ConfigError


def cell(attack, psnr_median, success_rate):
    return {"attack": attack, "psnr": {"median": psnr_median}, "success_rate": success_rate}


def test_worst_case_names_the_strongest_attack_for_each_measure():
    cells = {
        "dlg__noise__b4": cell("dlg", 18.0, 0.25),
        "exan__noise__b4": cell("exan", 12.0, 0.5),
        "bias__noise__b4": cell("bias", 9.0, 0.0),
    }
    worst = worst_case(cells)
    assert (worst.psnr_median, worst.psnr_attack) == (18.0, "dlg")
    assert (worst.success_rate, worst.success_attack) == (0.5, "exan")
    assert worst.attacks == ("bias", "dlg", "exan")


def test_worst_case_skips_unscored_cells_and_breaks_ties_by_name():
    cells = {
        "b": cell("zeta", 20.0, 0.5),
        "a": cell("alpha", 20.0, None),
        "c": cell("mid", None, 0.5),
    }
    worst = worst_case(cells)
    assert (worst.psnr_median, worst.psnr_attack) == (20.0, "alpha")
    assert (worst.success_rate, worst.success_attack) == (0.5, "mid")
    assert worst_case({"x": cell("x", None, None)}).psnr_attack is None


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
    ],
)
def test_bad_track_files_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as excinfo:
        DefenseTrack.load(write(tmp_path, text))
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value).strip()


def test_a_dp_setting_given_by_epsilon_is_accounted_over_the_utility_training():
    setting = DefenseSetting("dp eps=8", "dp-sgd", {"max_grad_norm": 1.0, "epsilon": 8.0})
    filled = with_training_accounting(setting, UtilityRecipe(epochs=3, batch_size=32), 1437)
    assert filled.options["sample_rate"] == 32 / 1437
    assert filled.options["steps"] == 3 * 45  # ⌈1437 / 32⌉ = 45 steps per epoch
    stated = DefenseSetting("dp", "dp-sgd", {"epsilon": 8.0, "steps": 7})
    assert with_training_accounting(stated, UtilityRecipe(), 1437).options["steps"] == 7
    noise = DefenseSetting("noise", "noise", {"scale": 0.1})
    assert with_training_accounting(noise, UtilityRecipe(), 1437) is noise


def test_a_small_track_runs_every_setting_and_tabulates_privacy_against_utility(
    tmp_path, monkeypatch
):
    import json

    import wandb

    from leakbench.analysis.defense_track import run_defense_track
    from leakbench.models.training import trained_once

    track_file = tmp_path / "track.yaml"
    track_file.write_text(
        """
track:
  name: tiny-defenses
  kind: defense
  attacks: [bias, idlg, fishing]
  utility: {epochs: 1, seeds: [0, 1], batch_size: 64, lr: 0.01, optimizer: adam}
  defenses:
    - {label: none, defense: none}
    - {label: "noise s=0.1", defense: noise, options: {scale: 0.1}}
dataset: digits
model: fcn
model_options: {widths: [16]}
batch_sizes: [1]
trials: 2
grants: [batch_size]
attack_options: {idlg: {iterations: 5}}
isolation: in-process
privacy_metrics: false
logger: wandb
"""
    )
    track = DefenseTrack.load(track_file)
    checkpoints = tmp_path / "checkpoints"
    track = DefenseTrack(
        {**track.base, "checkpoint_dir": str(checkpoints)},
        track.settings,
        track.utility,
        track.attacks,
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # W&B keeps the mode of the process's first run (conftest: disabled)
    rows = run_defense_track(track, output_dir=tmp_path / "out", progress=False, echo=print)
    wandb.teardown()  # waits until the offline run's files are written
    folder = tmp_path / "out" / "tiny-defenses"
    table = json.loads((folder / "privacy_utility.json").read_text())
    # fishing needs client code, which the track does not grant: listed, with the reason.
    assert set(table["not_applicable"]) == {"fishing"}
    assert "client_code" in table["not_applicable"]["fishing"]
    none, noise = table["rows"]
    assert none["attacks"] == noise["attacks"] == ["bias", "idlg"]
    # Undefended, the bias attack is exact on one sample; noise takes that away.
    assert none["worst_psnr_attack"] == "bias" and none["worst_psnr_median"] > 100
    assert none["worst_success_rate"] == 1.0
    assert noise["worst_psnr_median"] < 40
    # Utility: the accuracies of the victims trained with each setting, per seed.
    recipe = dict(
        checkpoint_dir=checkpoints,
        model_options={"widths": [16]},
        dataset_options={},
        epochs=1,
        batch_size=64,
        lr=0.01,
        optimizer="adam",
    )
    for seed, accuracy in zip([0, 1], none["accuracy_per_seed"], strict=True):
        assert accuracy == trained_once("fcn", "digits", seed=seed, **recipe).test_accuracy
    noisy = trained_once(
        "fcn", "digits", seed=1, defense="noise", defense_options={"scale": 0.1}, **recipe
    )
    assert noise["accuracy_per_seed"][1] == noisy.test_accuracy
    assert noise["accuracy_change"] == pytest.approx(noise["accuracy"] - none["accuracy"])
    assert [r.label for r in rows] == ["none", "noise s=0.1"]
    for name in ("privacy_utility.md", "privacy_utility.csv", "privacy_utility.png"):
        assert (folder / name).stat().st_size > 0
    assert (folder / "none" / "summary.json").is_file()
    # The table and the scatter went to the track's own (offline) W&B run.
    (offline,) = (folder / "wandb").glob("offline-run-*")
    media = offline / "files" / "media"
    (logged,) = (media / "table").glob("privacy_utility_*.table.json")
    assert [r[0] for r in json.loads(logged.read_text())["data"]] == ["none", "noise s=0.1"]
    assert list((media / "images").glob("privacy_utility_scatter_*.png"))
