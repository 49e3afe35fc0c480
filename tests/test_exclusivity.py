"""Exclusivity analysis: activation patterns, ExAN counts and the condition, against brute force."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leakbench.analysis.boundary import psnr_by_exans
from leakbench.analysis.exclusivity import (
    activation_patterns,
    analyse_exclusivity,
    exclusivity_covariate,
)
from leakbench.cli import main
from leakbench.client import build_victim
from leakbench.registry import COVARIATES


def brute_force_counts(pre_activations: list[torch.Tensor]) -> list[list[int]]:
    """ExANs per sample and layer by explicit loops over units and samples."""
    batch = pre_activations[0].shape[0]
    counts = [[0] * len(pre_activations) for _ in range(batch)]
    for layer, pre in enumerate(pre_activations):
        flat = pre.flatten(1)
        for unit in range(flat.shape[1]):
            active = [m for m in range(batch) if flat[m, unit] > 0]
            if len(active) == 1:
                counts[active[0]][layer] += 1
    return counts


def brute_force_condition(counts: list[list[int]]) -> list[bool]:
    return [row[-1] >= 2 and all(c >= 1 for c in row[:-1]) for row in counts]


def fcn_pre_activations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    h = x.flatten(1)
    pre = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            h = h @ layer.weight.T + layer.bias
            pre.append(h)
        elif isinstance(layer, nn.ReLU):
            h = h.clamp(min=0)
    return pre[:-1]  # the output layer has no ReLU


def test_fcn_counts_and_condition_match_brute_force_on_small_cases():
    outcomes = set()
    for seed in range(12):
        batch = 1 + seed % 4
        model = build_victim("fcn", (1, 3, 3), 3, seed=seed, widths=(12, 10))
        x = torch.rand(batch, 1, 3, 3, generator=torch.Generator().manual_seed(seed))
        report = analyse_exclusivity(model, x)
        with torch.no_grad():
            expected = brute_force_counts(fcn_pre_activations(model, x))
        assert report.counts.tolist() == expected
        assert report.condition.tolist() == brute_force_condition(expected)
        assert report.units == [12, 10]
        outcomes.add(report.holds)
    assert outcomes == {True, False}  # the small cases exercise both answers


def test_conv_units_are_channel_positions_and_match_brute_force():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    head = nn.Linear(3 * 4 * 4, 4)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head, nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    report = analyse_exclusivity(model, x)
    with torch.no_grad():
        a1 = F.conv2d(x, conv.weight, conv.bias, padding=1)
        a2 = a1.clamp(min=0).flatten(1) @ head.weight.T + head.bias
    expected = brute_force_counts([a1, a2])
    assert report.units == [3 * 4 * 4, 4]
    assert report.counts.tolist() == expected
    patterns = activation_patterns(model, x)
    assert patterns[0].unit_shape == (3, 4, 4)


def test_a_reused_relu_module_is_one_layer_per_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.out(self.relu(self.b(self.relu(self.a(x)))))

    model = Twice()
    x = torch.randn(3, 4)
    names = [p.name for p in activation_patterns(model, x)]
    assert names == ["relu#0", "relu#1"]
    with torch.no_grad():
        a1 = model.a(x)
        a2 = model.b(a1.clamp(min=0))
    assert analyse_exclusivity(model, x).counts.tolist() == brute_force_counts([a1, a2])


def test_models_without_relu_give_no_covariate():
    model = build_victim("lenet-zhu", (3, 8, 8), 4, seed=0)
    assert exclusivity_covariate(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1])) is None
    assert activation_patterns(model, torch.rand(2, 3, 8, 8)) == []


def test_train_mode_batchnorm_statistics_are_left_unchanged():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    model.train()
    before = [b.clone() for b in model.buffers()]
    analyse_exclusivity(model, torch.randn(5, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))


def test_covariate_is_registered_and_json_serialisable():
    assert COVARIATES.get("exclusivity") is exclusivity_covariate
    model = build_victim("fcn", (1, 3, 3), 3, seed=0, widths=(6, 5))
    x = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    value = exclusivity_covariate(model, x, torch.tensor([0, 1, 2]))
    assert json.loads(json.dumps(value)) == value
    counts = value["exans_per_sample"]
    assert len(counts) == 3 and all(len(row) == 2 for row in counts)
    assert value["min_exans_per_layer"] == [min(c) for c in zip(*counts, strict=True)]
    assert value["condition"] == all(value["condition_per_sample"])


@pytest.mark.parametrize(("batch_size", "expected"), [(2, 1.0), (16, 0.0)])
def test_condition_rate_on_random_784_512_512_10_net_matches_the_paper(batch_size, expected):
    # The ExAN paper's boundary study: P(condition) = 1.00 at B = 2, 0.00 at B = 16 (uniform noise).
    held = []
    for seed in range(8):
        model = build_victim("fcn", (1, 28, 28), 10, seed=seed, widths=(512, 512))
        x = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        held.append(analyse_exclusivity(model, x).holds)
    assert sum(held) / len(held) == expected


def run_boundary(capsys, argv):
    code = main(["boundary", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_boundary_command_writes_tables_and_figure(tmp_path, capsys):
    code, out, err = run_boundary(
        capsys,
        [
            "--dataset",
            "synthetic-uniform",
            "--dataset-options",
            '{"input_shape": [1, 8, 8], "num_classes": 4, "size": 64}',
            "--model",
            "fcn",
            "--model-options",
            '{"widths": [64]}',
            "--dtype",
            "float64",
            "--batch-sizes",
            "[1,2,16]",
            "--trials",
            "4",
            "--train-epochs",
            "[0,1]",
            "--attack-trials",
            "2",
            "--compare-attacks",
            "[exan,dlg]",
            "--attack-options",
            '{"dlg": {"iterations": 1, "max_iter": 2}}',
            "--compare-batch-sizes",
            "[2]",
            "--compare-trials",
            "1",
            "--compare-pool",
            "4",
            "--defenses",
            "[exclusivity-reduction-mixing]",
            "--defense-batch-sizes",
            "[2]",
            "--defense-trials",
            "2",
            "--output-dir",
            tmp_path,
            "--run-name",
            "study",
            "--wandb",
            "disabled",
            "--no-progress",
        ],  # fmt: skip
    )
    assert code == 0, err
    run = tmp_path / "study"
    for name in (
        "boundary.csv",
        "psnr_by_exans.csv",
        "compare.csv",
        "defenses.csv",
        "boundary.png",
    ):
        assert (run / name).stat().st_size > 0, name
    result = json.loads((run / "boundary.json").read_text())
    rows = result["boundary"]
    # The trained state is a cached checkpoint: its label names the hash prefix that reloads it.
    random, trained = result["states"]
    assert random == {
        "state": "random(0)",
        "train_epochs": 0,
        "model_state": "random(0)",
        "test_accuracy": random["test_accuracy"],
    }
    sha = trained["model_state"]
    assert trained["state"] == f"trained-1ep {sha[:16]}" and trained["train_epochs"] == 1
    card = json.loads((Path(os.environ["LEAKBENCH_CHECKPOINTS"]) / f"{sha}.json").read_text())
    assert card["epochs"] == 1 and card["lr"] == 0.05 and card["batch_size"] == 16
    assert card["test_accuracy"] == trained["test_accuracy"] and "initial_checkpoint" not in card
    assert [(r["state"], r["batch_size"]) for r in rows] == [
        ("random(0)", 1), ("random(0)", 2), ("random(0)", 16), (trained["state"], 1),
        (trained["state"], 2), (trained["state"], 16),
    ]  # fmt: skip
    assert rows[0]["p_condition"] == 1.0 and rows[2]["p_condition"] == 0.0
    compared = {r["attack"]: r for r in result["compare"]}
    assert compared["exan"]["psnr_median"] >= 60 and compared["exan"]["failed"] == 0
    assert set(compared) == {"exan", "dlg"}
    assert [r["defense"] for r in result["defenses"]] == ["none", "exclusivity-reduction-mixing"]
    assert "P(exclusivity condition)" in out
    # The configuration is recorded with lists as lists and mappings as mappings.
    config = result["config"]
    assert config["batch_sizes"] == [1, 2, 16] and config["train_epochs"] == [0, 1]
    assert config["compare_attacks"] == ["exan", "dlg"] and config["defense_batch_sizes"] == [2]
    assert config["model_options"] == {"widths": [64]} and config["wandb"] == "disabled"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "[2,x]"], "batch_sizes: expected"),
        (["--train-epochs", "[0,-1]"], "train_epochs: got [-1], expected non-negative integers"),
        (["--model", "lenet-zhu", "--psnr-attack", "none"], "'lenet-zhu' has no ReLU layer"),
        (["--model-options", "[1]"], "model_options: expected a dict"),
    ],
)
def test_boundary_command_refuses_bad_input(tmp_path, capsys, argv, message):
    out_dir = tmp_path / "out"
    code, _, err = run_boundary(capsys, ["--trials", "1", "--output-dir", out_dir, *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


def test_psnr_by_exans_records_no_interval_below_six_samples():
    def sample(min_exans, psnr):
        return {"state": "random-init", "min_exans": min_exans, "psnr": psnr, "failed": False}

    rows = [sample(0, p) for p in (10.0, 20.0, 30.0)] + [sample(3, 12.0)]
    rows += [sample(70, p) for p in (9, 3, 0, 5, 1, 8, 2, 7, 4, 6)]
    table = psnr_by_exans(rows)
    assert [(r["min_exans"], r["samples"]) for r in table] == [("0", 3), ("3-4", 1), ("65+", 10)]
    assert table[0]["psnr_median"] == 20.0 and table[0]["psnr_median_low"] is None
    assert table[0]["psnr_median_high"] is None and table[1]["psnr_median_low"] is None
    # Ten samples: the 95 % order-statistic interval of the median is [x(2), x(9)].
    assert (table[2]["psnr_median_low"], table[2]["psnr_median_high"]) == (1.0, 8.0)
