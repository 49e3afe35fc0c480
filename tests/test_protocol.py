"""The trial protocol's guarantees: attacks isolated from the ground truth, fresh victims,
unrevealing seeds, machine-independent budgets, failures recorded, exact resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tests.components  # noqa: F401  (registers the test attacks)
import tests.hostile_attacks as hostile
from leakbench.config import ConfigError, RunConfig
from leakbench.protocol import MEASURED_FIELDS
from leakbench.runner import run

TIMING = (*MEASURED_FIELDS, "isolation")


def config(tmp_path, **overrides):
    values = dict(
        dataset="lfw-subset",
        model="fcn",
        model_options={"widths": [32]},
        attacks=["grab-test"],
        attack_options={},
        batch_sizes=[2],
        trials=3,
        covariates=[],
        output_dir=str(tmp_path),
        run_name="run",
        logger="none",
        threads=1,
    )
    values.update(overrides)
    return RunConfig.from_mapping(values)


def records(run_dir):
    rows = []
    for path in sorted(run_dir.glob("trials*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return sorted(rows, key=lambda r: (r["cell"], r["trial"]))


def strip(rows, keys=TIMING):
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def psnrs(rows):
    return [s["psnr"] for r in rows for s in r["metrics"]["samples"]]


@pytest.fixture
def restore_grab_requires():
    requires = hostile.Grab.requires
    yield
    hostile.Grab.requires = requires
    hostile.CAPTURED.clear()
    hostile.HOOK_CALLS.clear()


@pytest.mark.parametrize("isolation", ["sandbox", "process"])
def test_a_hostile_attack_finds_no_private_pixel_in_an_isolated_worker(
    tmp_path, restore_grab_requires, isolation
):
    run(config(tmp_path, isolation=isolation), progress=False, echo=lambda _: None)
    rows = records(tmp_path / "run")
    assert [(r["status"], r["error"], r["isolation"]) for r in rows] == [
        ("ok", None, isolation)
    ] * 3
    assert all(r["attack_info"]["candidates"] == 0 for r in rows)
    assert max(psnrs(rows)) < 15  # chance level: noise against faces


def test_the_same_hostile_attack_succeeds_in_process(tmp_path, restore_grab_requires):
    """The control: without isolation, frames and gc hand the attack the private batch, so the
    test above can fail. Fresh victims and the frozen requirements still hold in-process."""
    run(config(tmp_path, isolation="in-process"), progress=False, echo=lambda _: None)
    rows = records(tmp_path / "run")
    assert min(psnrs(rows)) > 100
    assert hostile.HOOK_CALLS == []  # editing its own requires never unlocked client_hook
    assert hostile.Grab.requires == frozenset(hostile.Capability)  # it did try


def test_every_trial_gets_a_fresh_victim(tmp_path):
    """An attack that corrupts every model it reaches changes nothing for later trials."""
    clean = config(tmp_path, attacks=["bias"], run_name="clean", isolation="in-process")
    run(clean, progress=False, echo=lambda _: None)
    tampered = config(
        tmp_path, attacks=["tamper-test", "bias"], run_name="tampered", isolation="in-process"
    )
    run(tampered, progress=False, echo=lambda _: None)
    after = [r for r in records(tmp_path / "tampered") if r["attack"] == "bias"]
    assert strip(after) == strip(records(tmp_path / "clean"))


def test_the_attacker_seed_does_not_identify_the_trial(tmp_path):
    run(config(tmp_path, attacks=["noisy-copy-test"], trials=4), progress=False, echo=print)
    rows = records(tmp_path / "run")
    assert len({r["attack_seed"] for r in rows}) == 1
    assert len({r["seed"] for r in rows}) == 4
    assert rows[0]["attack_seed"] not in {r["seed"] for r in rows}


def test_results_do_not_depend_on_how_fast_the_machine_is(tmp_path):
    budget = {"max_iterations": 15, "max_seconds": 60}
    fast = config(tmp_path, attacks=["slowed-test"], run_name="fast", budget=budget)
    slow = config(
        tmp_path,
        attacks=["slowed-test"],
        attack_options={"slowed-test": {"delay": 0.02}},
        run_name="slow",
        budget=budget,
    )
    run(fast, progress=False, echo=lambda _: None)
    run(slow, progress=False, echo=lambda _: None)
    a, b = records(tmp_path / "fast"), records(tmp_path / "slow")
    assert strip(a) == strip(b)
    assert [r["budget"]["used"]["iterations"] for r in a] == [15, 15, 15]
    assert min(r["time_s"] for r in b) > 0.25  # it really was slower


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        ("crash", "failed", "died without answering (exit code 3)"),
        ("kill", "failed", "died without answering (killed by signal SIGKILL)"),
        ("hang", "timeout", "timeout: the attack ran past the trial's wall-clock limit of 1 s"),
        ("not-a-reconstruction", "failed", "reconstruct returned dict, expected a Reconstruction"),
        ("unserialisable-info", "failed", "Reconstruction.info is not JSON-serialisable"),
    ],
)
def test_a_misbehaving_worker_fails_its_trial_and_the_run_goes_on(
    tmp_path, monkeypatch, mode, status, reason
):
    monkeypatch.setattr("leakbench.protocol.isolation.WORKER_START_ALLOWANCE_S", 1.0)
    cfg = config(
        tmp_path,
        attacks=["misbehaving-test", "noisy-copy-test"],
        attack_options={"misbehaving-test": {"mode": mode}},
        trials=2,
        budget={"max_iterations": None, "max_seconds": 1},
    )
    summary = run(cfg, progress=False, echo=lambda _: None)
    rows = records(tmp_path / "run")
    bad = [r for r in rows if r["attack"] == "misbehaving-test"]
    assert [r["status"] for r in bad] == [status, status]
    assert reason in bad[0]["error"]
    assert summary["cells"]["misbehaving-test__none__b2"]["failed"] == 2
    assert summary["cells"]["noisy-copy-test__none__b2"]["failed"] == 0


def test_resume_reruns_a_truncated_last_record_and_never_merges_it(tmp_path):
    cfg = config(tmp_path, attacks=["noisy-copy-test"], trials=4)
    run(cfg, progress=False, echo=lambda _: None)
    path = tmp_path / "run" / "trials.jsonl"
    complete = path.read_text()
    path.write_text(complete[: len(complete) - 40])  # killed in the middle of the last record
    notes = []
    summary = run(cfg, resume=tmp_path / "run", progress=False, echo=notes.append)
    assert any("last record was cut short" in n for n in notes)
    assert strip(records(tmp_path / "run")) == strip(
        [json.loads(line) for line in complete.splitlines()]
    )
    assert summary["cells"]["noisy-copy-test__none__b2"]["trials"] == 4


def test_a_folder_holding_another_configuration_is_refused(tmp_path):
    run(config(tmp_path, attacks=["noisy-copy-test"]), progress=False, echo=lambda _: None)
    with pytest.raises(ConfigError, match=r"another configuration \(differs in: seed, trials\)"):
        run(config(tmp_path, attacks=["noisy-copy-test"], seed=3, trials=2), progress=False)


def test_an_unreadable_sample_fails_the_trials_that_draw_it(tmp_path):
    from leakbench.datamodules.fixtures import write_chestxray_fixture

    root = write_chestxray_fixture(tmp_path / "data")
    broken = sorted((root / "test").rglob("*.jpeg"))[0]
    broken.write_bytes(b"not a jpeg")
    cfg = config(
        tmp_path,
        dataset="chestxray",
        dataset_options={"root": str(root)},
        attacks=["noisy-copy-test"],
        batch_sizes=[1],
        trials=len(list((root / "test").rglob("*.jpeg"))),
        privacy_metrics=False,  # no chest X-ray reference classifier to train (20 s)
    )
    summary = run(cfg, progress=False, echo=lambda _: None)
    rows = records(tmp_path / "run")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and str(broken) in failed[0]["error"]
    assert all(r["status"] == "ok" for r in rows if r not in failed)
    assert summary["cells"]["noisy-copy-test__none__b1"]["failed"] == 1


def test_aggregates_count_timeouts():
    from leakbench.metrics import aggregate

    base = {"metrics": {"samples": [], "batch_size_correct": None}, "error": "x", "time_s": 1.0}
    rows = [
        {**base, "status": s, "budget": {"used": {"iterations": 0}}}
        for s in ("ok", "timeout", "failed")
    ]
    summary = aggregate(rows)
    assert (summary["failed"], summary["timeouts"]) == (2, 1)
    assert np.isclose(summary["failure_rate"], 2 / 3)


def test_secret_keys_never_reach_the_run_folder(tmp_path):
    secret = {"seed": 123456789, "noise": 0.02}
    cfg = config(tmp_path, attacks=["noisy-copy-test"], trials=2, private_transform=secret)
    run(cfg, progress=False, echo=lambda _: None, secret_keys=("private_transform", "seed"))
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert "123456789" not in written and "private_transform: sha256:" in written
    rows = records(tmp_path / "run")
    plain = config(tmp_path, attacks=["noisy-copy-test"], trials=2, run_name="plain")
    run(plain, progress=False, echo=lambda _: None)
    # Same samples drawn, but the client held transformed versions of them.
    assert [r["sample_ids"] for r in rows] == [r["sample_ids"] for r in records(tmp_path / "plain")]
    assert psnrs(rows) != psnrs(records(tmp_path / "plain"))
