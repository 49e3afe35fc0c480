"""Adaptive attacks: each beats its defense's naive evaluation (the generic attacks) on a small
case, and the pieces they rest on are exact where they should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leakbench.attacks._unmixing import successive_projections, unmix
from leakbench.attacks.instahide_decoding import resolve_reflections
from leakbench.attacks.noise_aware import rank_one_start
from leakbench.attacks.quantization_aware import qsgd_unit, uniform_intervals
from leakbench.client import FedSGD, build_victim, fedsgd_update
from leakbench.defenses.quantization import qsgd, uniform_quantize
from leakbench.metrics import score_trial
from leakbench.registry import ATTACKS, DATAMODULES, DEFENSES
from leakbench.threat_model import Budget, Capability, make_observation

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("adaptive_attacks")

GRANTED = frozenset({Capability.BATCH_SIZE})


@pytest.fixture(scope="module")
def digits():
    module = DATAMODULES.get("digits")()
    return module, module.samples("test")


def case(digits, defense, options, *, batch=1, start=0, **model_options):
    """A digits batch, a seeded victim, the defended FedSGD update and the attacker's view."""
    module, samples = digits
    images = torch.stack([samples[i][0] for i in range(start, start + batch)])
    labels = torch.tensor([samples[i][1] for i in range(start, start + batch)])
    model = build_victim(
        "fcn", tuple(module.input_shape), module.num_classes, seed=0, **model_options
    )
    share = FedSGD().share(
        model.eval(),
        images,
        labels,
        DEFENSES.get(defense)(**options),
        torch.Generator().manual_seed(0),
    )

    def observe():
        return make_observation(
            model,
            share.update,
            granted=GRANTED,
            labels=labels,
            input_shape=tuple(module.input_shape),
            num_classes=module.num_classes,
            mean=module.mean,
            std=module.std,
            budget=Budget(),
            seed=1,
        )

    def psnr(attack, **attack_options):
        answer = ATTACKS.get(attack)(**attack_options).reconstruct(observe())
        scores = score_trial(
            truth_images=images,
            truth_labels=labels,
            sample_ids=[str(i) for i in range(batch)],
            mean=module.mean,
            std=module.std,
            reconstructed_images=answer.images,
        )
        return float(np.median([s["psnr"] for s in scores["samples"]]))

    return psnr, observe, share


NO_BIAS = {"widths": [32, 32], "bias": False}  # no closed-form first layer: matching decides


@pytest.mark.parametrize(
    ("defense", "options", "model", "adaptive", "adaptive_options", "generic", "margin"),
    [
        (
            "soteria",
            {"prune_fraction": 0.8},
            NO_BIAS,
            "soteria-skip",
            {},
            ["inverting-gradients"],
            15,
        ),
        ("pruning", {"keep_fraction": 0.1}, NO_BIAS, "mask-aware", {}, ["inverting-gradients"], 8),
        ("top-k", {"fraction": 0.1}, NO_BIAS, "mask-aware", {}, ["inverting-gradients"], 8),
        (
            "quantization",
            {"scheme": "uniform", "bits": 2},
            NO_BIAS,
            "quantization-aware",
            {"scheme": "uniform", "bits": 2},
            ["inverting-gradients"],
            3,
        ),
        (
            "quantization",
            {"scheme": "sign"},
            {"widths": [64]},
            "quantization-aware",
            {"scheme": "sign"},
            ["inverting-gradients", "bias"],
            2,
        ),
        (
            "quantization",
            {"scheme": "qsgd", "levels": 2},
            {"widths": [64]},
            "quantization-aware",
            {"scheme": "qsgd", "levels": 2},
            ["inverting-gradients", "bias"],
            1,
        ),
        (
            "dp-sgd",
            {"max_grad_norm": 1.0, "noise_multiplier": 0.005},
            {"widths": [64]},
            "noise-aware",
            {"mechanism": "dp-sgd", "max_grad_norm": 1.0, "noise_multiplier": 0.005},
            ["inverting-gradients", "bias"],
            1.5,
        ),
        (
            "noise",
            {"scale": 0.1},
            {"widths": [64]},
            "noise-aware",
            {"noise_std": 0.1},
            ["inverting-gradients", "bias"],
            2,
        ),
    ],
)
def test_each_gradient_matching_adaptive_attack_beats_the_naive_evaluation(
    digits, defense, options, model, adaptive, adaptive_options, generic, margin
):
    psnr, _, _ = case(digits, defense, options, **model)
    budget = {"iterations": 150}
    naive = max(psnr(name, **(budget if name != "bias" else {})) for name in generic)
    assert psnr(adaptive, **adaptive_options, **budget) > naive + margin


def test_the_defenses_name_adaptive_attacks_that_adapt_to_them_and_accept_their_options():
    from leakbench.defenses.dp_sgd import DPSGDDefense

    defenses = {
        "soteria": {},
        "pruning": {"keep_fraction": 0.1},
        "top-k": {"k": 10},
        "quantization": {"scheme": "qsgd", "levels": 4},
        "noise": {"scale": 0.1, "clip_norm": 2.0},
        "dp-sgd": {"max_grad_norm": 1.0, "noise_multiplier": 1.2},
        "mixup": {"k": 2},
        "instahide": {"k": 4},
    }
    for name, options in defenses.items():
        named = DEFENSES.get(name)(**options).adaptive_attacks()
        assert named, name
        for attack, told in named.items():
            cls = ATTACKS.get(attack)
            assert name in cls.adapts_to
            cls(**told)  # the defense's description is a valid configuration of the attack
    told = DPSGDDefense(max_grad_norm=1.0, noise_multiplier=1.2).adaptive_attacks()["noise-aware"]
    assert told == {"mechanism": "dp-sgd", "max_grad_norm": 1.0, "noise_multiplier": 1.2}
    # Generic attacks adapt to nothing, so a defense track runs them on every setting.
    assert ATTACKS.get("inverting-gradients").adapts_to == frozenset()


def test_mixup_unmixing_separates_the_mixes_a_generic_attack_returns(digits):
    psnr, observe, share = case(digits, "mixup", {"k": 2}, batch=2, widths=[256])
    assert psnr("bias") < 25  # one affine mixture of the mixes
    assert psnr("mixup-unmixing", k=2) > 100  # each private image, exactly
    answer = ATTACKS.get("mixup-unmixing")(k=2).reconstruct(observe())
    assert answer.info["stage_one"] == "exclusive first-layer rows"
    mixing = np.asarray(answer.info["mixing_matrix"])
    truth = np.asarray(share.info["coefficients"])
    # The recovered mixing matrix holds the client's coefficients (rows up to order).
    assert np.allclose(np.sort(mixing.max(axis=1)), np.sort(truth.max(axis=1)), atol=1e-4)


def test_instahide_decoding_undoes_the_sign_flips_the_bias_attack_returns(digits):
    psnr, observe, share = case(digits, "instahide", {"k": 4}, batch=1, widths=[256])
    assert share.info["flipped_fraction"] > 0.3
    assert psnr("bias") < 10  # the encoding itself, exactly: far from the private image
    assert psnr("instahide-decoding", k=4) > 18


def test_the_pieces_of_the_adaptive_attacks_are_exact():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=generator, dtype=torch.float64)
    # QSGD's unit ‖v‖/s is read back from the quantised values.
    shared = qsgd(values, 4, generator)
    assert qsgd_unit(shared, 4) == pytest.approx(float(values.norm()) / 4, rel=1e-12)
    # Uniform quantisation's intervals hold the client's values.
    low, high = uniform_intervals(uniform_quantize(values, 3), 3)
    assert bool(((low <= values + 1e-12) & (values <= high + 1e-12)).all())
    # The rank-one fit is the input when nothing is noisy.
    model = build_victim("fcn", (1, 4, 4), 3, seed=0, dtype=torch.float64, widths=[20])
    image, label = (
        torch.rand(1, 1, 4, 4, generator=generator, dtype=torch.float64),
        torch.tensor([1]),
    )
    observation = make_observation(
        model,
        fedsgd_update(model, image, label),
        granted=GRANTED,
        labels=label,
        input_shape=(1, 4, 4),
        num_classes=3,
        mean=(0.0,),
        std=(1.0,),
        budget=Budget(),
        seed=0,
    )
    start, info = rank_one_start(observation, noise_std=0.0)
    assert torch.allclose(start, image, rtol=0, atol=1e-10)
    assert info["closed_form"] == "rank-one fit"


def test_unmixing_and_reflections_recover_synthetic_sources():
    rng = np.random.default_rng(0)
    sources = rng.random((3, 40)) * (rng.random((3, 40)) < 0.4)  # sparse, dark background
    for b in range(3):
        sources[b, b] = 1.0
        sources[[c for c in range(3) if c != b], b] = 0.0  # a pixel only source b lights
    mixing = np.array([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.2, 0.0, 0.8]])
    found, estimated = unmix(mixing @ sources)
    order = [int(np.argmin(((found - s) ** 2).sum(axis=1))) for s in sources]
    assert np.allclose(found[order], sources, atol=1e-8)
    assert np.allclose(estimated[:, order], mixing, atol=1e-8)
    assert successive_projections(np.eye(3), 3) == [0, 1, 2]
    # Reflections about μ = 0.3: a value above 2μ is forced, a dark one is kept dark.
    truth = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    low, high = 0.3 - np.abs(truth - 0.3), 0.3 + np.abs(truth - 0.3)
    values, ambiguous = resolve_reflections(low, high, sweeps=10)
    assert np.allclose(values, truth) and ambiguous == 8
