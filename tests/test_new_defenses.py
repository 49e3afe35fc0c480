"""The defenses the field compares: DP-SGD, quantisation, Soteria, MixUp and InstaHide."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.nn import functional as F

from leakbench.client import build_victim, fedsgd_update
from leakbench.defenses.dp_sgd import DPSGDDefense, epsilon_spent, training_epsilon
from leakbench.defenses.instahide import InstaHideDefense
from leakbench.defenses.mixup import MixUpDefense
from leakbench.defenses.quantization import QuantizationDefense, qsgd, uniform_quantize
from leakbench.defenses.soteria import SoteriaDefense
from leakbench.registry import DEFENSES

SHAPE = (3, 8, 8)
CLASSES = 5


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(size: int = 6, seed: int = 0, shape: tuple[int, ...] = SHAPE):
    g = generator(seed)
    images = torch.rand(size, *shape, generator=g, dtype=torch.float64)
    return images, torch.randint(CLASSES, (size,), generator=g)


def victim(name: str = "lenet-zhu", mode: str = "eval", **options):
    model = build_victim(name, SHAPE, CLASSES, seed=0, dtype=torch.float64, **options)
    return model.train(mode == "train")


def share(defense, model, images, labels, seed: int = 0):
    return defense.apply(model, images, labels, generator(seed), fedsgd_update)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_registered_names() -> None:
    assert {"dp-sgd", "quantization", "soteria", "mixup", "instahide"} <= set(DEFENSES.names())


CONFIGURED = [
    ("dp-sgd", {"max_grad_norm": 1.0, "noise_multiplier": 0.5}),
    ("quantization", {"scheme": "qsgd", "levels": 4}),
    ("quantization", {"scheme": "uniform", "bits": 3}),
    ("quantization", {"scheme": "sign"}),
    ("soteria", {"prune_fraction": 0.3}),
    ("mixup", {"k": 3}),
    ("instahide", {}),
]


@pytest.mark.parametrize(("name", "options"), CONFIGURED)
def test_every_defense_is_seeded_and_reports_json(name: str, options: dict) -> None:
    model = victim()
    images, labels = batch()
    defense = DEFENSES.get(name)(**options)
    first, again = (
        share(defense, model, images, labels, 3),
        share(defense, model, images, labels, 3),
    )
    assert same(first.update, again.update) and torch.equal(first.images, again.images)
    assert first.info == again.info
    json.dumps(first.info, allow_nan=False)  # recorded as the trial's defense_report
    assert first.labels.dtype == torch.int64 and first.labels.shape == (6,)
    assert first.update.keys() == {n for n, _ in model.named_parameters()}
    if name in ("dp-sgd", "mixup", "instahide") or options.get("scheme") == "qsgd":
        other = share(defense, model, images, labels, 4)
        assert not same(first.update, other.update)


# --- DP-SGD -------------------------------------------------------------------------------


def clipped_mean_by_hand(model, images, labels, bound: float) -> dict[str, torch.Tensor]:
    grads = [fedsgd_update(model, images[i : i + 1], labels[i : i + 1]) for i in range(len(labels))]
    norms = [math.sqrt(sum(float((g**2).sum()) for g in gi.values())) for gi in grads]
    factors = [min(1.0, bound / n) for n in norms]
    return {
        name: sum(f * gi[name] for f, gi in zip(factors, grads, strict=True)) / len(grads)
        for name in grads[0]
    }, norms


@pytest.mark.parametrize(("name", "mode"), [("lenet-zhu", "eval"), ("fcn", "train")])
def test_dp_sgd_without_noise_is_the_mean_of_clipped_per_sample_gradients(name, mode) -> None:
    model = victim(name, mode)
    images, labels = batch()
    _, norms = clipped_mean_by_hand(model, images, labels, 1.0)
    bound = sum(sorted(norms)[2:4]) / 2  # three samples clipped, three not
    expected, _ = clipped_mean_by_hand(model, images, labels, bound)
    shared = share(DPSGDDefense(max_grad_norm=bound, noise_multiplier=0.0), model, images, labels)
    for n, g in expected.items():
        assert torch.allclose(shared.update[n], g, rtol=0, atol=1e-10)
    assert shared.info["clipped_fraction"] == 0.5
    assert shared.info["epsilon"] is None  # σ = 0: no privacy
    assert model.training == (mode == "train")  # the client's model is left as it was
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())


def test_dp_sgd_with_a_loose_bound_and_no_noise_is_the_fedsgd_gradient() -> None:
    model = victim("lenet-zhu")
    images, labels = batch()
    shared = share(DPSGDDefense(max_grad_norm=1e9, noise_multiplier=0.0), model, images, labels)
    for n, g in fedsgd_update(model, images, labels).items():
        assert torch.allclose(shared.update[n], g, rtol=0, atol=1e-10)
    assert shared.info["clipped_fraction"] == 0.0


def test_dp_sgd_noise_has_std_sigma_c_over_b() -> None:
    model = victim("fcn", widths=(256,))
    images, labels = batch(size=4)
    sigma, bound = 0.7, 0.3
    clean = share(DPSGDDefense(max_grad_norm=bound, noise_multiplier=0.0), model, images, labels)
    noisy = share(DPSGDDefense(max_grad_norm=bound, noise_multiplier=sigma), model, images, labels)
    noise = torch.cat([(noisy.update[n] - clean.update[n]).flatten() for n in clean.update])
    assert noise.numel() > 50_000
    assert abs(noise.mean().item()) < 0.01 * sigma * bound / 4
    assert noise.std().item() == pytest.approx(sigma * bound / 4, rel=0.02)
    assert noisy.info["noise_std_in_update"] == pytest.approx(sigma * bound / 4, rel=1e-15)


def test_dp_sgd_reports_the_rdp_epsilon_of_opacus() -> None:
    sigma, delta = 1.3, 1e-5
    info = share(
        DPSGDDefense(max_grad_norm=1.0, noise_multiplier=sigma, delta=delta), victim(), *batch()
    ).info
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    assert info["epsilon"] == accountant.get_epsilon(delta=delta)
    # Independently: q = 1 is the Gaussian mechanism, RDP α/(2σ²), with Balle et al.'s
    # conversion over Opacus' default orders.
    closed_form = min(
        a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    assert info["epsilon"] == pytest.approx(closed_form, rel=1e-12)
    assert (info["noise_multiplier"], info["max_grad_norm"], info["delta"]) == (sigma, 1.0, delta)
    assert (info["sample_rate"], info["steps"]) == (1.0, 1)


def test_training_epsilon_uses_q_b_over_n_and_every_step() -> None:
    accountant = RDPAccountant()
    accountant.history = [(1.1, 32 / 1000, 3 * 32)]  # ⌈1000 / 32⌉ = 32 steps per epoch
    expected = accountant.get_epsilon(delta=1e-5)
    assert training_epsilon(1.1, 32, 1000, 3, 1e-5) == expected
    assert epsilon_spent(1.1, 32 / 1000, 96, 1e-5) == expected
    assert epsilon_spent(0.0, 0.5, 10, 1e-5) == math.inf


def test_dp_sgd_reports_the_epsilon_of_the_observed_round_apart_from_the_accounted_one() -> None:
    defense = DPSGDDefense(max_grad_norm=1.0, noise_multiplier=0.9, sample_rate=0.02, steps=300)
    info = share(defense, victim(), *batch()).info
    assert info["epsilon"] == epsilon_spent(0.9, 0.02, 300, 1e-5)
    # The server sees this batch's one release: q = 1, T = 1, whatever the training was.
    assert info["round_epsilon"] == epsilon_spent(0.9, 1.0, 1, 1e-5)
    assert defense.accounting()["round_epsilon"] == info["round_epsilon"]


def test_dp_sgd_options_for_training_account_every_step_of_it() -> None:
    options = DPSGDDefense.options_for_training(
        {"max_grad_norm": 1.0, "epsilon": 3.0}, batch_size=32, dataset_size=1437, epochs=5
    )
    assert options == {
        "max_grad_norm": 1.0,
        "epsilon": 3.0,
        "sample_rate": 32 / 1437,
        "steps": 5 * 45,  # ⌈1437 / 32⌉ = 45 steps per epoch
    }
    same_steps = {"max_grad_norm": 1.0, "epsilon": 3.0, "steps": 225}
    assert (
        DPSGDDefense.options_for_training(same_steps, batch_size=32, dataset_size=1437, epochs=5)[
            "steps"
        ]
        == 225
    )
    with pytest.raises(ValueError, match=r"dp-sgd steps=7 disagrees with the training"):
        DPSGDDefense.options_for_training(
            {"epsilon": 3.0, "steps": 7}, batch_size=32, dataset_size=1437, epochs=5
        )
    # Other defenses keep their options.
    assert SoteriaDefense.options_for_training(
        {"prune_fraction": 0.2}, batch_size=1, dataset_size=10, epochs=1
    ) == {"prune_fraction": 0.2}


def test_a_dp_checkpoint_card_states_the_epsilon_of_its_whole_training(tmp_path) -> None:
    from leakbench.models.training import train_victim

    trained = train_victim(
        "fcn",
        "digits",
        model_options={"widths": [8]},
        epochs=2,
        batch_size=256,
        lr=0.01,
        optimizer="adam",
        defense="dp-sgd",
        defense_options={"max_grad_norm": 1.0, "epsilon": 3.0},
        checkpoint_dir=tmp_path,
        accelerator="cpu",
    )
    card = trained.checkpoint.card
    accounting = card["defense_accounting"]
    steps, rate = 2 * 6, 256 / 1437  # ⌈1437 / 256⌉ = 6 steps per epoch
    assert (accounting["steps"], accounting["sample_rate"]) == (steps, rate)
    assert card["defense_options"] == {
        "max_grad_norm": 1.0,
        "epsilon": 3.0,
        "sample_rate": rate,
        "steps": steps,
    }
    assert 3.0 - 0.01 <= accounting["epsilon"] <= 3.0
    assert accounting["epsilon"] == epsilon_spent(accounting["noise_multiplier"], rate, steps, 1e-5)
    # Calibrated for one full-batch step (what the card used to claim as 3.0), the same
    # training would have had another ε.
    single_step = DPSGDDefense(1.0, epsilon=3.0).noise_multiplier
    assert abs(epsilon_spent(single_step, rate, steps, 1e-5) - 3.0) > 0.1
    # The audit's case: 5 epochs at B = 32 on 1437 samples is 225 steps at ε ≈ 1.16, not 3.
    assert epsilon_spent(single_step, 32 / 1437, 225, 1e-5) == pytest.approx(1.16, abs=0.01)


def test_dp_sgd_epsilon_target_gives_back_epsilon_within_tolerance() -> None:
    defense = DPSGDDefense(max_grad_norm=1.0, epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=500)
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=500, accountant="rdp"
    )
    assert defense.noise_multiplier == sigma
    info = share(defense, victim(), *batch()).info
    assert 3.0 - 0.01 <= info["epsilon"] <= 3.0
    assert info["target_epsilon"] == 3.0 and info["noise_multiplier"] == sigma


def test_dp_sgd_refuses_batchnorm_in_one_line() -> None:
    model = build_victim("convnet", (3, 32, 32), CLASSES, seed=0, dtype=torch.float64, width=2)
    images, labels = batch(size=2, shape=(3, 32, 32))
    defense = DPSGDDefense(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"layers 1 \(BatchNorm2d\), 4 \(BatchNorm2d\)") as caught:
        share(defense, model.eval(), images, labels)
    assert "\n" not in str(caught.value) and "not DP-compatible" in str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_grad_norm": 0.0, "noise_multiplier": 1.0}, r"max_grad_norm must be .*> 0, got 0.0"),
        ({"max_grad_norm": 1.0}, r"give exactly one of noise_multiplier and epsilon, got"),
        (
            {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "epsilon": 2.0},
            r"give exactly one of noise_multiplier and epsilon",
        ),
        ({"max_grad_norm": 1.0, "noise_multiplier": -1}, r"noise_multiplier must be .*, got -1"),
        ({"max_grad_norm": 1.0, "epsilon": -2.0}, r"epsilon must be a finite number > 0, got -2"),
        (
            {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
            r"delta must be in \(0, 1\), got 1.0",
        ),
        (
            {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0},
            r"sample_rate must be in \(0, 1\], got 0",
        ),
        (
            {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "steps": 0},
            r"steps must be a positive integer, got 0",
        ),
    ],
)
def test_dp_sgd_rejects_bad_hyperparameters(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPSGDDefense(**options)


# --- quantisation -------------------------------------------------------------------------


def test_qsgd_is_unbiased() -> None:
    values = torch.randn(40, generator=generator(1), dtype=torch.float64)
    levels, draws = 2, 20_000
    g = generator(2)
    mean = torch.stack([qsgd(values, levels, g) for _ in range(draws)]).mean(dim=0)
    # Each entry is one of two neighbouring levels ‖v‖/s apart: its std is at most ‖v‖/(2s).
    standard_error = values.norm() / (2 * levels) / math.sqrt(draws)
    assert ((mean - values).abs() <= 5 * standard_error).all()
    nearest = torch.round(values.abs() / values.norm() * levels) * values.norm() / levels
    assert ((nearest * values.sign() - values).abs() > 20 * standard_error).any()  # not rounding


@pytest.mark.parametrize("levels", [1, 3, 8])
def test_qsgd_uses_the_stated_levels(levels: int) -> None:
    values = torch.randn(5_000, generator=generator(3), dtype=torch.float64)
    quantized = qsgd(values, levels, generator(4))
    steps = quantized.abs() / values.norm() * levels
    assert torch.allclose(steps, steps.round(), rtol=0, atol=1e-9)
    assert set(steps.round().long().tolist()) <= set(range(levels + 1))
    scaled = values.abs() / values.norm() * levels
    assert ((steps.round() == scaled.floor()) | (steps.round() == scaled.floor() + 1)).all()
    assert (quantized.sign() * values.sign() >= 0).all()
    bits = QuantizationDefense(levels=levels).bits_per_entry()
    assert bits == 1 + math.ceil(math.log2(levels + 1))


def test_uniform_quantization_has_2_to_the_bits_values_and_half_a_step_of_error() -> None:
    values = torch.randn(5_000, generator=generator(5), dtype=torch.float64)
    quantized = uniform_quantize(values, 3)
    assert len(torch.unique(quantized)) <= 8
    step = (values.max() - values.min()) / 7
    assert ((quantized - values).abs() <= step / 2 + 1e-12).all()
    assert quantized.min() == values.min() and quantized.max() == pytest.approx(values.max().item())


def test_quantization_applies_tensor_by_tensor_and_reports_bits() -> None:
    model = victim()
    images, labels = batch()
    update = fedsgd_update(model, images, labels)
    sign = share(QuantizationDefense(scheme="sign"), model, images, labels)
    for n, g in update.items():
        assert torch.allclose(sign.update[n], g.abs().mean() * g.sign(), rtol=1e-15, atol=0)
    assert sign.info["bits_per_entry"] == 1
    qs = share(QuantizationDefense(levels=4), model, images, labels)
    assert qs.info["bits_per_entry"] == 4  # sign + ⌈log₂ 5⌉
    entries = sum(g.numel() for g in update.values())
    assert qs.info["bits_per_entry_with_scales"] == 4 + 32 * len(update) / entries
    assert torch.equal(qs.images, images) and torch.equal(qs.labels, labels)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scheme": "ternary"}, r"unknown quantization scheme 'ternary'; valid: qsgd"),
        ({"scheme": "qsgd"}, r"levels must be a positive integer, got None"),
        ({"scheme": "qsgd", "levels": 0}, r"levels must be a positive integer, got 0"),
        ({"scheme": "qsgd", "levels": 4, "bits": 2}, r"bits does not apply to scheme 'qsgd'"),
        ({"scheme": "uniform", "bits": 33}, r"bits must be at most 32, got 33"),
        ({"scheme": "sign", "levels": 2}, r"levels does not apply to scheme 'sign', got 2"),
    ],
)
def test_quantization_rejects_bad_hyperparameters(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationDefense(**options)


# --- Soteria ------------------------------------------------------------------------------


def soteria_scores_by_hand(model, images) -> list[float]:
    """s_i = Σ_b ‖∂r_{b,i}/∂x_b‖ / |r_{b,i}| for r = the input of the last Linear of a fcn."""
    features = model[:-1]
    scores = None
    for image in images:
        r = features(image.unsqueeze(0))[0].detach()
        jacobian = torch.autograd.functional.jacobian(lambda x: features(x.unsqueeze(0))[0], image)
        norms = jacobian.flatten(1).norm(dim=1)
        terms = [
            (float(n / abs(v)) if v != 0 else (math.inf if n > 0 else 0.0))
            for n, v in zip(norms, r, strict=True)
        ]
        scores = terms if scores is None else [a + b for a, b in zip(scores, terms, strict=True)]
    return scores


def test_soteria_prunes_the_columns_the_criterion_picks_and_nothing_else() -> None:
    model = victim("fcn", widths=(24,), activation_name="leaky_relu")
    images, labels = batch()
    update = fedsgd_update(model, images, labels)
    shared = share(SoteriaDefense(prune_fraction=0.25, layer="3"), model, images, labels)
    scores = soteria_scores_by_hand(model, images)
    expected = sorted(sorted(range(24), key=lambda i: (scores[i], i))[:6])
    assert shared.info["pruned_features"] == expected
    assert (shared.info["layer"], shared.info["features"], shared.info["pruned"]) == ("3", 24, 6)
    kept = [i for i in range(24) if i not in expected]
    assert (shared.update["3.weight"][:, expected] == 0).all()
    assert torch.equal(shared.update["3.weight"][:, kept], update["3.weight"][:, kept])
    assert (update["3.weight"][:, expected] != 0).any(dim=0).all()  # the pruning changed them
    for n in ("1.weight", "1.bias", "3.bias"):
        assert torch.equal(shared.update[n], update[n])


def test_soteria_defaults_to_the_last_linear_whose_input_is_the_representation() -> None:
    # LeNet: the conv body's output (12·2·2 features) feeds its only nn.Linear.
    shared = share(SoteriaDefense(prune_fraction=0.5), victim("lenet-zhu"), *batch())
    assert shared.info["layer"] == "7" and shared.info["pruned"] == 24
    assert int((shared.update["7.weight"] == 0).all(dim=0).sum()) == 24
    # An FCN: the representation is the last hidden layer, not the input.
    model = victim("fcn", widths=(24, 12))
    images, labels = batch()
    update = fedsgd_update(model, images, labels)
    shared = share(SoteriaDefense(prune_fraction=0.5), model, images, labels)
    assert (shared.info["layer"], shared.info["features"], shared.info["pruned"]) == ("5", 12, 6)
    for name in ("1.weight", "1.bias", "3.weight", "3.bias", "5.bias"):
        assert torch.equal(shared.update[name], update[name])  # untouched, as in the paper


def test_soteria_rejects_bad_hyperparameters_and_layers() -> None:
    with pytest.raises(ValueError, match=r"prune_fraction must be in \[0, 1\], got 1.5"):
        SoteriaDefense(prune_fraction=1.5)
    with pytest.raises(ValueError, match=r"layer must be a module name or None, got 3"):
        SoteriaDefense(layer=3)
    with pytest.raises(ValueError, match=r"layer '0' is not an nn.Linear of the model; valid: '7'"):
        share(SoteriaDefense(layer="0"), victim(), *batch())


# --- MixUp and InstaHide ------------------------------------------------------------------


def mixed_by_hand(info: dict, values: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            sum(c * values[s] for c, s in zip(cs, ss, strict=True))
            for cs, ss in zip(info["coefficients"], info["sources"], strict=True)
        ]
    )


@pytest.mark.parametrize("defense", [MixUpDefense(k=3, alpha=0.5), InstaHideDefense()])
def test_mixing_defenses_train_on_the_stated_combination(defense) -> None:
    model = victim()
    images, labels = batch(size=7)
    shared = share(defense, model, images, labels)
    info = shared.info
    coefficients = torch.tensor(info["coefficients"], dtype=torch.float64)
    assert coefficients.shape == (7, defense.k)
    assert torch.allclose(coefficients.sum(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-12)
    assert (coefficients > 0).all() and (coefficients <= defense.max_coefficient).all()
    sources = torch.tensor(info["sources"])
    assert torch.equal(sources[:, 0], torch.arange(7))  # each mix holds its own sample
    assert all(len(set(row)) == defense.k for row in info["sources"])  # and k − 1 others
    mixed = mixed_by_hand(info, images)
    if isinstance(defense, InstaHideDefense):
        masks = shared.images / mixed
        assert torch.equal(masks.abs().round(), torch.ones_like(masks))  # no zero pixels here
        assert torch.allclose(masks, masks.round(), rtol=0, atol=1e-12)
        assert 0.45 < info["flipped_fraction"] < 0.55
        mixed = mixed * masks.round()
    assert torch.allclose(shared.images, mixed, rtol=0, atol=1e-12)
    targets = mixed_by_hand(info, F.one_hot(labels, CLASSES).double())
    expected = fedsgd_update(model, shared.images, targets)
    assert all(torch.allclose(shared.update[n], g, rtol=0, atol=1e-12) for n, g in expected.items())
    dominant = sources[torch.arange(7), coefficients.argmax(dim=1)]
    assert torch.equal(shared.labels, labels[dominant])
    assert shared.labels.dtype == torch.int64 and shared.labels.shape == (7,)


def test_mixing_a_batch_smaller_than_k() -> None:
    model = victim()
    images, labels = batch(size=1)
    single = share(InstaHideDefense(k=4), model, images, labels)
    assert single.info["coefficients"] == [[1.0]] and single.info["max_coefficient_applied"] == 1
    assert torch.equal(single.images.abs(), images.abs())
    pair = share(MixUpDefense(k=4), model, *batch(size=2))
    assert pair.info["samples_per_mix"] == 2 and pair.info["sources"] == [[0, 1], [1, 0]]


def test_mixing_changes_batchnorm_statistics_only_through_the_client_protocol() -> None:
    def convnet():
        model = build_victim("convnet", (3, 32, 32), CLASSES, seed=0, dtype=torch.float64, width=2)
        return model.train()

    images, labels = batch(size=3, shape=(3, 32, 32))
    defended, reference = convnet(), convnet()
    shared = share(MixUpDefense(), defended, images, labels)
    targets = mixed_by_hand(shared.info, F.one_hot(labels, CLASSES).double())
    fedsgd_update(reference, shared.images, targets)  # one training forward, as the client's
    assert same(dict(defended.named_buffers()), dict(reference.named_buffers()))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 1}, r"k must be an integer >= 2 \(samples per mix\), got 1"),
        ({"alpha": 0}, r"alpha must be a number in \(0, 1e6\), got 0"),
        ({"k": 4, "max_coefficient": 0.25}, r"max_coefficient must be in \(1/k, 1\] = \(0.25, 1\]"),
    ],
)
@pytest.mark.parametrize("cls", [MixUpDefense, InstaHideDefense])
def test_mixing_defenses_reject_bad_hyperparameters(cls, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**options)


# --- top-k sparsification -----------------------------------------------------------------


def test_top_k_keeps_the_k_largest_magnitudes_of_the_whole_update() -> None:
    from leakbench.defenses.top_k import TopKDefense

    model = victim("fcn", widths=(24,))
    images, labels = batch()
    update = fedsgd_update(model, images, labels)
    flat = torch.cat([g.flatten() for g in update.values()])
    for defense, k in (
        (TopKDefense(k=37), 37),
        (TopKDefense(fraction=0.05), math.ceil(0.05 * flat.numel())),
    ):
        shared = share(defense, model, images, labels)
        kept = torch.cat([g.flatten() for g in shared.update.values()])
        assert int((kept != 0).sum()) == k
        threshold = flat.abs().sort(descending=True).values[k - 1]
        assert torch.equal(kept[kept != 0], flat[flat.abs() >= threshold])
    assert TopKDefense(k=3).adaptive_attacks() == {"mask-aware": {}}
    with pytest.raises(ValueError, match="give exactly one of k and fraction"):
        TopKDefense()
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        TopKDefense(fraction=0)


# --- PRECODE ------------------------------------------------------------------------------


def test_precode_inserts_a_variational_bottleneck_before_the_output_layer() -> None:
    from leakbench.models.precode import VariationalBottleneck

    model = victim("precode", base="fcn", base_options={"widths": (24,)}, latent=6)
    children = list(model.children())
    assert isinstance(children[-2], VariationalBottleneck) and children[-2].latent == 6
    assert (children[-2].encoder.in_features, children[-1].in_features) == (24, 24)
    images, _ = batch()
    with torch.no_grad():  # without the client's noise source the bottleneck passes μ
        first, again = model(images), model(images)
        hidden = torch.nn.Sequential(*children[:-2])(images)
        mean, _ = children[-2].statistics(hidden)
        expected = children[-1](children[-2].decoder(mean))
    assert torch.equal(first, again) and torch.allclose(first, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="nn.Sequential ending in its nn.Linear output layer"):
        build_victim("precode", SHAPE, CLASSES, seed=0, base="resnet18")


def test_precode_shares_the_gradient_of_cross_entropy_and_kl_under_secret_noise() -> None:
    from leakbench.defenses.precode import PrecodeDefense

    model = victim("precode", base="fcn", base_options={"widths": (24,)}, latent=6)
    images, labels = batch()
    defense = PrecodeDefense(beta=0.01)
    shared = share(defense, model, images, labels, seed=5)
    # By hand: the same draws from a generator of the same seed, in the same order.
    bottleneck = list(model.children())[-2]
    hidden = torch.nn.Sequential(*list(model.children())[:-2])(images)
    mean, log_variance = bottleneck.statistics(hidden)
    noise = torch.randn(mean.shape, generator=generator(5), dtype=mean.dtype)
    logits = list(model.children())[-1](
        bottleneck.decoder(mean + (0.5 * log_variance).exp() * noise)
    )
    kl = 0.5 * (mean**2 + log_variance.exp() - log_variance - 1).sum(-1).mean()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(
        F.cross_entropy(logits, labels) + 0.01 * kl, list(model.parameters())
    )
    for name, g in zip(names, grads, strict=True):
        assert torch.allclose(shared.update[name], g, rtol=0, atol=1e-12)
    assert shared.info["kl"] == pytest.approx(float(kl.detach()), rel=1e-12)
    assert bottleneck.noise_source is None  # the client's model is left as it was
    assert not same(shared.update, share(defense, model, images, labels, seed=6).update)
    with pytest.raises(ValueError, match="precode needs a victim with one variational bottleneck"):
        defense.check_model(victim("fcn"))
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -1"):
        PrecodeDefense(beta=-1)


def test_precode_leaves_the_first_layer_to_the_bias_attack_at_one_sample() -> None:
    from leakbench.attacks.bias import BiasAttack
    from leakbench.defenses.precode import PrecodeDefense
    from leakbench.threat_model import Budget, make_observation

    model = victim("precode", base="fcn", base_options={"widths": (24,)})
    images, labels = batch(size=1)
    shared = share(PrecodeDefense(), model, images, labels)
    observation = make_observation(
        model,
        shared.update,
        granted=frozenset(),
        labels=labels,
        input_shape=SHAPE,
        num_classes=CLASSES,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        budget=Budget(),
        seed=0,
    )
    answer = BiasAttack().reconstruct(observation)
    assert torch.allclose(answer.images, images, rtol=0, atol=1e-10)
