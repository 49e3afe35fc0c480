"""A run's victim state, client protocol and privacy metrics, through the runner end to end."""

import json

import pytest

from leakbench.config import ConfigError, RunConfig
from leakbench.models.training import train_victim
from leakbench.runner import run


def config(tmp_path, **overrides):
    values = dict(
        dataset="digits",
        model="fcn",
        model_options={"widths": [16]},
        attacks=["bias"],
        attack_options={},
        batch_sizes=[1],
        trials=2,
        isolation="in-process",
        output_dir=str(tmp_path / "runs"),
        run_name="run",
        logger="none",
        checkpoint_dir=str(tmp_path / "checkpoints"),
        privacy_metrics=False,  # the reference classifier: only where it is the point
    )
    values.update(overrides)
    return RunConfig.from_mapping(values)


def records(tmp_path):
    text = (tmp_path / "runs" / "run" / "trials.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def trained(tmp_path):
    return train_victim(
        "fcn",
        "digits",
        model_options={"widths": [16]},
        epochs=1,
        batch_size=64,
        checkpoint_dir=tmp_path / "checkpoints",
        accelerator="cpu",
    )


def test_a_trained_victim_named_by_its_hash_is_the_one_attacked(tmp_path, trained):
    summary = run(
        config(tmp_path, model_state=trained.checkpoint.sha256[:12]),
        progress=False,
        echo=lambda _: None,
    )
    saved = (tmp_path / "runs" / "run" / "config.yaml").read_text()
    assert f"model_state: {trained.checkpoint.sha256[:12]}" in saved
    # The bias attack is exact for one sample on the trained victim too.
    assert summary["cells"]["bias__none__b1"]["psnr"]["worst"] > 100


def test_a_checkpoint_of_another_architecture_is_refused_before_any_trial(tmp_path, trained):
    wrong = config(tmp_path, model_state=trained.checkpoint.sha256, model_options={"widths": [8]})
    with pytest.raises(ValueError, match="model_options"):
        run(wrong, progress=False, echo=lambda _: None)
    assert not (tmp_path / "runs").exists()


def test_an_aggregate_draws_k_clients_and_records_its_protocol(tmp_path):
    protocol = {"name": "aggregate", "clients": 3}
    summary = run(config(tmp_path, client_protocol=protocol), progress=False, echo=lambda _: None)
    rows = records(tmp_path)
    assert len(rows) == 2
    for row in rows:
        assert row["client_protocol"]["name"] == "aggregate"
        assert row["client_protocol"]["clients"] == 3
        assert len(row["sample_ids"]) == 3  # K = 3 clients of B = 1
    assert summary["cells"]["bias__none__b1"]["images"] == 6


def test_unsupported_protocols_are_refused_before_any_trial(tmp_path):
    fedavg = {"name": "fedavg", "lr": 0.1, "local_steps": 2}
    with pytest.raises(ConfigError, match="defense 'dp-sgd' cannot run under the client protocol"):
        run(
            config(
                tmp_path,
                client_protocol=fedavg,
                defense="dp-sgd",
                defense_options={"max_grad_norm": 1.0, "noise_multiplier": 1.0},
            ),
            progress=False,
        )
    with pytest.raises(ValueError, match="attack 'rgap' does not support the client protocol"):
        run(config(tmp_path, client_protocol=fedavg, attacks=["rgap"]), progress=False)
    with pytest.raises(ConfigError, match="client_protocol"):
        run(config(tmp_path, client_protocol={"name": "fedprox"}), progress=False)
    assert not (tmp_path / "runs").exists()


def test_exact_reconstructions_are_identified_and_leak_the_task(tmp_path):
    # The session's checkpoint folder: the digits reference classifier is trained once.
    exact = config(tmp_path, trials=3, privacy_metrics=True, checkpoint_dir=None)
    summary = run(exact, progress=False, echo=lambda _: None)
    cell = summary["cells"]["bias__none__b1"]
    assert cell["iip_pixel"]["rate"] == 1.0  # exact: its nearest split image is its own
    assert cell["iip_pixel"]["chance"] == pytest.approx(1 / 360)  # the digits test split
    # An exact reconstruction is classified as its ground truth is.
    assert cell["task_leakage"]["rate"] == cell["task_ceiling"]["rate"]
    for row in records(tmp_path):
        assert {"iip_pixel", "task_leakage", "task_ceiling"} <= set(row["metrics"]["samples"][0])
