"""The three exclusivity-reduction defenses (our interpretations of the ExAN paper's idea)."""

import functools
import inspect

import pytest
import torch

from leakbench.analysis.boundary import Study, defense_rows
from leakbench.analysis.exclusivity import activation_patterns, analyse_exclusivity, exan_mask
from leakbench.attacks.exan import ExAN
from leakbench.client import build_victim, fedsgd_update
from leakbench.interfaces import TrialFailure
from leakbench.protocol import prepare_attack
from leakbench.registry import DATAMODULES, DEFENSES
from leakbench.threat_model import Budget, make_observation

NAMES = (
    "exclusivity-reduction-input",
    "exclusivity-reduction-gradient",
    "exclusivity-reduction-mixing",
)


@functools.cache
def lfw_batches(batch_size=4, count=4):
    """Random-init d-512-2 victim and lfw-subset batches inside the insecure boundary."""
    datamodule = DATAMODULES.get("lfw-subset")(batch_size=batch_size, num_trials=12, seed=0)
    model = build_victim("fcn-exan", datamodule.input_shape, 2, seed=0)
    batches = [
        (t["images"], t["labels"])
        for t in datamodule.trials()
        if analyse_exclusivity(model, t["images"]).holds
    ]
    return model, datamodule, batches[:count]


def defended_update(defense, model, images, labels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    share = defense.apply(model, images, labels, generator, fedsgd_update)
    return share.images, share.labels, share.update


def attack(model, datamodule, update, labels):
    observation = make_observation(
        model,
        update,
        granted=frozenset(),
        labels=labels,
        input_shape=datamodule.input_shape,
        num_classes=2,
        mean=datamodule.mean,
        std=datamodule.std,
        budget=Budget(),
        seed=0,
    )
    return ExAN().reconstruct(observation)


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_documented_as_our_interpretation(name):
    cls = DEFENSES.get(name)
    doc = inspect.getmodule(cls).__doc__
    assert "OUR INTERPRETATION, not the paper's defense" in doc
    assert "of our three variants" in doc and "papers.md" not in doc


def test_input_side_reduction_stays_in_budget_and_breaks_the_condition():
    model, datamodule, batches = lfw_batches()
    before = [p.clone() for p in model.parameters()]
    held = 0
    for images, labels in batches:
        defense = DEFENSES.get("exclusivity-reduction-input")(epsilon=0.1, steps=40)
        perturbed, kept_labels, update = defended_update(defense, model, images, labels)
        assert torch.equal(kept_labels, labels)
        assert float((perturbed - images).abs().max()) <= 0.1 + 1e-6
        report = analyse_exclusivity(model, perturbed)
        assert int(report.counts.sum()) < int(analyse_exclusivity(model, images).counts.sum())
        held += report.holds
    assert held <= len(batches) // 4  # every batch met the condition before
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_input_side_reduction_is_deterministic_and_stateless():
    model, _, batches = lfw_batches()
    images, labels = batches[0]
    defense = DEFENSES.get("exclusivity-reduction-input")(epsilon=0.05, steps=10)
    first = defended_update(defense, model, images, labels)[0]
    second = defended_update(defense, model, images, labels)[0]
    assert torch.equal(first, second)
    # Calls are independent: one on another batch in between changes nothing.
    defended_update(defense, model, batches[1][0], batches[1][1])
    assert torch.equal(defended_update(defense, model, images, labels)[0], first)
    unchanged = DEFENSES.get("exclusivity-reduction-input")(epsilon=0.0)
    assert unchanged.defend_batch(model, images, labels, torch.Generator())[0] is images


def test_gradient_side_suppression_zeroes_exactly_the_exan_rows_and_columns():
    model, datamodule, batches = lfw_batches()
    images, labels = batches[0]
    plain = fedsgd_update(model, images, labels)
    defense = DEFENSES.get("exclusivity-reduction-gradient")()
    _, _, update = defended_update(defense, model, images, labels)
    (pattern,) = activation_patterns(model, images)
    assert (pattern.producer, pattern.consumer) == ("1", "3")
    units = exan_mask(pattern.active).any(dim=0)
    assert bool(units.any())
    assert bool((update["1.weight"][units] == 0).all() and (update["1.bias"][units] == 0).all())
    assert bool((update["3.weight"][:, units] == 0).all())
    assert torch.equal(update["1.weight"][~units], plain["1.weight"][~units])
    assert torch.equal(update["3.weight"][:, ~units], plain["3.weight"][:, ~units])
    assert torch.equal(update["3.bias"], plain["3.bias"])
    with pytest.raises(TrialFailure, match="no valid group|no group's gradients are 1/M"):
        attack(model, datamodule, update, labels)


def test_mixing_blends_each_sample_with_another_and_keeps_labels():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    labels = torch.tensor([0, 1, 0, 1])
    defense = DEFENSES.get("exclusivity-reduction-mixing")(mix_weight=0.25)
    mixed, kept = defense.defend_batch(None, images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(kept, labels)
    partner = (mixed[:, 0, 0, 0] - 0.75 * images[:, 0, 0, 0]) / 0.25
    assert sorted(partner.round().long().tolist()) == [0, 1, 2, 3]  # a permutation
    assert all(int(p) != i for i, p in enumerate(partner.round().long()))  # no fixed point
    again, _ = defense.defend_batch(None, images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again)
    single = images[:1]
    assert defense.defend_batch(None, single, labels[:1], torch.Generator())[0] is single
    with pytest.raises(ValueError, match=r"mix_weight must be in \[0, 0.5\)"):
        DEFENSES.get("exclusivity-reduction-mixing")(mix_weight=0.5)


def test_mixing_leaves_the_attack_exact_on_the_mixed_images_only():
    model, datamodule, batches = lfw_batches()
    images, labels = batches[0]
    defense = DEFENSES.get("exclusivity-reduction-mixing")(mix_weight=0.3)
    mixed, labels, update = defended_update(defense, model, images, labels)
    assert analyse_exclusivity(model, mixed).holds  # mixing at 0.3 kept this batch inside
    images_back = attack(model, datamodule, update, labels).images
    best_to_mixed = torch.cdist(images_back.flatten(1), mixed.double().flatten(1)).min(dim=1)
    best_to_private = torch.cdist(images_back.flatten(1), images.double().flatten(1)).min(dim=1)
    assert float(best_to_mixed.values.max()) < 1e-4
    assert float(best_to_private.values.min()) > 0.1


def test_utility_cost_smoke(tmp_path):
    study = Study(
        dataset="synthetic-uniform",
        dataset_options={"input_shape": [1, 8, 8], "num_classes": 2, "size": 24},
        model="fcn",
        model_options={"widths": [16]},
    )
    trained = study.trained(1, defense=NAMES[0])
    assert trained.checkpoint.card["defense"] == NAMES[0]
    assert trained.test_accuracy == study.test_accuracy(trained.model)
    rows = defense_rows(
        study.victim(),
        study,
        {"none": ("none", {}), NAMES[2]: (NAMES[2], {})},
        batch_sizes=[2],
        trials=2,
        utility_epochs=1,
        attack=prepare_attack("exan", {}, frozenset()),
    )
    assert [r["defense"] for r in rows] == ["none", NAMES[2]]
    assert rows[0]["utility_cost"] == 0.0
    defended = study.trained(1, defense=NAMES[2]).test_accuracy
    assert rows[1]["test_accuracy"] == defended
    assert rows[1]["utility_cost"] == study.trained(1).test_accuracy - defended
    assert all(0 <= r["p_condition"] <= 1 for r in rows)
