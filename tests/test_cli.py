"""The command line: listing, and one clear line for every kind of bad input."""

import json
import subprocess
import sys

import pytest

import tests.components  # noqa: F401
from leakbench.cli import main

BASE = [
    "run",
    "--dataset",
    "synthetic-uniform",
    "--model",
    "fcn",
    "--logger",
    "none",
    "--no-progress",
]


def run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_components_and_requirements(capsys):
    code, out, _ = run_cli(capsys, ["list"])
    assert code == 0
    for name in ("lfw-subset", "lenet-zhu", "bias", "idlg", "noise", "pruning"):
        assert name in out
    assert "needs-labels-test" in out and "requires: batch_size, labels" in out


@pytest.mark.parametrize(
    ("flag", "value", "kind"),
    [
        ("--dataset", "nope", "dataset"),
        ("--model", "nope", "model"),
        ("--attack", "nope", "attack"),
        ("--defense", "nope", "defense"),
    ],
)
def test_unknown_names_list_the_valid_ones(capsys, tmp_path, flag, value, kind):
    argv = ["run", "--logger", "none", "--output-dir", str(tmp_path), flag, value]
    code, _, err = run_cli(capsys, argv)
    assert code == 2
    assert f"unknown {kind} 'nope'; valid names:" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing is written for a refused run"


def test_batch_size_larger_than_the_split(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        [
            *BASE,
            "--output-dir",
            str(tmp_path),
            "--attack",
            "noisy-copy-test",
            "--batch-size",
            "41",
            "--dataset",
            "lfw-subset",
        ],
    )
    assert code == 2
    assert "batch size 41 is larger than the attack split (40 samples)" in err


def test_zero_trials(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        [*BASE, "--output-dir", str(tmp_path), "--trials", "0", "--attack", "noisy-copy-test"],
    )
    assert code == 2 and "trials must be at least 1, got 0" in err


def test_requirements_not_granted(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, [*BASE, "--output-dir", str(tmp_path), "--attack", "needs-labels-test"]
    )
    assert code == 2
    assert "attack 'needs-labels-test' requires labels, which this run does not grant" in err


def test_unknown_config_key(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: lfw-subset\nbatchsize: 4\n")
    code, _, err = run_cli(capsys, ["run", "--config", str(config)])
    assert code == 2
    assert "unknown key(s) 'batchsize'" in err and "valid keys:" in err


def test_bad_attack_option(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "attacks: [noisy-copy-test]\nattack_options: {noisy-copy-test: {}}\n"
        "attack_options: {dlg: {iterations: 3}}\n"
    )
    code, _, err = run_cli(capsys, ["run", "--config", str(config)])
    assert code == 2 and "attack_options given for attacks not in the run: ['dlg']" in err


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "leakbench.cli", "run", "--model", "nope", "--logger", "none"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[0]]
    assert "unknown model 'nope'" in result.stderr and "Traceback" not in result.stderr


def interrupted_dlg_run(capsys, tmp_path):
    """A DLG / LeNet-Zhu run that was interrupted after its first trial."""
    config = tmp_path / "dlg.yaml"
    config.write_text(
        "model: lenet-zhu\nattacks: [dlg]\nattack_options: {dlg: {iterations: 2}}\n"
        "covariates: []\n"
        f"batch_sizes: [1]\ntrials: 3\nlogger: none\noutput_dir: {tmp_path}\nrun_name: dlg\n"
    )
    assert run_cli(capsys, ["run", "--config", str(config), "--no-progress"])[0] == 0
    run_dir = tmp_path / "dlg"
    records = run_dir / "trials.jsonl"
    records.write_text(records.read_text().splitlines(keepends=True)[0])
    return run_dir


def test_resume_alone_continues_the_saved_configuration(capsys, tmp_path):
    run_dir = interrupted_dlg_run(capsys, tmp_path)
    saved = (run_dir / "config.yaml").read_text()
    code, out, _ = run_cli(capsys, ["run", "--resume", str(run_dir), "--no-progress"])
    assert code == 0 and "lenet-zhu" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["cells"]) == ["dlg__none__b1"]  # not the quickstart's cells
    assert summary["cells"]["dlg__none__b1"]["trials"] == 3
    # The saved protocol is unchanged (only the environment block is rewritten).
    assert (
        saved.split("environment:")[0]
        == (run_dir / "config.yaml").read_text().split("environment:")[0]
    )


def test_resume_refuses_flags_that_change_the_protocol(capsys, tmp_path):
    run_dir = interrupted_dlg_run(capsys, tmp_path)
    before = (run_dir / "trials.jsonl").read_text()
    code, _, err = run_cli(
        capsys, ["run", "--resume", str(run_dir), "--attack", "bias", "--seed", "3"]
    )
    assert code == 2
    assert err.strip() == (
        f"leakbench: error: --resume continues the run saved in {run_dir}; these options "
        "would change what it measures: attacks, seed"
    )
    assert (run_dir / "trials.jsonl").read_text() == before
    # Options that do not change the measurement are accepted.
    code, _, _ = run_cli(
        capsys, ["run", "--resume", str(run_dir), "--isolation", "in-process", "--no-progress"]
    )
    assert code == 0


def test_resume_of_a_folder_without_a_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["run", "--resume", str(tmp_path / "nothing")])
    assert code == 2 and "cannot resume" in err and "holds no config.yaml" in err
