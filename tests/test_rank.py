"""The conv-layer system of R-GAP (against its literal form) and the rank analysis / RA-I."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leakbench.analysis import conv_system
from leakbench.analysis.conv_system import ConvGeometry, ConvSystem, constraint_blocks, svd_rank
from leakbench.analysis.rank import (
    analyse,
    cached_analysis,
    layer_operator,
    network_stages,
    rank_index,
)
from leakbench.cli import main
from leakbench.client import build_victim
from leakbench.interfaces import UnsupportedModelError
from leakbench.registry import COVARIATES


def conv_case(
    c_in: int, c_out: int, hw: int, kernel: int, stride: int, padding: int, seed: int = 0
) -> tuple[nn.Conv2d, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """A conv layer, an input, and the exact k = ∂ℓ/∂out, ∇w and out of a random loss."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=True).double()
    x = torch.randn(1, c_in, hw, hw, dtype=torch.float64)
    out = conv(x)
    k = torch.randn_like(out)
    (grad_weight,) = torch.autograd.grad((out * k).sum(), [conv.weight])
    return conv, x[0], k[0].numpy(), grad_weight.numpy(), out[0].detach().numpy()


def literal_system(conv: nn.Conv2d, geom: ConvGeometry, k: np.ndarray) -> np.ndarray:
    blocks = constraint_blocks(geom, conv.weight.detach().numpy(), k)
    return np.vstack([b.toarray() for b in blocks])


@pytest.mark.parametrize(
    "shape", [(2, 6, 7, 3, 2, 1), (1, 4, 9, 4, 2, 2), (3, 2, 6, 3, 1, 1), (2, 5, 8, 3, 1, 0)]
)
def test_literal_blocks_match_autograd_and_the_solver_recovers_the_input(shape) -> None:
    conv, x, k, grad_weight, out = conv_case(*shape)
    geom = ConvGeometry.of(conv, x.shape[-2:])
    x_pad = F.pad(x, [geom.padding[1]] * 2 + [geom.padding[0]] * 2).numpy().ravel()
    gradient, weight, padding = constraint_blocks(geom, conv.weight.detach().numpy(), k)
    assert gradient.shape[0] == geom.gradient_rows and padding.shape[0] == geom.padding_rows
    np.testing.assert_allclose(gradient @ x_pad, grad_weight.ravel(), rtol=1e-12, atol=1e-12)
    bias = conv.bias.detach().numpy()
    np.testing.assert_allclose(weight @ x_pad + np.repeat(bias, out[0].size), out.ravel(),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    assert np.all(padding @ x_pad == 0)
    system = ConvSystem(geom, conv.weight.detach().numpy(), k)
    solution = system.solve(grad_weight, out, bias)
    np.testing.assert_allclose(solution.x, x.numpy(), rtol=1e-10, atol=1e-10)
    assert solution.relative_residual < 1e-12
    assert system.rank() == np.linalg.matrix_rank(literal_system(conv, geom, k))
    assert system.rank() == geom.unknowns_padded  # these layers are full rank


def test_a_rank_deficient_layer_gets_the_minimum_norm_solution_on_every_path(monkeypatch) -> None:
    conv, x, k, grad_weight, out = conv_case(3, 1, 8, 3, 2, 1)
    geom = ConvGeometry.of(conv, x.shape[-2:])
    weight, bias = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    literal = literal_system(conv, geom, k)
    rhs = np.concatenate([grad_weight.ravel(), (out - bias[:, None, None]).ravel(),
                          np.zeros(geom.padding_rows)])  # fmt: skip
    expected = np.linalg.lstsq(literal, rhs, rcond=None)[0].reshape(3, 10, 10)[:, 1:-1, 1:-1]
    system = ConvSystem(geom, weight, k)
    assert system.rank() == np.linalg.matrix_rank(literal) < geom.unknowns_padded
    solution = system.solve(grad_weight, out, bias)
    assert solution.method == "normal-equations, null space removed"
    assert solution.rank == system.rank()
    np.testing.assert_allclose(solution.x, expected, rtol=1e-9, atol=1e-10)
    monkeypatch.setattr(conv_system, "_MIN_GRAM_RCOND", np.inf)  # force the SVD solver
    fallback = system.solve(grad_weight, out, bias)
    assert fallback.method == "lstsq" and fallback.rank == solution.rank
    np.testing.assert_allclose(fallback.x, expected, rtol=1e-9, atol=1e-10)


def test_a_row_mask_keeps_only_the_selected_weight_constraints() -> None:
    conv, x, k, grad_weight, out = conv_case(2, 6, 7, 3, 2, 1)
    geom = ConvGeometry.of(conv, x.shape[-2:])
    mask = out > 0  # e.g. the active units of a ReLU layer
    system = ConvSystem(geom, conv.weight.detach().numpy(), k, mask)
    assert system.weight_rows == int(mask.sum())
    solution = system.solve(grad_weight, np.where(mask, out, np.nan), conv.bias.detach().numpy())
    np.testing.assert_allclose(solution.x, x.numpy(), rtol=1e-10, atol=1e-10)


def layer_counts(name: str) -> list[tuple[int, ...]]:
    model = build_victim(name, (3, 32, 32), 10, seed=0, dtype=torch.float64)
    rows = analyse(model, (3, 32, 32), virtual=False).layers
    return [
        (r.unknowns_padded, r.unknowns, r.gradient_rows, r.weight_rows, r.padding_rows, r.rank)
        for r in rows
    ]


# Slow: the ranks of the paper's 3x32x32 systems (thousands of unknowns); the literal-block,
# fcn3 and RA-I tests check the same analysis on small networks in the fast suite.
@pytest.mark.slow
def test_cnn6_has_full_rank_in_every_layer() -> None:
    # Per layer: unknowns incl. padding (without), #grad, #weight, #pad, rank(A).
    assert layer_counts("cnn6") == [
        (3888, 3072, 576, 3468, 816, 3888),
        (4332, 3468, 3888, 2916, 864, 4332),
        (4356, 2916, 11664, 2916, 1440, 4356),
        (4356, 2916, 11664, 2916, 1440, 4356),
        (4356, 2916, 20736, 1600, 1440, 4356),
        (3136, 1600, 73728, 3200, 1536, 3136),
        (3200, 3200, 32000, 10, 0, 3200),
    ]


# Slow: the ranks of the paper's 3x32x32 systems (thousands of unknowns); the literal-block,
# fcn3 and RA-I tests check the same analysis on small networks in the fast suite.
@pytest.mark.slow
def test_cnn6_d_second_layer_is_280_short_and_conv1_gives_396_virtual_constraints() -> None:
    counts = layer_counts("cnn6-d")
    assert counts[1] == (4332, 3468, 2160, 1620, 864, 4052)  # deficit 280
    assert counts[2] == (2420, 1620, 6480, 2916, 800, 2420)
    assert all(c[0] == c[-1] for i, c in enumerate(counts) if i != 1)
    model = build_victim("cnn6-d", (3, 32, 32), 10, seed=0, dtype=torch.float64)
    first = network_stages(model, (3, 32, 32), "test")[0]
    assert 3468 - svd_rank(layer_operator(first))[0] == 396


def test_virtual_constraints_and_ra_index_on_fcn3() -> None:
    model = build_victim("fcn3", (1, 25, 25), 2, seed=0)
    analysis = analyse(model, (1, 25, 25))
    assert [(r.unknowns, r.rank, r.deficit) for r in analysis.layers] == [
        (625, 625, 0),
        (1000, 1000, 0),
        (100, 100, 0),
    ]
    assert [r.virtual for r in analysis.layers] == [None, 1000 - 625, 100 - 100]
    assert [r.ra for r in analysis.layers] == [0, -375, 0]
    assert analysis.ra_index == 0 and analysis.rank_deficit == 0


def test_ra_index_counts_what_the_virtual_constraints_leave_open() -> None:
    # Conv 1→1 (k3, s2, p1) on 8×8 has 9 gradient and 16 weight rows for 64 interior unknowns,
    # so it is deficient; the input layer has no virtual constraints (RA_1 = deficit), and the
    # next layer's 16 inputs come from a rank-16 operator (V_2 = 0).
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(16, 3, bias=False),
    ).double()
    analysis = analyse(model, (1, 8, 8))
    first, last = analysis.layers
    assert (first.unknowns_padded, first.gradient_rows, first.weight_rows) == (100, 9, 16)
    assert first.deficit == 100 - first.rank > 0 and first.ra == first.deficit
    assert last.virtual == 0
    assert analysis.ra_index == first.deficit == analysis.rank_deficit


def test_relu_layers_keep_the_weight_rows_of_active_units_only() -> None:
    model = build_victim("fcn-exan", (1, 25, 25), 2, seed=0, dtype=torch.float64)
    first = analyse(model, (1, 25, 25), seed=4, virtual=False).layers[0]
    g = torch.Generator().manual_seed(4)
    probe = torch.randn(1, 1, 25, 25, generator=g, dtype=torch.float64)
    active = int((model[1](probe.flatten(1)) > 0).sum())
    assert 0 < first.weight_rows == active < 512
    assert first.rank == 625


def test_the_covariate_caches_per_model_and_skips_what_it_cannot_analyse() -> None:
    assert COVARIATES.get("rank_index") is rank_index
    model = build_victim("fcn3", (1, 8, 8), 3, seed=0)
    images, labels = torch.rand(1, 1, 8, 8), torch.tensor([1])
    record = rank_index(model, images, labels)
    assert record == {"ra_index": 0, "rank_deficit": 0, "deficient_layers": [], "probe_seed": 0}
    assert cached_analysis(model, (1, 8, 8)) is cached_analysis(model, (1, 8, 8))
    other = build_victim("fcn3", (1, 8, 8), 3, seed=1)
    assert cached_analysis(other, (1, 8, 8)) is not cached_analysis(model, (1, 8, 8))
    resnet = build_victim("resnet18", (3, 32, 32), 10, seed=0)
    assert rank_index(resnet, torch.rand(1, 3, 32, 32), labels) is None


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), r"'1' \(BatchNorm2d\): batch norm"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), r"starts with '0' \(ReLU\)"),
        (nn.Sequential(nn.Linear(4, 2), nn.Sigmoid()), r"ends with '1' \(Sigmoid\)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2)), r"'0' \(Conv2d\): grouped"),
        (nn.Sequential(nn.Flatten(2), nn.Linear(4, 2)), r"'0' \(Flatten\): only Flatten"),
    ],
)
def test_layers_it_cannot_model_are_refused_by_name(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        network_stages(model, (1, 2, 2), "rank analysis")


def run_cli(*argv: str) -> int:
    return main(["rank", "--no-progress", *argv])


def test_rank_command_prints_the_table_and_the_index(capsys) -> None:
    assert run_cli("--model", "lenet-zhu", "--dataset", "lfw-subset") == 0
    text = capsys.readouterr().out
    assert text.startswith("lenet-zhu, input 1×25×25, 2 classes, init seed 0")
    assert "rank(A_i)" in text and "virtual V_i" in text and "RA-I = 0" in text
    assert "R-GAP's quantities" in text and "Our reconstruction" in text
    assert run_cli("--model", "fcn3", "--input-shape", "[1,6,6]", "--num-classes", "3",
                   "--json") == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert [r["virtual"] for r in record["rows"]] == [None, 1000 - 36, 0]
    assert record["ra_index"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (
            ["--model", "fcn3", "--dataset", "lfw-subset", "--num-classes", "3"],
            "num_classes: got 3 with dataset 'lfw-subset', expected none (the dataset sets it)",
        ),
        (["--model", "resnet18"], "'bn1' (BatchNorm2d)"),
    ],
)
def test_rank_command_rejects_bad_input_with_a_clear_message(capsys, argv, message) -> None:
    assert run_cli(*argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""
