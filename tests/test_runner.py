"""The evaluation loop end to end: records, failures, budgets, determinism, resume."""

import json

import pytest

import tests.components  # noqa: F401  (registers the test attacks)
from leakbench.config import RunConfig
from leakbench.protocol import MEASURED_FIELDS
from leakbench.runner import run


def config(tmp_path, **overrides):
    values = dict(
        dataset="synthetic-uniform",
        dataset_options={"input_shape": [1, 6, 6], "num_classes": 3, "size": 16},
        model="fcn",
        model_options={"widths": [8]},
        attacks=["noisy-copy-test"],
        attack_options={},
        batch_sizes=[1, 2],
        trials=3,
        output_dir=str(tmp_path),
        run_name="run",
        logger="csv",
    )
    values.update(overrides)
    return RunConfig.from_mapping(values)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def test_run_writes_config_trials_summary_and_grids(tmp_path):
    summary = run(config(tmp_path), progress=False, echo=lambda _: None)
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (run_dir / "figures").glob("*.png")) == [
        "noisy-copy-test__none__b1.png",
        "noisy-copy-test__none__b2.png",
    ]
    rows = records(run_dir)
    assert len(rows) == 6
    row = rows[-1]
    assert row["status"] == "ok" and row["batch_size"] == 2 and len(row["sample_ids"]) == 2
    assert row["budget"]["used"]["iterations"] == 3
    assert {"seed", "time_s", "metrics", "covariates", "sample_ids"} <= set(row)
    assert summary["cells"]["noisy-copy-test__none__b2"]["batch_size_accuracy"] == 1.0
    assert len(list((run_dir / "csv").glob("*/metrics.csv"))) == 1


def test_same_seed_gives_identical_trial_metrics(tmp_path):
    run(config(tmp_path, run_name="a"), progress=False, echo=lambda _: None)
    run(config(tmp_path, run_name="b"), progress=False, echo=lambda _: None)
    run(config(tmp_path, run_name="c", seed=1), progress=False, echo=lambda _: None)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in MEASURED_FIELDS} for r in rows]

    a, b, c = (strip(records(tmp_path / n)) for n in "abc")
    assert a == b
    assert [r["sample_ids"] for r in a] != [r["sample_ids"] for r in c]


def test_a_failing_attack_fails_its_trials_and_counts_in_the_aggregates(tmp_path):
    cfg = config(tmp_path, attacks=["exploding-test", "noisy-copy-test"], batch_sizes=[1])
    summary = run(cfg, progress=False, echo=lambda _: None)
    failed = [r for r in records(tmp_path / "run") if r["attack"] == "exploding-test"]
    assert len(failed) == 3 and all(r["status"] == "failed" for r in failed)
    assert "RuntimeError: the attack blew up on purpose" in failed[0]["error"]
    cell = summary["cells"]["exploding-test__none__b1"]
    assert cell["failed"] == 3 and cell["failure_rate"] == 1.0
    assert cell["images"] == 3 and cell["success_rate"] == 0.0
    assert summary["cells"]["noisy-copy-test__none__b1"]["failed"] == 0


def test_non_finite_update_fails_the_trial_with_that_reason(tmp_path):
    summary = run(
        config(tmp_path, defense="poison-test", batch_sizes=[1]),
        progress=False,
        echo=lambda _: None,
    )
    row = records(tmp_path / "run")[0]
    assert row["status"] == "failed"
    assert row["error"].startswith("the shared update contains NaN or inf")
    assert summary["cells"]["noisy-copy-test__poison-test__b1"]["failed"] == 3


def test_time_budget_is_enforced(tmp_path):
    cfg = config(
        tmp_path,
        attacks=["sleeper-test"],
        batch_sizes=[1],
        trials=1,
        budget={"max_iterations": None, "max_seconds": 0.05},
    )
    run(cfg, progress=False, echo=lambda _: None)
    row = records(tmp_path / "run")[0]
    assert row["status"] == "timeout"
    assert row["error"].startswith("timeout: the attack ran past the trial's wall-clock limit")


def test_iteration_budget_caps_the_meter(tmp_path):
    cfg = config(tmp_path, batch_sizes=[1], trials=1, budget={"max_iterations": 2})
    run(cfg, progress=False, echo=lambda _: None)
    assert records(tmp_path / "run")[0]["budget"]["used"]["iterations"] == 2


def test_resume_skips_trials_already_written(tmp_path):
    run(config(tmp_path, trials=3), progress=False, echo=lambda _: None)
    path = tmp_path / "run" / "trials.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))  # interrupted
    summary = run(
        config(tmp_path, trials=3), resume=tmp_path / "run", progress=False, echo=lambda _: None
    )
    rows = records(tmp_path / "run")
    assert len(rows) == 6
    assert len({(r["cell"], r["trial"]) for r in rows}) == 6
    assert summary["cells"]["noisy-copy-test__none__b1"]["trials"] == 3


def test_single_sample_attacks_are_skipped_for_larger_batches(tmp_path, monkeypatch):
    from tests.components import NoisyCopy

    monkeypatch.setattr(NoisyCopy, "max_batch_size", 1)
    notes = []
    summary = run(config(tmp_path), progress=False, echo=notes.append)
    assert "noisy-copy-test__none__b2" in summary["skipped"]
    assert any(n.startswith("skipping noisy-copy-test__none__b2") for n in notes)


@pytest.mark.parametrize("logger", ["none", "wandb"])
def test_other_loggers(tmp_path, logger):
    run(
        config(tmp_path, logger=logger, batch_sizes=[1], trials=1),
        progress=False,
        echo=lambda _: None,
    )
    assert len(records(tmp_path / "run")) == 1


def test_covariates_are_recorded_as_configured(tmp_path):
    run(
        config(tmp_path, run_name="all", batch_sizes=[1], trials=1),
        progress=False,
        echo=lambda _: None,
    )
    assert "rank_index" in records(tmp_path / "all")[0]["covariates"]
    run(
        config(tmp_path, run_name="none", batch_sizes=[1], trials=1, covariates=[]),
        progress=False,
        echo=lambda _: None,
    )
    assert records(tmp_path / "none")[0]["covariates"] == {}
    with pytest.raises(KeyError, match="unknown covariate 'nope'"):
        run(config(tmp_path, covariates=["nope"]), progress=False, echo=lambda _: None)


def test_output_files_respect_the_umask(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        run(config(tmp_path, batch_sizes=[1], trials=1), progress=False, echo=lambda _: None)
    finally:
        os.umask(previous)
    for name in ("config.yaml", "trials.jsonl", "summary.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
