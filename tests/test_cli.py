"""The command line: listing, and one clear line for every kind of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import tests.components  # noqa: F401
from leakbench.cli import main

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("cli")

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
    assert code == 2 and "trials: expected a positive integer, got 0" in err


def test_an_attack_that_cannot_handle_the_victim_skips_its_cells_with_a_note(capsys, tmp_path):
    argv = [*BASE, "--model", "lenet-zhu", "--attacks", "[bias,noisy-copy-test]",
            "--batch_sizes", "[1,2]", "--trials", "1", "--isolation", "in-process",
            "--privacy_metrics", "false", "--covariates", "[]", "--output-dir", str(tmp_path),
            "--run_name", "r", "--dataset_options", "{input_shape: [1, 32, 32]}"]  # fmt: skip
    code, out, _ = run_cli(capsys, argv)
    assert code == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert sorted(summary["cells"]) == ["noisy-copy-test__none__b1", "noisy-copy-test__none__b2"]
    reason = "the bias attack needs the first trainable layer to be nn.Linear with a bias"
    assert sorted(summary["skipped"]) == ["bias__none__b1", "bias__none__b2"]
    assert all(note.startswith(reason) for note in summary["skipped"].values())
    assert f"skipped bias__none__b2: {reason}" in out


def test_a_run_whose_attacks_all_cannot_handle_the_victim_is_refused(capsys, tmp_path):
    argv = [*BASE, "--model", "lenet-zhu", "--attacks", "[bias]", "--output-dir", str(tmp_path),
            "--dataset_options", "{input_shape: [1, 32, 32]}"]  # fmt: skip
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(
        "leakbench: error: the bias attack needs the first trainable layer to be nn.Linear"
    )
    assert list(tmp_path.iterdir()) == []


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


@pytest.fixture(scope="module")
def finished_dlg_run(tmp_path_factory):
    """A DLG / LeNet-Zhu run (not the quickstart's configuration), made once per module."""
    folder = tmp_path_factory.mktemp("dlg")
    config = folder / "dlg.yaml"
    config.write_text(
        "model: lenet-zhu\nattacks: [dlg]\nattack_options: {dlg: {iterations: 2}}\n"
        "covariates: []\nprivacy_metrics: false\nisolation: in-process\n"
        f"batch_sizes: [1]\ntrials: 3\nlogger: none\noutput_dir: {folder}\nrun_name: dlg\n"
    )
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    return folder / "dlg"


@pytest.fixture
def interrupted_dlg_run(finished_dlg_run, tmp_path):
    """A copy of the DLG run, interrupted after its first trial."""
    run_dir = tmp_path / "dlg"
    shutil.copytree(finished_dlg_run, run_dir)
    records = run_dir / "trials.jsonl"
    records.write_text(records.read_text().splitlines(keepends=True)[0])
    return run_dir


def test_resume_alone_continues_the_saved_configuration(capsys, interrupted_dlg_run):
    run_dir = interrupted_dlg_run
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


def test_resume_refuses_flags_that_change_the_protocol(capsys, interrupted_dlg_run):
    run_dir = interrupted_dlg_run
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
    # Options that do not change the measurement are accepted (the run saved no thread count).
    code, _, _ = run_cli(
        capsys, ["run", "--resume", str(run_dir), "--threads", "1", "--no-progress"]
    )
    assert code == 0


def tiny_run(capsys, tmp_path):
    """A finished two-trial run folder, made in a second."""
    argv = [*BASE, "--attacks", "[noisy-copy-test]", "--batch_sizes", "[1]", "--trials", "2",
            "--isolation", "in-process", "--privacy_metrics", "false", "--covariates", "[]",
            "--output-dir", str(tmp_path), "--run_name", "tiny"]  # fmt: skip
    assert run_cli(capsys, argv)[0] == 0
    return tmp_path / "tiny"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.yaml", b"dataset: [\n", "config.yaml, line 2 column 1: invalid YAML"),
        (
            "config.yaml",
            b"- 1\n- 2\n",
            "config.yaml must hold a mapping of config keys, got a list",
        ),
        ("config.yaml", b"\xff\xfe\x00", "config.yaml: byte 0xff at offset 0 is not UTF-8 text"),
        ("config.yaml", b"trials: 0\n", "config.yaml: trials: expected a positive integer, got 0"),
        (
            "trials.jsonl",
            b"[1, 2]\n",
            "trials.jsonl: line 1 is a JSON list, not an object, expected",
        ),
        ("trials.jsonl", b"7\n", "trials.jsonl: line 1 is a JSON int, not an object"),
        (
            "trials.jsonl",
            b'{"cell": "x"}\n',
            "trials.jsonl: line 1 is a JSON object without a text 'cell' and an integer 'trial'",
        ),
        ("trials.jsonl", b"\x80\x81\x00binary", "trials.jsonl: line 1 is not UTF-8 text"),
        ("trials.jsonl", b"{nope}\n{nope}", "trials.jsonl: line 1 is not JSON, expected a trial"),
    ],
)
def test_resume_of_a_damaged_run_is_one_line_and_changes_nothing(
    capsys, tmp_path, name, content, message
):
    run_dir = tiny_run(capsys, tmp_path)
    (run_dir / name).write_bytes(content)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, ["run", "--resume", str(run_dir), "--no-progress"])
    assert code == 2 and err.startswith("leakbench: error: ") and len(err.splitlines()) == 1
    assert message in err and str(run_dir / name) in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_appends_below_a_record_cut_short_but_never_below_other_bytes(capsys, tmp_path):
    run_dir = tiny_run(capsys, tmp_path)
    records = run_dir / "trials.jsonl"
    first, second = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(first + second[:20])  # killed mid-write: cut off, the trial runs again
    code, out, _ = run_cli(capsys, ["run", "--resume", str(run_dir), "--no-progress"])
    assert code == 0 and "its last record was cut short" in out
    assert [json.loads(line)["trial"] for line in records.read_text().splitlines()] == [0, 1]


def test_resume_of_a_folder_without_a_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["run", "--resume", str(tmp_path / "nothing")])
    assert code == 2 and "cannot resume" in err and "holds no config.yaml" in err


# --- one typed configuration, a fast command line, one line for every bad input -------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_sizes: 4\n", "batch_sizes: expected a list, got 4"),
        ("batch_sizes: [2.5]\n", "batch_sizes: expected a positive integer, got 2.5"),
        ("trials: 2.5\n", "trials: expected a positive integer, got 2.5"),
        ('trials: "10"\n', "trials: expected a positive integer, got '10'"),
        ("grants: [telepathy]\n", "grants: expected one of 'labels', 'batch_size'"),
        ("budget: {max_seconds: soon}\n", "budget.max_seconds: expected float or null, got soon"),
        ("trials: [1\nseed: 2\n", "run.yaml, line 2 column 5: invalid YAML: expected ',' or ']'"),
        ("batch_sizes: []\n", "batch_sizes: got [], expected at least one batch size"),
        (
            "budget: {max_seconds: -1}\n",
            "budget.max_seconds: got -1.0, expected a positive number of seconds or null",
        ),
        (
            "budget: {max_seconds: 0}\n",
            "budget.max_seconds: got 0.0, expected a positive number of seconds or null",
        ),
        (
            "budget: {max_seconds: .nan}\n",
            "budget.max_seconds: got nan, expected a positive number of seconds or null",
        ),
        (
            "budget: {max_iterations: -1}\n",
            "budget.max_iterations: got -1, expected a positive integer or null",
        ),
        (
            "budget: {max_iterations: 0}\n",
            "budget.max_iterations: got 0, expected a positive integer or null",
        ),
        ("run_name: ../elsewhere\n", "run_name: got '../elsewhere', expected the name of one"),
        ("run_name: ''\n", "run_name: got '', expected the name of one folder"),
        ("- dataset: digits\n", "run.yaml must hold a mapping of config keys, got a list"),
        ("a: 1\n\x00\n", "run.yaml, offset 5: invalid YAML: unacceptable character #x0000"),
    ],
)
def test_bad_config_file_is_one_line_and_writes_nothing(capsys, tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, ["run", "--config", str(config), "--output-dir", str(out_dir)])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("leakbench: error: ")
    assert message in err
    assert not out_dir.exists()


def test_a_binary_config_file_is_named(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    code, _, err = run_cli(capsys, ["run", "--config", str(config)])
    assert code == 2
    assert err == (
        f"leakbench: error: {config}: byte 0x89 at offset 0 is not UTF-8 text, expected a "
        "YAML file\n"
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--model_options",
            "{widths: [4], bogus: 1}",
            "model_options: unknown option 'bogus' (given 1) for model 'fcn'; expected one of: "
            "widths, bias, activation_name",
        ),
        (
            "--dataset_options",
            "{bogus: 1}",
            "dataset_options: unknown option 'bogus' (given 1) for dataset 'lfw-subset'; "
            "expected one of: mirrored, train_batch_size, num_clients, partition, dirichlet_alpha, "
            "partition_seed, client",
        ),
        (
            "--dataset_options",
            "{seed: 3}",
            "dataset_options: seed (given 3) is set by the run, expected it as the run's key "
            "'seed'",
        ),
        (
            "--defense_options",
            "{}",
            "defense_options: got {}, expected the option 'scale' that defense 'noise' needs",
        ),
        (
            "--defense_options",
            "{std: 0.1}",
            "defense_options: unknown option 'std' (given 0.1) for defense 'noise'; expected "
            "one of: scale, distribution, clip_norm",
        ),
    ],
)
def test_unknown_component_options_are_one_line_and_write_nothing(
    capsys, tmp_path, option, value, message
):
    checkpoints = tmp_path / "checkpoints"
    argv = ["run", "--output-dir", str(tmp_path / "o"), "--checkpoint_dir", str(checkpoints),
            option, value]  # fmt: skip
    if option == "--defense_options":
        argv += ["--defense", "noise"]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and err == f"leakbench: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "path", "message"),
    [
        ("output_dir", "x" * 300, "holds a name of 300 bytes, longer than the file system allows"),
        ("run_name", "x" * 300, "holds a name of 300 bytes, longer than the file system allows"),
        ("output_dir", "/".join(["x" * 200] * 25), "longer than the file system allows for a run"),
    ],
)
def test_names_longer_than_the_file_system_allows(capsys, tmp_path, key, path, message):
    argv = ["run", "--output-dir", str(tmp_path / path if key == "output_dir" else tmp_path)]
    if key == "run_name":
        argv += ["--run_name", path]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and err.startswith(f"leakbench: error: {key}: ") and message in err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_bad_command_line_values_are_one_line(capsys, tmp_path):
    for argv, message in [
        (["--trials", "2.5"], "trials: expected a positive integer, got '2.5'"),
        (["--batch_sizes", "[0]"], "batch_sizes: expected a positive integer, got 0"),
        (["--dtype", "float16"], "dtype: expected one of 'float32', 'float64', got float16"),
        (["--budget.max_seconds", "x"], "budget.max_seconds: expected float or null, got x"),
        (["--devices", "2.5"], "devices: expected a positive integer, got '2.5'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ]:
        code, _, err = run_cli(capsys, ["run", "--output-dir", str(tmp_path / "o"), *argv])
        assert code == 2 and err.strip() == f"leakbench: error: {message}", argv
    assert not (tmp_path / "o").exists()


def test_output_folder_below_a_regular_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, [*BASE, "--output-dir", str(blocker / "runs")])
    assert code == 2
    assert err.strip() == (
        f"leakbench: error: output_dir: '{blocker / 'runs'}' cannot be created: {blocker} is a "
        "regular file, expected a folder"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_not_writable(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_cli(capsys, [*BASE, "--output-dir", str(locked / "runs")])
    assert code == 2 and "output_dir: " in err and "expected a writable folder" in err
    assert list(locked.iterdir()) == []


def test_refused_boundary_leaves_no_folder(capsys, tmp_path):
    out_dir = tmp_path / "studies"
    for argv, message in [
        (["--compare-attacks", "[nope]"], "unknown attack 'nope'"),
        (["--train-epochs", "[-1]"], "train_epochs: got [-1], expected non-negative integers"),
        (["--compare_trials", "0"], "compare_trials: expected a positive integer, got 0"),
    ]:
        code, _, err = run_cli(capsys, ["boundary", "--output-dir", str(out_dir), *argv])
        assert code == 2 and message in err, argv
    assert not out_dir.exists()


def test_one_syntax_for_nested_keys_lists_and_old_flags(capsys):
    code, out, _ = run_cli(
        capsys,
        [
            "run",
            "--print-config",
            "--budget.max_seconds",
            "5",
            "--attacks",
            "[dlg]",
            "--attack",
            "bias",
            "--batch-size",
            "3",
            "--batch-size",
            "2",
            "--model",
            "lenet-zhu",
            "--output-dir",
            "elsewhere",
        ],  # fmt: skip
    )
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["budget"] == {"max_iterations": None, "max_seconds": 5.0}
    assert printed["attacks"] == ["dlg", "bias"] and printed["batch_sizes"] == [3, 2]
    assert printed["model_options"] == {} and printed["output_dir"] == "elsewhere"


def test_every_run_key_is_an_option_with_help():
    from dataclasses import fields

    from leakbench.commands import COMMANDS, build
    from leakbench.config import RunConfig

    parser = build(COMMANDS["run"]).parser
    helps = {a.dest: a.help for a in parser._actions}
    for f in fields(RunConfig):
        keys = [k for k in helps if k == f.name or k.startswith(f"{f.name}.")]
        assert keys, f.name
        assert all(helps[k] and helps[k].strip() for k in keys), f.name


def test_version(capsys):
    from leakbench import __version__

    assert run_cli(capsys, ["--version"])[:2] == (0, f"leakbench {__version__}\n")


def test_list_shows_every_attacks_batch_size_limit(capsys):
    code, out, _ = run_cli(capsys, ["list"])
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("improved-rgap "))
    assert code == 0 and lines[at + 1].split() == ["batch", "size:", "at", "most", "1"]


NO_TORCH_PROBE = """
import contextlib, io, sys
from leakbench.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "lightning", "wandb") if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("argv", "code"), [(["--help"], 0), (["list"], 0), (["run", "--attack", "nope"], 2)]
)
def test_fast_answers_import_no_torch(argv, code):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_PROBE, *argv], capture_output=True, text=True, check=True
    )
    assert result.stdout.split("\n")[-2] == f"{code} []"


def test_registry_index_is_fresh():
    from leakbench.registry import INDEX_PATH, build_index, index_text

    assert INDEX_PATH.read_text() == index_text(build_index()), (
        "leakbench/registry_index.json is stale: run `leakbench index`"
    )


def test_plugin_names_come_from_entry_point_metadata(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from leakbench import registry

    plugin = EntryPoint("plug-test", "tests.components:NoisyCopy", "leakbench.attacks")
    monkeypatch.setattr(
        registry, "plugin_entry_points", lambda r: [plugin] if r.kind == "attack" else []
    )
    # Known from the metadata alone: accepted without loading it.
    registry.check_name(registry.ATTACKS, "plug-test")
    with pytest.raises(
        registry.UnknownNameError, match="unknown attack 'nope'; valid names:.*plug-test"
    ):
        registry.check_name(registry.ATTACKS, "nope")
    monkeypatch.setattr(registry.ATTACKS, "_items", dict(registry.ATTACKS._items))
    code, out, _ = run_cli(capsys, ["list"])
    assert code == 0 and "plug-test" in out and "requires: nothing beyond the update" in out


def test_free_form_values_are_kept_as_given_and_never_edited():
    # Options and the track block hold strings that look like YAML ("1", "a: b", "yes"); a
    # track's description once came back as a mapping and the caller's dict was edited.
    from leakbench.config import RunConfig

    values = {
        "track": {"name": "t", "description": "FCN, batches: 1 and 4", "tag": "1"},
        "dataset_options": {"root": "data: here", "flag": "yes"},
    }
    given = json.loads(json.dumps(values))
    config = RunConfig.from_mapping(values)
    assert config.track == given["track"]
    assert config.dataset_options == given["dataset_options"]
    assert values == given


def test_a_bad_value_of_a_union_type_names_every_type_it_could_be(capsys):
    code, _, err = run_cli(capsys, ["train", "--model", "fcn", "--dataset", "digits",
                                    "--model-options", "{widths:[256]}"])  # fmt: skip
    assert code == 2
    assert err == (
        "leakbench: error: model_options: expected dict[str, Any] or null, got {widths:[256]}\n"
    )
