"""Robbing the Fed (Fowl et al., ICLR 2022): the server sends an imprint model, the client trains
what it received, and the bins of the imprint block give most of a batch back exactly.

Expected recovered fraction with k equally likely bins: (1 − 1/k)^(B − 1), 0.884 for k = 512
and B = 64 (:func:`leakbench.attacks.robbing_the_fed.expected_recovered_fraction`)."""

from __future__ import annotations

import pytest
import torch

from leakbench.attacks.robbing_the_fed import RobbingTheFed, expected_recovered_fraction
from leakbench.config import RunConfig
from leakbench.interfaces import Defense
from leakbench.protocol import TrialSetting, Victim, prepare_attack, run_trial
from leakbench.registry import register_attack
from leakbench.results import RunDirectory
from leakbench.runner import run
from leakbench.threat_model import Budget, Capability, RequirementsNotGranted

GRANTS = ["surrogate_data", "server_model"]


def imprint_run(tmp_path, **changes) -> list[dict]:
    config = {
        "dataset": "lfw-subset",
        "split": "train",  # 160 images; the surrogate data is the test split's 40
        "model": "fcn-exan",
        "attacks": ["robbing-the-fed"],
        "attack_options": {"robbing-the-fed": {"bins": 512}},
        "batch_sizes": [64],
        "trials": 1,
        "grants": GRANTS,
        "isolation": "in-process",
        "logger": "none",
        "covariates": [],
        "privacy_metrics": False,
        "output_dir": str(tmp_path),
        "run_name": "imprint",
        **changes,
    }
    run(RunConfig.from_mapping(config), progress=False, echo=lambda _: None)
    return list(RunDirectory(tmp_path / "imprint").records())


def test_the_expected_fraction_is_the_chance_of_a_bin_of_ones_own():
    assert expected_recovered_fraction(512, 64) == pytest.approx((511 / 512) ** 63)
    assert expected_recovered_fraction(512, 64) == pytest.approx(0.884, abs=1e-3)
    assert expected_recovered_fraction(2048, 256) == pytest.approx(0.883, abs=1e-3)
    assert expected_recovered_fraction(10, 1) == 1.0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_most_of_a_batch_of_64_faces_comes_back_exactly(tmp_path, dtype):
    (record,) = imprint_run(tmp_path, dtype=dtype)
    assert record["status"] == "ok", record["error"]
    # The protocol ran the server's model: the client trained the imprint model it received.
    assert record["server_model"] == {
        "name": "imprint",
        "options": {"bins": 512, "body": "fcn-exan", "body_options": {}},
    }
    psnr = [sample["psnr"] for sample in record["metrics"]["samples"]]
    recovered = [p >= 100.0 for p in psnr]
    assert sum(recovered) / 64 >= 0.8  # the paper's formula expects 0.884 at k = 512
    if dtype == "float64":  # closed form: what comes back, comes back to rounding
        assert min(p for p in psnr if p >= 100.0) >= 250.0
    # One image per occupied bin and never more: no spray of candidates for the matching.
    assert record["attack_info"]["images"] <= record["attack_info"]["occupied_bins"] <= 64


def test_the_fedavg_variant_recovers_most_of_the_batch_closely(tmp_path):
    fedavg = {"name": "fedavg", "lr": 0.1, "local_epochs": 1, "local_batch_size": 16}
    (record,) = imprint_run(tmp_path, dataset="digits", client_protocol=fedavg)
    assert record["status"] == "ok", record["error"]
    psnr = [sample["psnr"] for sample in record["metrics"]["samples"]]
    # Four local steps train the imprint block: close, not exact (86 % at 30 dB when measured).
    assert sum(p >= 30.0 for p in psnr) / 64 >= 0.7


def test_an_imprint_model_at_its_initialisation_computes_what_its_body_does():
    body = Victim("fcn-exan", (1, 8, 8), 10, seed=3).build()
    imprint = Victim("imprint", (1, 8, 8), 10, {"bins": 16, "body": "fcn-exan"}, seed=3).build()
    imprint.body.load_state_dict(body.state_dict())
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(imprint(x), body(x))
    with pytest.raises(ValueError, match="another zoo model, not imprint"):
        Victim("imprint", (1, 8, 8), 10, {"body": "imprint"}).build()


def test_the_attack_needs_both_grants():
    with pytest.raises(RequirementsNotGranted, match="requires server_model, surrogate_data"):
        prepare_attack("robbing-the-fed", {}, frozenset({Capability.BATCH_SIZE}))


@register_attack("bad-server-model-test")
class BadServerModel(RobbingTheFed):
    """Sends what the harness must refuse: the case is chosen by ``gain``."""

    def server_model(self, victim, context):
        sent = super().server_model(victim, context)
        if self.gain == 1.0:
            return {**sent, "name": "no-such-model"}
        if self.gain == 2.0:
            return {**sent, "state": {"imprint.measure.weight": torch.zeros(3)}}
        return {**sent, "model": torch.nn.Linear(1, 1)}  # an object, not plain data


@pytest.mark.parametrize(
    ("gain", "error"),
    [
        (1.0, "unknown model 'no-such-model'"),
        (2.0, "the victim's state does not fit the model Imprinted: missing"),
        (3.0, "it must return a dict with exactly the keys name, options and state"),
    ],
)
def test_a_server_model_the_zoo_cannot_build_fails_its_trial_with_the_reason(gain, error):
    granted = frozenset({Capability.SERVER_MODEL, Capability.SURROGATE_DATA})
    attack = prepare_attack("bad-server-model-test", {"gain": gain}, granted)
    setting = TrialSetting(
        cell="bad__none__b2",
        attack_name="bad-server-model-test",
        defense_name="none",
        batch_size=2,
        input_shape=(1, 4, 4),
        num_classes=3,
        mean=(0.0,),
        std=(1.0,),
        granted=granted,
        budget=Budget(max_seconds=60),
        dtype=torch.float64,
        client_mode="eval",
        seed=0,
        success_psnr=30.0,
        isolation="in-process",
        surrogate=(torch.rand(8, 1, 4, 4, dtype=torch.float64), torch.zeros(8, dtype=torch.long)),
    )
    batch = {
        "trial": 0,
        "images": torch.rand(2, 1, 4, 4, dtype=torch.float64),
        "labels": torch.tensor([0, 1]),
        "sample_ids": ["a", "b"],
    }
    victim = Victim("fcn", (1, 4, 4), 3, {"widths": [8]}, dtype=torch.float64)
    record = run_trial(victim, attack, Defense(), setting, batch).record
    assert record["status"] == "failed"
    assert record["error"].startswith("server model: ") and error in record["error"]
    assert "server_model" not in record
