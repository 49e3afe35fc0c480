"""The Cocktail Party Attack (Kariyappa et al., ICML 2023): the first layer's update is a mixture
of the batch's inputs, and independent component analysis unmixes it.

"Up to sign and scale" is the canonical metrics' scale-aligned PSNR (``psnr_scale_aligned``:
the reconstruction times its least-squares gain against the matched truth, a negative gain for
a flipped sign). With a bias on the layer the attack also resolves sign and scale, and the
plain PSNR is the score."""

from __future__ import annotations

import statistics

import pytest

from leakbench.config import RunConfig
from leakbench.results import RunDirectory
from leakbench.runner import run

# Independent, non-Gaussian sources (ICA's premise) of the size of the paper's Tiny-ImageNet
# images (3×64×64): uniform noise, one image per sample.
INDEPENDENT = {"input_shape": [3, 64, 64], "num_classes": 10, "size": 32}


def cocktail_run(tmp_path, name: str, **changes) -> dict:
    config = {
        "dataset": "synthetic-uniform",
        "dataset_options": INDEPENDENT,
        "model": "fcn",
        "model_options": {"widths": [256], "activation_name": "relu"},
        "attacks": ["cocktail-party"],
        "attack_options": {"cocktail-party": {"domain": "pixels"}},
        "batch_sizes": [16],
        "trials": 1,
        "grants": ["batch_size"],
        "isolation": "in-process",
        "logger": "none",
        "covariates": [],
        "privacy_metrics": False,
        "output_dir": str(tmp_path),
        "run_name": name,
        **changes,
    }
    run(RunConfig.from_mapping(config), progress=False, echo=lambda _: None)
    (record,) = RunDirectory(tmp_path / name).records()
    assert record["status"] == "ok", record["error"]
    return record


def scores(record: dict, key: str) -> list[float]:
    return [sample[key] for sample in record["metrics"]["samples"]]


def test_a_batch_of_16_comes_back_with_sign_and_scale_from_the_bias(tmp_path):
    record = cocktail_run(tmp_path, "bias")
    assert record["attack_info"]["scale_from"] == "bias"
    assert min(scores(record, "psnr")) >= 30.0


def test_without_a_bias_a_batch_of_16_comes_back_up_to_sign_and_scale(tmp_path):
    options = {"widths": [256], "activation_name": "relu", "bias": False}
    record = cocktail_run(tmp_path, "no-bias", model_options=options)
    assert record["attack_info"]["scale_from"] == "pixel range"
    assert min(scores(record, "psnr_scale_aligned")) >= 30.0


@pytest.mark.slow
def test_the_number_of_sources_is_the_updates_rank_when_the_batch_size_is_not_granted(tmp_path):
    record = cocktail_run(tmp_path, "rank", grants=[])
    assert record["attack_info"]["sources"] == 16
    assert record["attack_info"]["sources_from"] == "rank"
    assert min(scores(record, "psnr")) >= 30.0


@pytest.mark.slow
def test_a_fedavg_delta_is_a_mixture_of_the_same_inputs(tmp_path):
    fedavg = {"name": "fedavg", "lr": 0.1, "local_steps": 2, "local_batch_size": 8}
    record = cocktail_run(tmp_path, "fedavg", client_protocol=fedavg)
    assert min(scores(record, "psnr")) >= 30.0


def test_on_faces_the_derivative_contrast_unmixes_better_than_the_pixels(tmp_path):
    faces = {
        "dataset": "lfw-subset",
        "dataset_options": {},
        "split": "train",
        "model": "fcn-exan",
        "model_options": {},
    }
    derivatives = cocktail_run(
        tmp_path, "derivatives", **faces, attack_options={"cocktail-party": {}}
    )
    pixels = cocktail_run(tmp_path, "pixels", **faces)
    aligned = {
        name: statistics.median(scores(record, "psnr_scale_aligned"))
        for name, record in (("derivatives", derivatives), ("pixels", pixels))
    }
    # Correlated faces are not ICA's independent sources: about 20 dB against 14 dB measured.
    assert aligned["derivatives"] >= aligned["pixels"] + 3.0


def test_a_layer_narrower_than_the_batch_fails_the_trial_with_the_reason(tmp_path):
    options = {"widths": [12], "activation_name": "relu"}
    config_changes = {"model_options": options}
    with pytest.raises(AssertionError, match="16 sources cannot be unmixed from 12 mixtures"):
        cocktail_run(tmp_path, "narrow", **config_changes)
