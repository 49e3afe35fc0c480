"""GradInversion (Yin et al., CVPR 2021): label restoration from the output layer, the granted
BatchNorm statistics of the client's batch, group consistency across restarts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from leakbench.attacks.gradinversion import (
    GradInversion,
    align_slots,
    counted_labels,
    restore_labels,
)
from leakbench.client import fedsgd_update
from leakbench.interfaces import Attack, Defense
from leakbench.protocol import TrialSetting, Victim, prepare_attack, run_trial
from leakbench.registry import register_attack
from leakbench.threat_model import (
    Budget,
    BudgetMeter,
    Capability,
    Observation,
    Reconstruction,
    RequirementsNotGranted,
    batchnorm_statistics,
    make_observation,
)

GRANTED = frozenset({Capability.BATCH_SIZE, Capability.BATCHNORM_STATISTICS})


def bn_net(classes: int = 10, width: int = 16) -> nn.Module:
    """Conv-BN-ReLU, average pooling, a linear output layer: non-negative features before it,
    as in ResNets."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def observe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, granted=GRANTED):
    update = fedsgd_update(model, images, labels)
    return make_observation(
        model,
        update,
        granted=granted,
        labels=labels,
        input_shape=tuple(images.shape[1:]),
        num_classes=model[-1].out_features if isinstance(model, nn.Sequential) else 10,
        mean=(0.0,),
        std=(1.0,),
        budget=Budget(),
        seed=0,
        images=images,
    )


@pytest.mark.parametrize("seed", range(8))
def test_label_restoration_is_exact_on_a_batch_with_distinct_labels(seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = bn_net().train()
    labels = torch.randperm(10, generator=generator)[:6]
    images = torch.randn(6, 1, 8, 8, generator=generator)
    restored, source = restore_labels(observe(model, images, labels), 6)
    assert source == "row minima"
    assert sorted(restored.tolist()) == sorted(labels.tolist())


def test_label_restoration_is_exact_on_the_resnet18_victim():
    model = Victim("resnet18", (1, 8, 8), 10, seed=1).build().train()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randperm(10, generator=generator)[:8]
    images = torch.randn(8, 1, 8, 8, generator=generator)
    observation = observe(model, images, labels)
    restored, source = restore_labels(observation, 8)
    assert source == "row minima"
    assert sorted(restored.tolist()) == sorted(labels.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_repeated_labels_are_counted_from_the_bias_gradient(seed):
    """Our extension (B > K): not exact in general, exact on these draws."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = bn_net(classes=3).train()
    labels = torch.randint(0, 3, (8,), generator=generator)
    images = torch.randn(8, 1, 8, 8, generator=generator)
    restored, source = restore_labels(observe(model, images, labels), 8)
    assert source == "row minima, counts from the bias gradient"
    assert sorted(restored.tolist()) == sorted(labels.tolist())


def test_counts_are_scaled_to_the_batch_and_rounded_by_largest_remainder():
    # n_k = B (p_k - 0) = (0, 1.5, 0, 0, 3), class 1 and 4 present: scaled to 5 slots, 1.67
    # and 3.33, rounded by largest remainder to 2 and 3.
    counts = counted_labels(
        torch.tensor([4, 1]), torch.zeros(5), torch.tensor([0, 0.3, 0, 0, 0.6]), 5
    )
    assert counts.tolist() == [1, 1, 4, 4, 4]


def test_slots_of_the_same_label_are_aligned_across_the_group():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 0, 1, 1, 0])
    reference = torch.randn(5, 1, 4, 4, generator=generator)
    shuffled = reference[torch.tensor([3, 4, 0, 2, 1])]  # permuted within each label
    aligned = align_slots([reference, shuffled + 0.01], labels)
    assert torch.allclose(aligned[1], reference + 0.01)


@register_attack("batchnorm-spy-test")
class BatchNormSpy(Attack):
    """Reports the BatchNorm statistics it was given (as JSON) and answers zeros."""

    requires = frozenset({Capability.BATCH_SIZE, Capability.BATCHNORM_STATISTICS})

    def reconstruct(self, observation: Observation) -> Reconstruction:
        statistics = observation.batchnorm_statistics or {}
        info = {
            layer: {key: value.tolist() for key, value in stats.items()}
            for layer, stats in statistics.items()
        }
        return Reconstruction(images=torch.zeros(1, *observation.input_shape), info=info)


@pytest.mark.parametrize(
    "isolation", ["in-process", pytest.param("process", marks=pytest.mark.slow)]
)
def test_the_granted_statistics_are_those_of_the_clients_batch(isolation):
    victim = Victim("convnet", (1, 12, 12), 3, {"width": 2}, seed=0, dtype=torch.float64)
    setting = TrialSetting(
        cell="spy__none__b4",
        attack_name="batchnorm-spy-test",
        defense_name="none",
        batch_size=4,
        input_shape=(1, 12, 12),
        num_classes=3,
        mean=(0.0,),
        std=(1.0,),
        granted=GRANTED,
        budget=Budget(max_seconds=60),
        dtype=torch.float64,
        client_mode="train",
        seed=0,
        success_psnr=30.0,
        isolation=isolation,
    )
    images = torch.rand(4, 1, 12, 12, dtype=torch.float64)
    batch = {"trial": 0, "images": images, "labels": torch.tensor([0, 1, 2, 0])}
    batch["sample_ids"] = ["a", "b", "c", "d"]
    attack = prepare_attack("batchnorm-spy-test", {}, GRANTED)
    record = run_trial(victim, attack, Defense(), setting, batch).record
    assert record["status"] == "ok", record["error"]
    expected = batchnorm_statistics(victim.build().train(), images)
    assert set(record["attack_info"]) == set(expected) and len(expected) == 9
    for layer, stats in expected.items():
        for key in ("mean", "var"):
            got = torch.tensor(record["attack_info"][layer][key], dtype=torch.float64)
            assert torch.allclose(got, stats[key], rtol=0, atol=1e-12), (layer, key)


def test_gradinversion_needs_the_batchnorm_statistics():
    with pytest.raises(RequirementsNotGranted, match="requires batchnorm_statistics"):
        prepare_attack("gradinversion", {}, frozenset({Capability.BATCH_SIZE}))


def statistics_distance(statistics: dict, granted: dict) -> float:
    return float(
        (statistics["mean"] - granted["mean"]).norm() + (statistics["var"] - granted["var"]).norm()
    )


def test_the_batchnorm_prior_pulls_the_group_towards_the_granted_statistics_within_budget():
    torch.manual_seed(0)
    model = bn_net(classes=10, width=16).train()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 8, 8, generator=generator)
    labels = torch.tensor([7, 1, 2, 5])
    observation = observe(model, images, labels)
    granted = observation.batchnorm_statistics["1"]
    distances = {}
    for bn_weight in (0.0, 1.0):
        budgeted = dataclasses.replace(observation, budget=BudgetMeter(Budget(max_iterations=90)))
        attack = GradInversion(iterations=1000, group=3, group_every=5, bn_weight=bn_weight)
        answer = attack.reconstruct(budgeted)
        # The budget bounds the work: 90 iterations are 30 steps of a group of 3.
        assert answer.info["steps"] == 30 and budgeted.budget.used_iterations == 90
        assert answer.info["label_source"] == "row minima"
        assert sorted(answer.labels.tolist()) == [1, 2, 5, 7]
        statistics = batchnorm_statistics(model, answer.images)["1"]
        distances[bn_weight] = statistics_distance(statistics, granted)
    assert distances[1.0] < 0.5 * distances[0.0]


def test_timing_attacks_times_gradinversion_at_its_tracks_batch_sizes_with_the_statistics():
    """``leakbench timing attacks --attacks [gradinversion]``: the track's victim and batch sizes
    (train split: it holds 48 images), a group of one, the batch's statistics granted."""
    from leakbench.analysis.attack_timing import build_case, settings

    chosen = settings(["gradinversion"], restarts=1)
    assert [(s.model, s.batch_size, s.split, s.eval_mode) for s in chosen] == [
        ("resnet18", b, "train", False) for b in (8, 16, 32, 48)
    ]
    assert all(s.options == {"group": 1} for s in chosen)
    case = build_case(dataclasses.replace(chosen[-1], batch_size=2))
    observation = case.observe()
    assert observation.batch_size == 2 and observation.labels is None
    expected = batchnorm_statistics(case.model, case.images)
    assert observation.batchnorm_statistics.keys() == expected.keys()
    for name, moments in expected.items():
        for key in ("mean", "var"):
            assert torch.equal(observation.batchnorm_statistics[name][key], moments[key])
