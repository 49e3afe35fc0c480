"""R-GAP (``rgap``) and the SSRAS system (``improved-rgap``): exact recovery, the last-layer
roots and labels, refusals, and the route taken per model."""

from __future__ import annotations

import math

import pytest
import scipy.special
import torch
from torch import nn

from leakbench.attacks.improved_rgap import ImprovedRGAP, ssras_route
from leakbench.attacks.rgap import RGAP, U_STAR, logistic_roots
from leakbench.client import build_victim, fedsgd_update
from leakbench.interfaces import TrialFailure, UnsupportedModelError
from leakbench.protocol.attack import prepare_attack
from leakbench.registry import ATTACKS
from leakbench.threat_model import Budget, Capability, Observation, make_observation

LFW_SHAPE = (1, 25, 25)


def observe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    granted: frozenset[Capability] = frozenset(),
) -> Observation:
    channels = images.shape[1]
    return make_observation(
        model,
        fedsgd_update(model, images, labels),
        granted=granted,
        labels=labels,
        input_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        budget=Budget(),
        seed=0,
    )


def case(
    name: str,
    shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    batch: int = 1,
    **options: object,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 victim at random init and uniform [0, 1] samples with random labels."""
    model = build_victim(name, shape, num_classes, seed=seed, dtype=torch.float64, **options)
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(batch, *shape, generator=g, dtype=torch.float64)
    labels = torch.randint(num_classes, (batch,), generator=g)
    return model, images, labels


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def test_registered() -> None:
    assert ATTACKS.get("rgap") is RGAP
    assert ATTACKS.get("improved-rgap") is ImprovedRGAP


def test_cnn6_is_recovered_exactly_and_every_layer_has_full_rank() -> None:
    model, x, y = case("cnn6", (3, 32, 32), 10)
    result = RGAP().reconstruct(observe(model, x, y, 10))
    assert mse(result.images, x) < 1e-10
    assert result.labels.tolist() == y.tolist()
    assert result.info["last_layer"] == "rank-one SVD"
    assert result.info["update_distance"] < 1e-8
    ranks = [(layer["rank"], layer["unknowns"]) for layer in result.info["layers"]]
    assert ranks == [(3136, 3136), (4356, 4356), (4356, 4356), (4356, 4356), (4332, 4332),
                     (3888, 3888)]  # fmt: skip


def test_cnn6_d_second_layer_is_rank_deficient_and_its_error_is_clearly_non_zero() -> None:
    model, x, y = case("cnn6-d", (3, 32, 32), 10)
    result = RGAP().reconstruct(observe(model, x, y, 10))
    layer2 = next(layer for layer in result.info["layers"] if layer["layer"] == "2")
    assert (layer2["rank"], layer2["unknowns"]) == (4052, 4332)
    assert layer2["solver"] == "normal-equations, null space removed"
    assert layer2["relative_residual"] < 1e-10  # the system is consistent, just not unique
    assert mse(result.images, x) > 1e-3


@pytest.mark.parametrize("num_classes", [2, 10])
def test_fcn3_is_recovered_exactly_with_the_inferred_label(num_classes: int) -> None:
    model, x, y = case("fcn3", LFW_SHAPE, num_classes, seed=3)
    result = RGAP().reconstruct(observe(model, x, y, num_classes))
    assert mse(result.images, x) < 1e-20
    assert result.labels.tolist() == y.tolist()
    expected = "logistic" if num_classes == 2 else "rank-one SVD"
    assert result.info["last_layer"] == expected


def test_lenet_zhu_with_biases_and_sigmoids_is_recovered_exactly() -> None:
    model, x, y = case("lenet-zhu", LFW_SHAPE, 2)
    result = RGAP().reconstruct(observe(model, x, y, 2))
    assert result.info["last_layer"] == "bias ratio"
    assert mse(result.images, x) < 1e-20
    assert result.labels.tolist() == y.tolist()


@pytest.mark.parametrize("u", [-6.0, -0.3, 0.0, 1e-4, 0.7, U_STAR, 3.0, 25.0])
def test_logistic_roots_solve_the_scalar_equation(u: float) -> None:
    c = -u * scipy.special.expit(-u)
    roots, exact = logistic_roots(c)
    assert exact
    assert min(abs(r - u) for r in roots) <= 1e-9 * max(1.0, abs(u))
    assert len(roots) == (2 if 0 < u and not math.isclose(u, U_STAR) else 1)
    assert roots == sorted(roots)
    for r in roots:
        assert math.isclose(-r * scipy.special.expit(-r), c, rel_tol=1e-12, abs_tol=1e-300)


def test_logistic_roots_below_the_minimum_take_its_argmin() -> None:
    assert logistic_roots(-0.3) == ([U_STAR], False)


def confident_fcn3() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """FCN3 with a scaled output layer so that the sample's logit margin exceeds u*."""
    model, x, y = case("fcn3", LFW_SHAPE, 2, seed=5)
    with torch.no_grad():
        margin = model(x)[0, 1] - model(x)[0, 0]
        model[-1].weight.mul_(8.0 / abs(float(margin)))
        y = (model(x)[0].argmax()).reshape(1)  # classified correctly and confidently
    return model, x, y


def test_the_larger_root_case_and_the_scale_equivalence_of_the_two_roots() -> None:
    model, x, y = confident_fcn3()
    observation = observe(model, x, y, 2)
    auto = RGAP().reconstruct(observation)
    assert auto.info["scale_ambiguity"] and auto.info["root"] == 2
    assert mse(auto.images, x) < 1e-20
    # R-GAP's own choice (the root nearest 0) is the same picture with its scale divided by
    # u_2/u_1: on a positively homogeneous network both reproduce the update exactly.
    smaller = RGAP(root="smaller").reconstruct(observation)
    roots = [c["u"] for c in auto.info["candidates"] if c["label"] == int(y)]
    assert len(roots) == 2
    assert torch.allclose(smaller.images * (roots[1] / roots[0]), x, rtol=1e-9, atol=1e-12)
    assert smaller.info["update_distance"] < 1e-12
    larger = RGAP(root="larger").reconstruct(observation)
    assert mse(larger.images, x) < 1e-20


def test_the_label_can_be_taken_from_the_run_when_granted() -> None:
    model, x, y = case("fcn3", LFW_SHAPE, 2, seed=3)
    attack = RGAP(label="known")
    assert Capability.LABELS in attack.requires
    granted = observe(model, x, y, 2, granted=frozenset({Capability.LABELS}))
    result = attack.reconstruct(granted)
    assert result.info["label_given"] and mse(result.images, x) < 1e-20
    with pytest.raises(TrialFailure, match="labels capability"):
        attack.reconstruct(observe(model, x, y, 2))


def test_same_observation_gives_the_same_reconstruction() -> None:
    model, x, y = case("cnn6", LFW_SHAPE, 2, seed=2)
    observation = observe(model, x, y, 2)
    first, second = RGAP().reconstruct(observation), RGAP().reconstruct(observation)
    assert torch.equal(first.images, second.images)
    assert first.info == second.info


def test_batches_are_refused_unless_the_combination_is_asked_for() -> None:
    model, x, y = case("fcn3", (1, 10, 10), 4, batch=3)
    observation = observe(model, x, y, 4, granted=frozenset({Capability.BATCH_SIZE}))
    with pytest.raises(TrialFailure, match="one sample; this batch has 3"):
        RGAP().reconstruct(observation)
    result = RGAP(allow_combination=True).reconstruct(observation)
    assert result.info["combination"] is True and result.labels is None
    assert result.images.shape == (1, 1, 10, 10)
    # R-GAP's combination: the first layer's input solve is a linear combination of the batch.
    basis = x.reshape(3, -1).T
    coefficients = torch.linalg.lstsq(basis, result.images.reshape(-1, 1)).solution
    residual = basis @ coefficients - result.images.reshape(-1, 1)
    assert float(residual.norm() / result.images.norm()) < 1e-10
    conv, cx, cy = case("cnn6", (1, 12, 12), 4, batch=2)
    conv_observation = observe(conv, cx, cy, 4, granted=frozenset({Capability.BATCH_SIZE}))
    with pytest.raises(TrialFailure, match="FC networks only"):
        RGAP(allow_combination=True).reconstruct(conv_observation)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("fcn-exan", r"layer '2' \(ReLU\): ReLU is not invertible without a known activation"),
        ("convnet", r"layer '1' \(BatchNorm2d\)"),
        ("resnet18", r"nn.Sequential network, not ResNet; its layer 'bn1' \(BatchNorm2d\)"),
    ],
)
def test_models_the_recursion_cannot_invert_are_refused_up_front(name: str, match: str) -> None:
    model = build_victim(name, (3, 32, 32), 10, seed=0)
    with pytest.raises(UnsupportedModelError, match=match):
        RGAP().check_model(model)


def test_other_refusals_name_the_layer() -> None:
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(UnsupportedModelError, match=r"'1' \(MaxPool2d\): max-pooling"):
        RGAP().check_model(pooled)
    dead = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.LeakyReLU(0.0), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModelError, match=r"'2' \(LeakyReLU\).*not positive"):
        RGAP().check_model(dead)
    single = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
    with pytest.raises(UnsupportedModelError, match="at least two logits"):
        RGAP().check_model(single)
    with pytest.raises(ValueError, match="root must be one of"):
        RGAP(root="middle")


@pytest.mark.parametrize(
    ("name", "num_classes", "route"),
    [
        ("fcn-exan", 2, "bias"),  # first trainable layer FC with a bias
        ("lenet-zhu", 2, "idlg+rgap"),  # output bias: iDLG's rule is exact
        ("cnn6", 10, "idlg+rgap"),  # no bias, but K > 2: the sign pattern names the label
        ("cnn6", 2, "dlg+rgap"),  # K = 2, no bias, LeakyReLU features of either sign
        ("fcn3", 2, "dlg+rgap"),
    ],
)
def test_ssras_route_matches_the_model(name: str, num_classes: int, route: str) -> None:
    shape = (1, 12, 12)
    model, x, y = case(name, shape, num_classes, seed=1)
    assert ssras_route(model) == route
    result = ImprovedRGAP(dlg_iterations=5).reconstruct(observe(model, x, y, num_classes))
    assert result.info["route"] == route
    if route == "dlg+rgap":
        assert result.info["label_source"] == "DLG" and result.info["dlg"]["steps"] <= 5
        assert result.info["label_given"] and result.labels is not None
        if int(result.labels[0]) == int(y[0]):  # with DLG's label right, R-GAP is exact
            assert mse(result.images, x) < 1e-20
        else:  # a wrong label from DLG shows: the reconstruction cannot reproduce the update
            assert result.info["update_distance"] > 0.1
    else:
        assert mse(result.images, x) < 1e-20
        assert result.labels.tolist() == y.tolist()


def test_ssras_refuses_batches_and_models_without_a_route() -> None:
    model, x, y = case("cnn6", (1, 12, 12), 10, batch=2)
    observation = observe(model, x, y, 10, granted=frozenset({Capability.BATCH_SIZE}))
    with pytest.raises(TrialFailure, match="single samples; this batch has 2"):
        ImprovedRGAP().reconstruct(observation)
    relu_conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(200, 3))
    with pytest.raises(UnsupportedModelError, match=r"Improved R-GAP cannot invert layer '1'"):
        ImprovedRGAP().check_model(relu_conv)


def test_single_sample_limit_is_declared_so_runs_skip_larger_batches():
    assert ATTACKS.get("rgap")().max_batch_size == 1
    assert ATTACKS.get("rgap")(allow_combination=True).max_batch_size is None
    assert ATTACKS.get("improved-rgap")().max_batch_size == 1
    # What a run skips by: the limit the prepared hyperparameters set, and the listed one.
    none = frozenset()
    assert prepare_attack("rgap", {}, none).max_batch_size == 1
    assert prepare_attack("rgap", {"allow_combination": True}, none).max_batch_size is None
    assert ATTACKS.get("rgap").max_batch_size == 1  # `leakbench list` reads the class
