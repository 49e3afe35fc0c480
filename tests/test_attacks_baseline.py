"""The baseline attacks: bias (Phong), DLG, iDLG and Inverting Gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from leakbench.attacks._gradient_matching import dummy_gradients
from leakbench.attacks.bias import BiasAttack
from leakbench.attacks.dlg import DLG
from leakbench.attacks.idlg import IDLG, idlg_label
from leakbench.attacks.inverting_gradients import (
    InvertingGradients,
    bias_gradient_labels,
    cosine_gradient_distance,
)
from leakbench.client import build_victim, fedsgd_update
from leakbench.interfaces import TrialFailure, UnsupportedModelError
from leakbench.registry import ATTACKS, DATAMODULES
from leakbench.threat_model import Budget, Capability, Observation, make_observation

BATCH_SIZE = frozenset({Capability.BATCH_SIZE})
LFW_SHAPE = (1, 25, 25)


def observe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    granted: frozenset[Capability] = BATCH_SIZE,
    num_classes: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    budget: Budget | None = None,
    seed: int = 0,
) -> Observation:
    channels = images.shape[1]
    return make_observation(
        model,
        fedsgd_update(model, images, labels),
        granted=granted,
        labels=labels,
        input_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        mean=mean or (0.0,) * channels,
        std=std or (1.0,) * channels,
        budget=budget or Budget(),
        seed=seed,
    )


def lfw_samples(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` test samples of lfw-subset alternating between the two classes."""
    test = DATAMODULES.get("lfw-subset")(split="test").samples("test")
    faces = [i for i in range(len(test)) if test[i][1] == 1][: count // 2]
    others = [i for i in range(len(test)) if test[i][1] == 0][: count - len(faces)]
    items = [test[i] for i in faces + others]
    return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items])


def uniform_batch(shape: tuple[int, ...], count: int, num_classes: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, *shape, generator=g), torch.randint(num_classes, (count,), generator=g)


def test_registered_names() -> None:
    assert {"bias", "dlg", "idlg", "inverting-gradients"} <= set(ATTACKS.names())
    assert ATTACKS.get("idlg").max_batch_size == 1


# --- bias ---------------------------------------------------------------------------------


def test_bias_attack_recovers_a_single_sample_exactly() -> None:
    images, labels = lfw_samples(2)
    model = build_victim("fcn", LFW_SHAPE, 2, seed=0, dtype=torch.float64, widths=(64,))
    for i in range(2):
        x = images[i : i + 1].double()
        observation = observe(model, x, labels[i : i + 1], granted=frozenset(), num_classes=2)
        result = BiasAttack().reconstruct(observation)
        assert result.images.shape == (1, *LFW_SHAPE)
        assert result.images.dtype == torch.float64
        assert ((result.images - x) ** 2).mean().item() < 1e-20
        assert result.batch_size is None and result.labels is None


@pytest.mark.parametrize("relative_threshold", [0.0, 0.3])
def test_bias_attack_on_a_batch_returns_the_documented_mixture(relative_threshold: float) -> None:
    model = build_victim("fcn", (3, 6, 6), 10, seed=2, dtype=torch.float64, widths=(40,))
    x, y = uniform_batch((3, 6, 6), 4, 10)
    x = x.double()
    observation = observe(model, x, y, granted=frozenset(), num_classes=10)
    result = BiasAttack(relative_threshold=relative_threshold).reconstruct(observation)

    # c_m = (g_m · ∇b) / (B ‖∇b‖²) over the rows S kept by the threshold, g_m = sample m's own
    # bias gradient; the expected image is Σ_m c_m x_m.
    per_sample = torch.stack(
        [fedsgd_update(model, x[m : m + 1], y[m : m + 1])["1.bias"] for m in range(4)]
    )
    mean_bias = per_sample.mean(dim=0)
    rows = mean_bias.abs() >= relative_threshold * mean_bias.abs().max()
    assert 0 < rows.sum() <= rows.numel()
    weights = per_sample[:, rows] @ mean_bias[rows] / (4 * mean_bias[rows] @ mean_bias[rows])
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    expected = (weights.view(4, 1, 1, 1) * x).sum(dim=0, keepdim=True)
    assert (result.images - expected).abs().max().item() < 1e-10
    assert result.info["rows_used"] == int(rows.sum())


def test_bias_attack_refuses_models_without_a_first_linear_bias() -> None:
    attack = BiasAttack()
    no_bias = build_victim("fcn", (1, 4, 4), 2, seed=0, bias=False)
    with pytest.raises(UnsupportedModelError, match=r"layer '1' .*has no bias"):
        attack.check_model(no_bias)
    lenet = build_victim("lenet-zhu", (1, 8, 8), 2, seed=0)
    with pytest.raises(UnsupportedModelError, match=r"layer '0' is Conv2d"):
        attack.check_model(lenet)
    attack.check_model(build_victim("fcn", (1, 4, 4), 2, seed=0))


def test_bias_attack_fails_on_a_zero_bias_gradient() -> None:
    model = build_victim("fcn", (1, 4, 4), 2, seed=0, dtype=torch.float64)
    observation = observe(model, torch.rand(1, 1, 4, 4).double(), torch.tensor([1]), num_classes=2)
    zeroed = {name: torch.zeros_like(g) for name, g in observation.update.items()}
    with pytest.raises(TrialFailure, match="bias gradient of '1' is zero"):
        BiasAttack().reconstruct(dataclasses.replace(observation, update=zeroed))


def test_bias_attack_validates_its_threshold() -> None:
    with pytest.raises(ValueError, match=r"relative_threshold must be in \[0, 1\]"):
        BiasAttack(relative_threshold=1.5)


# --- iDLG label rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("fcn", {"widths": (64,)}), ("lenet-zhu", {}), ("fcn", {"widths": (64,), "bias": False})],
)
def test_idlg_label_on_lfw_subset_is_always_right(name: str, options: dict) -> None:
    images, labels = lfw_samples(20)
    assert set(labels.tolist()) == {0, 1}
    model = build_victim(name, LFW_SHAPE, 2, seed=0, **options)
    for i in range(20):
        observation = observe(model, images[i : i + 1], labels[i : i + 1], num_classes=2)
        assert idlg_label(observation) == labels[i].item()


def test_idlg_label_on_ten_classes_is_always_right() -> None:
    x, y = uniform_batch((3, 16, 16), 20, 10)
    model = build_victim("lenet-zhu", (3, 16, 16), 10, seed=0)
    for i in range(20):
        assert idlg_label(observe(model, x[i : i + 1], y[i : i + 1], num_classes=10)) == y[i]


def test_idlg_label_without_bias_handles_features_that_sum_negative() -> None:
    # Identity activations make the output layer's input sum negative for about half the
    # samples, which flips the sign of every weight-gradient row sum; with 10 classes the rule
    # still finds the label (the single positive row).
    model = build_victim(
        "fcn", (1, 6, 6), 10, seed=0, dtype=torch.float64, bias=False, activation_name="identity"
    )
    x, y = uniform_batch((1, 6, 6), 20, 10)
    x = (x.double() - 0.5) * 4
    feature_sums = model[:-1](x).sum(dim=1)
    assert (feature_sums < 0).any() and (feature_sums > 0).any()
    for i in range(20):
        assert idlg_label(observe(model, x[i : i + 1], y[i : i + 1], num_classes=10)) == y[i]


def test_idlg_label_refuses_batches_and_models_without_an_output_linear() -> None:
    model = build_victim("fcn", (1, 4, 4), 3, seed=0)
    x, y = uniform_batch((1, 4, 4), 2, 3)
    with pytest.raises(TrialFailure, match="iDLG's label rule is for single samples"):
        idlg_label(observe(model, x, y, num_classes=3))
    conv_only = nn.Sequential(nn.Conv2d(1, 3, 4), nn.Flatten())
    with pytest.raises(TrialFailure, match="no nn.Linear output layer"):
        idlg_label(observe(conv_only, x[:1], y[:1], num_classes=3))


# --- DLG and iDLG -------------------------------------------------------------------------


def small_lenet_case(num_classes: int = 4, batch: int = 1):
    model = build_victim("lenet-zhu", (1, 8, 8), num_classes, seed=0)
    x, y = uniform_batch((1, 8, 8), batch, num_classes)
    return model, x, y


def test_dlg_decreases_the_loss_and_is_deterministic() -> None:
    model, x, y = small_lenet_case()
    attack = DLG(iterations=8, line_search="strong_wolfe")
    first = attack.reconstruct(observe(model, x, y, num_classes=4, seed=3))
    second = attack.reconstruct(observe(model, x, y, num_classes=4, seed=3))
    other_seed = attack.reconstruct(observe(model, x, y, num_classes=4, seed=4))
    assert first.info["final_loss"] < 1e-3 * first.info["initial_loss"]
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert not torch.equal(first.images, other_seed.images)
    assert first.images.shape == x.shape and first.labels.shape == (1,)
    assert first.labels.item() == y.item()
    assert ((first.images - x) ** 2).mean().item() < 1e-4
    assert all(p.grad is None for p in model.parameters())


def test_dlg_draws_its_steps_from_the_budget() -> None:
    model, x, y = small_lenet_case()
    observation = observe(model, x, y, num_classes=4, budget=Budget(max_iterations=5))
    result = DLG(iterations=300).reconstruct(observation)
    assert observation.budget.used_iterations <= 5
    assert result.info["steps"] == observation.budget.used_iterations


def test_dlg_turns_a_non_finite_loss_into_a_trial_failure() -> None:
    model, x, y = small_lenet_case()
    observation = observe(model, x, y, num_classes=4)
    first = next(iter(observation.update))
    observation.update[first][0] = math.nan  # type: ignore[index]
    with pytest.raises(TrialFailure, match="loss became nan"):
        DLG(iterations=3).reconstruct(observation)


def test_dlg_needs_the_batch_size() -> None:
    model, x, y = small_lenet_case()
    with pytest.raises(ValueError, match="batch size"):
        DLG().reconstruct(observe(model, x, y, granted=frozenset(), num_classes=4))
    with pytest.raises(ValueError, match="line_search must be one of"):
        DLG(line_search="armijo")


def test_idlg_fixes_the_inferred_label_and_refuses_batches() -> None:
    model, x, y = small_lenet_case()
    result = IDLG(iterations=5).reconstruct(observe(model, x, y, num_classes=4))
    assert result.labels.tolist() == y.tolist()
    assert result.info["final_loss"] < 1e-3 * result.info["initial_loss"]
    model, x, y = small_lenet_case(batch=2)
    with pytest.raises(TrialFailure, match="iDLG's label rule is for single samples"):
        IDLG(iterations=5).reconstruct(observe(model, x, y, num_classes=4))


# --- Inverting Gradients ------------------------------------------------------------------

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def ig_case(batch: int = 2, bias: bool = True):
    model = build_victim("fcn", (3, 4, 4), 6, seed=0, widths=(32,), bias=bias)
    pixels, labels = uniform_batch((3, 4, 4), batch, 6)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return model, (pixels - mean) / std, labels


def test_inverting_gradients_picks_the_restart_with_the_smallest_matching_loss() -> None:
    model, x, y = ig_case()
    chosen_indices = []
    for seed in range(4):
        observation = observe(model, x, y, num_classes=6, mean=MEAN, std=STD, seed=seed)
        result = InvertingGradients(iterations=6, restarts=4).reconstruct(observation)
        losses = result.info["restart_losses"]
        chosen = result.info["chosen_restart"]
        assert len(set(losses)) == 4
        assert chosen == min(range(4), key=losses.__getitem__)
        # the returned images are the chosen restart's: their loss is the reported minimum ...
        with torch.enable_grad():
            loss = cosine_gradient_distance(
                dummy_gradients(observation, result.images, result.labels),
                observation.gradients(),
            ).item()
        assert loss == losses[chosen]
        # ... and a single restart (the same first draw) gives them exactly when restart 0 wins
        single = InvertingGradients(iterations=6, restarts=1).reconstruct(
            observe(model, x, y, num_classes=6, mean=MEAN, std=STD, seed=seed)
        )
        assert single.info["restart_losses"] == losses[:1]
        assert torch.equal(single.images, result.images) == (chosen == 0)
        chosen_indices.append(chosen)
    assert any(chosen != 0 for chosen in chosen_indices)


def test_inverting_gradients_respects_the_box_and_is_deterministic() -> None:
    model, x, y = ig_case()
    attack = InvertingGradients(iterations=30, restarts=2)
    first = attack.reconstruct(observe(model, x, y, num_classes=6, mean=MEAN, std=STD))
    second = attack.reconstruct(observe(model, x, y, num_classes=6, mean=MEAN, std=STD))
    assert torch.equal(first.images, second.images)
    low = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    assert (first.images >= low).all() and (first.images <= high).all()
    assert (first.images == low).any() and (first.images == high).any()  # the box is active
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("batch_restarts", [True, False])
def test_inverting_gradients_shares_an_iteration_budget_between_restarts(batch_restarts) -> None:
    model, x, y = ig_case()
    attack = InvertingGradients(iterations=100, restarts=3, batch_restarts=batch_restarts)
    observation = observe(model, x, y, num_classes=6, budget=Budget(max_iterations=10))
    result = attack.reconstruct(observation)
    assert result.info["restart_iterations"] == [3, 3, 3]  # equal shares
    assert result.info["restarts_batched"] == batch_restarts
    assert observation.budget.used_iterations == 9
    # Fewer iterations than restarts: as many restarts as iterations, one each.
    observation = observe(model, x, y, num_classes=6, budget=Budget(max_iterations=2))
    result = attack.reconstruct(observation)
    assert result.info["restart_iterations"] == [1, 1]
    assert observation.budget.used_iterations == 2


@pytest.mark.parametrize(
    ("name", "shape", "classes", "options"),
    [
        ("fcn", (3, 4, 4), 6, {"widths": (32,)}),
        ("lenet-zhu", LFW_SHAPE, 2, {}),
        pytest.param("cnn6", LFW_SHAPE, 2, {}, marks=pytest.mark.slow),
    ],
)
def test_restarts_give_the_same_results_batched_and_one_after_the_other(
    name, shape, classes, options
) -> None:
    """Same seed, same restarts: the vectorised pass and the loop agree bit for bit (Adam on
    the gradient's sign: the rounding of batched kernels changes no sign here)."""
    model = build_victim(name, shape, classes, seed=0, dtype=torch.float64, **options)
    pixels, labels = uniform_batch(shape, 2, classes)
    x = ((pixels - 0.5) / 0.25).to(torch.float64)
    results = [
        InvertingGradients(iterations=25, restarts=3, batch_restarts=batched).reconstruct(
            observe(
                model,
                x,
                labels,
                granted=BATCH_SIZE | {Capability.LABELS},
                num_classes=classes,
                mean=(0.5,) * shape[0],
                std=(0.25,) * shape[0],
                seed=7,
            )
        )
        for batched in (True, False)
    ]
    batched, looped = results
    assert batched.info["restarts_batched"] and not looped.info["restarts_batched"]
    assert batched.info["restart_losses"] == looped.info["restart_losses"]
    assert batched.info["chosen_restart"] == looped.info["chosen_restart"]
    assert torch.equal(batched.images, looped.images)


def test_inverting_gradients_label_sources() -> None:
    model, x, y = ig_case(batch=1)
    result = InvertingGradients(iterations=2).reconstruct(observe(model, x, y, num_classes=6))
    assert result.info["label_source"] == "idlg" and result.labels.tolist() == y.tolist()

    model, x, _ = ig_case(batch=4)
    y = torch.tensor([3, 3, 5, 0])
    granted = observe(model, x, y, num_classes=6, granted=BATCH_SIZE | {Capability.LABELS})
    result = InvertingGradients(iterations=2).reconstruct(granted)
    assert result.info["label_source"] == "granted" and result.labels.tolist() == y.tolist()

    observation = observe(model, x, y, num_classes=6)
    result = InvertingGradients(iterations=2).reconstruct(observation)
    assert result.info["label_source"] == "bias-gradient"
    # the classes present, most negative first; the doubled class 3 is the most negative
    assert result.labels.tolist() == bias_gradient_labels(observation, 4).tolist()
    assert result.labels.tolist()[0] == 3 and sorted(result.labels.tolist()) == [0, 3, 3, 5]

    model, x, y = ig_case(batch=2, bias=False)
    with pytest.raises(TrialFailure, match="needs a bias on the output layer"):
        InvertingGradients(iterations=2).reconstruct(observe(model, x, y, num_classes=6))
