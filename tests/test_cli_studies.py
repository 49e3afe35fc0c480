"""The studies and the other commands on the shared configuration: one syntax, typed options."""

import json

import pytest
import torch
import yaml

from leakbench.analysis.boundary import Study
from leakbench.analysis.exclusivity import analyse_exclusivity
from leakbench.cli import main
from leakbench.commands import COMMANDS, build
from leakbench.models.training import train_victim


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_boundary_shares_the_run_keys_and_adds_its_own(capsys):
    code, out, _ = run_cli(capsys, ["boundary", "--print-config", "--train-epochs", "[0,5]"])
    printed = yaml.safe_load(out)
    assert code == 0
    # The study's own defaults for the shared keys, and none of the run keys it does not use.
    assert printed["model"] == "fcn-exan" and printed["model_options"] == {}
    assert printed["batch_sizes"] == [2, 4, 8, 16, 32] and printed["trials"] == 200
    assert printed["train_epochs"] == [0, 5] and "attacks" not in printed
    options = {a.dest for a in build(COMMANDS["boundary"]).parser._actions}
    assert {"dataset", "model_options", "compare_attacks", "utility_epochs"} <= options
    assert not {"attacks", "grants", "logger"} & options


def test_boundary_config_file_holds_shared_and_study_keys(capsys, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("model: fcn\ntrials: 3\ncompare_attacks: [exan, dlg]\nbogus: 1\n")
    code, _, err = run_cli(capsys, ["boundary", "--config", config])
    assert code == 2 and f"unknown key(s) 'bogus' in {config}; valid keys:" in err
    config.write_text("model: fcn\ntrials: 3\ncompare_attacks: [exan, dlg]\n")
    code, out, _ = run_cli(capsys, ["boundary", "--config", config, "--trials", "7",
                                    "--print-config"])  # fmt: skip
    printed = yaml.safe_load(out)
    assert code == 0 and printed["trials"] == 7 and printed["compare_attacks"] == ["exan", "dlg"]


def test_boundary_runs_through_the_command_line(capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        [
            "boundary",
            "--dataset",
            "synthetic-uniform",
            "--dataset-options",
            '{"input_shape": [1, 8, 8], "num_classes": 4, "size": 64}',
            "--model",
            "fcn",
            "--model-options",
            '{"widths": [64]}',
            "--dtype",
            "float64",
            "--batch-sizes",
            "[1,16]",
            "--trials",
            "4",
            "--attack-trials",
            "1",
            "--isolation",
            "in-process",
            "--output-dir",
            tmp_path,
            "--run-name",
            "study",
            "--no-progress",
        ],  # fmt: skip
    )
    assert code == 0, err
    result = json.loads((tmp_path / "study" / "boundary.json").read_text())
    rows = result["boundary"]
    assert [r["batch_size"] for r in rows] == [1, 16]
    assert rows[0]["p_condition"] == 1.0 and rows[1]["p_condition"] == 0.0
    assert result["config"]["batch_sizes"] == [1, 16] and result["config"]["train_epochs"] == [0]
    assert "P(exclusivity condition) over 4 trials per batch size" in out


def test_boundary_studies_a_trained_checkpoint_and_trains_on_from_it(capsys, tmp_path):
    dataset_options = {"input_shape": [1, 8, 8], "num_classes": 4, "size": 64}
    checkpoints = tmp_path / "checkpoints"
    trained = train_victim(
        "fcn",
        "synthetic-uniform",
        model_options={"widths": [64]},
        dataset_options=dataset_options,
        epochs=1,
        batch_size=8,
        seed=3,
        checkpoint_dir=checkpoints,
        accelerator="cpu",
    )
    sha = trained.checkpoint.sha256
    code, out, err = run_cli(
        capsys,
        [
            "boundary",
            "--dataset",
            "synthetic-uniform",
            "--dataset-options",
            json.dumps(dataset_options),
            "--model",
            "fcn",
            "--model-options",
            '{"widths": [64]}',
            "--model-state",
            sha[:12],
            "--checkpoint-dir",
            checkpoints,
            "--train-epochs",
            "[0,1]",
            "--batch-sizes",
            "[16]",
            "--trials",
            "4",
            "--psnr-attack",
            "none",
            "--output-dir",
            tmp_path,
            "--run-name",
            "study",
            "--no-progress",
        ],  # fmt: skip
    )
    assert code == 0, err
    result = json.loads((tmp_path / "study" / "boundary.json").read_text())
    assert result["config"]["model_state"] == sha[:12]
    base, further = result["states"]
    assert base == {
        "state": sha[:16],
        "train_epochs": 0,
        "model_state": sha,
        "test_accuracy": trained.test_accuracy,
    }
    # The trained state continues from the checkpoint, with its card's seed.
    card = json.loads((checkpoints / f"{further['model_state']}.json").read_text())
    assert card["initial_checkpoint"] == sha and card["seed"] == 3 and card["epochs"] == 1
    assert further["state"] == f"trained-1ep {further['model_state'][:16]}"
    assert sha[:16] in out and further["model_state"][:16] in out
    # The condition rows measure the checkpoint's weights on the study's batches.
    batches = Study(
        dataset="synthetic-uniform",
        dataset_options=dataset_options,
        model="fcn",
        model_options={"widths": [64]},
    ).trials(16, 4)
    counts = torch.stack([analyse_exclusivity(trained.model, b["images"]).counts for b in batches])
    row = result["boundary"][0]
    assert row["state"] == sha[:16]
    assert row["mean_exans_per_sample"] == [round(float(v), 3) for v in counts.float().mean((0, 1))]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--solvers", "[glpk]"], "solvers: expected one of 'highs', 'cbc', got glpk"),
        (["--batch-sizes", "[0]"], "batch_sizes: expected a positive integer, got 0"),
        (["--model", "nope"], "unknown model 'nope'; valid names:"),
        (["--ig-options", "[1]"], "ig_options: expected a dict"),
    ],
)
def test_fishing_study_refuses_bad_input_before_writing(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, ["fishing-study", "--output-dir", out_dir, *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_overhead_reads_the_run_configuration(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("attacks: [bias]\nbatch_sizes: [2]\n")
    code, out, _ = run_cli(capsys, ["overhead", "--config", config, "--trials", "1",
                                    "--print-config"])  # fmt: skip
    printed = yaml.safe_load(out)
    assert code == 0 and printed["attacks"] == ["bias"] and printed["trials"] == 1
    code, _, err = run_cli(capsys, ["overhead", "--rounds", "0"])
    assert code == 2 and "rounds: expected a positive integer, got 0" in err


def test_grouped_commands_and_their_options(capsys):
    code, out, _ = run_cli(capsys, ["leaderboard", "--help"])
    assert code == 0 and "leakbench leaderboard verify" in out
    code, _, err = run_cli(capsys, ["leaderboard", "nope"])
    assert code == 2 and "unknown command 'leaderboard nope'; valid commands:" in err
    code, _, err = run_cli(capsys, ["sweep", "grid.yaml", "--jobs", "0"])
    assert code == 2 and "jobs: expected a positive integer, got 0" in err
    code, _, err = run_cli(capsys, ["sweep", "grid.yaml", "--launcher", "cloud"])
    assert code == 2 and "launcher: expected one of 'local', 'slurm', got cloud" in err


def test_every_option_of_every_typed_command_has_help():
    for name, cmd in COMMANDS.items():
        for action in build(cmd).parser._actions:
            if action.dest not in ("help", "config") and not action.dest.startswith("_"):
                assert action.help and action.help.strip(), (name, action.dest)


def test_rank_and_data_check_take_typed_options(capsys, tmp_path):
    code, out, _ = run_cli(capsys, ["rank", "--model", "fcn3", "--input-shape", "[1,6,6]",
                                    "--num-classes", "3", "--json", "--no-progress"])  # fmt: skip
    record = json.loads(out)
    assert code == 0 and [r["virtual"] for r in record["rows"]] == [None, 1000 - 36, 0]
    code, _, err = run_cli(capsys, ["rank", "--model", "fcn3", "--input-shape", "[1,6]"])
    assert code == 2 and err.strip() == (
        "leakbench: error: input_shape: got [1, 6], expected [C,H,W]"
    )
    code, out, _ = run_cli(capsys, ["data", "check", "lfw", "--root", tmp_path / "nowhere"])
    assert code == 1 and "does not exist" in out
    code, _, err = run_cli(capsys, ["data", "check", "isic", "--option", "edition=2017",
                                    "--option", "size=64", "--root", tmp_path])  # fmt: skip
    assert code == 2 and "unknown option 'size' (given 64) for dataset 'isic'" in err
