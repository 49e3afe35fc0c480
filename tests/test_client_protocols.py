"""Client protocols: FedSGD, FedAvg (local SGD, weight delta) and the sum of K clients; what the
attacker learns of them, which attacks run under them, and Inverting Gradients' simulation."""

from __future__ import annotations

import copy

import pytest
import torch

from leakbench.attacks._gradient_matching import replayed_protocol, simulated_update
from leakbench.attacks.inverting_gradients import cosine_gradient_distance
from leakbench.client import (
    EVERY_PROTOCOL,
    Aggregate,
    FedAvg,
    FedSGD,
    build_victim,
    fedsgd_equivalent,
    fedsgd_update,
    protocol_from_spec,
)
from leakbench.interfaces import Attack, Defense
from leakbench.protocol import TrialSetting, Victim, run_trial
from leakbench.protocol.attack import UnsupportedClientProtocol, prepare_attack
from leakbench.registry import ATTACKS, DEFENSES, register_attack
from leakbench.threat_model import (
    Budget,
    Capability,
    Reconstruction,
    RequirementsNotGranted,
    make_observation,
)

SHAPE = (1, 6, 6)
CLASSES = 3


class ProtocolSpy(Attack):
    """Keeps the observation; reads every protocol."""

    client_protocols = EVERY_PROTOCOL
    last_observation = None

    def reconstruct(self, observation):
        ProtocolSpy.last_observation = observation
        return Reconstruction(images=torch.zeros(1, *observation.input_shape))


if "protocol-spy-test" not in ATTACKS:
    register_attack("protocol-spy-test")(ProtocolSpy)


def victim_model(seed: int = 0) -> torch.nn.Module:
    return build_victim("fcn", SHAPE, CLASSES, seed=seed, dtype=torch.float64, widths=(16,))


def private_batch(size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((size, *SHAPE), generator=generator, dtype=torch.float64)
    labels = torch.randint(CLASSES, (size,), generator=generator)
    return images, labels


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_one_full_batch_fedavg_step_is_minus_lr_times_the_fedsgd_gradient():
    model = victim_model()
    images, labels = private_batch(5)
    lr = 0.37
    generator = torch.Generator().manual_seed(3)
    share = FedAvg(lr=lr, local_steps=1).share(model, images, labels, Defense(), generator)
    gradient = fedsgd_update(model, images, labels)
    assert max_difference(share.update, {n: -lr * g for n, g in gradient.items()}) < 1e-12
    # A full-batch local batch draws nothing: the defense's noise stream is FedSGD's.
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())


@pytest.mark.parametrize(
    ("protocol", "steps"),
    [
        (FedAvg(lr=0.1, local_steps=5, local_batch_size=3), 5),
        (FedAvg(lr=0.05, local_epochs=2, local_batch_size=3), 6),
        (FedAvg(lr=0.2, local_steps=4), 4),
    ],
)
def test_fedavg_matches_a_hand_rolled_sgd_loop(protocol, steps):
    model = victim_model()
    before = copy.deepcopy(model.state_dict())
    images, labels = private_batch(8)
    share = protocol.share(model, images, labels, Defense(), torch.Generator().manual_seed(7))

    local = copy.deepcopy(model)
    optimizer = torch.optim.SGD(local.parameters(), lr=protocol.lr)
    generator = torch.Generator().manual_seed(7)
    size = protocol.local_batch_size or 8
    batches: list[torch.Tensor] = []
    while len(batches) < steps:  # epochs of fresh permutations, cut into local batches
        order = torch.randperm(8, generator=generator) if size < 8 else torch.arange(8)
        batches += list(order.split(size))
    for batch in batches[:steps]:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(local(images[batch]), labels[batch]).backward()
        optimizer.step()
    expected = {
        name: p.detach() - model.get_parameter(name) for name, p in local.named_parameters()
    }
    assert max_difference(share.update, expected) < 1e-12
    assert protocol.step_count(8) == steps
    # The client's model (the server's θ_0) is left as it was.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_aggregate_is_exactly_the_sum_of_the_clients_updates():
    model = victim_model()
    images, labels = private_batch(6)
    defense = DEFENSES.get("noise")(scale=0.01)  # draws from the generator: order matters
    inner = FedAvg(lr=0.1, local_steps=3, local_batch_size=1)
    aggregate = Aggregate(clients=3, inner=inner)
    share = aggregate.share(model, images, labels, defense, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)
    clients = [
        inner.share(
            model, images[k * 2 : (k + 1) * 2], labels[k * 2 : (k + 1) * 2], defense, generator
        )
        for k in range(3)
    ]
    expected = {
        n: clients[0].update[n] + clients[1].update[n] + clients[2].update[n] for n in share.update
    }
    assert all(torch.equal(share.update[n], expected[n]) for n in expected)
    assert torch.equal(share.images, images) and torch.equal(share.labels, labels)
    assert share.info == {"clients": [{}, {}, {}]}
    assert aggregate.samples_per_trial(2) == 6
    with pytest.raises(ValueError, match=r"clients = 4: a batch of 6 samples does not split"):
        Aggregate(clients=4).share(model, images, labels, Defense(), generator)


def test_an_aggregate_of_fedsgd_clients_read_with_k_is_the_gradient_of_all_samples():
    model = victim_model()
    images, labels = private_batch(6)
    protocol = Aggregate(clients=3)
    share = protocol.share(model, images, labels, Defense(), torch.Generator().manual_seed(0))
    granted = frozenset({Capability.BATCH_SIZE, Capability.LOCAL_HYPERPARAMETERS})
    observation = observe(model, share.update, labels, granted, protocol)
    union = fedsgd_update(model, images, labels)
    assert max_difference(dict(fedsgd_equivalent(observation).update), union) < 1e-12


def observe(model, update, labels, granted, protocol):
    return make_observation(
        model,
        update,
        granted=granted,
        labels=labels,
        input_shape=SHAPE,
        num_classes=CLASSES,
        mean=(0.0,),
        std=(1.0,),
        budget=Budget(),
        seed=0,
        client_protocol=protocol.spec(),
    )


def test_protocol_specs_round_trip_and_bad_ones_are_refused():
    protocol = Aggregate(clients=4, inner=FedAvg(lr=0.1, local_epochs=2, local_batch_size=8))
    assert protocol_from_spec(protocol.spec()) == protocol
    assert protocol_from_spec("fedsgd") == FedSGD()
    cases = {
        "client_protocol name = 'sgd': expected one of fedsgd, fedavg, aggregate": {"name": "sgd"},
        "client_protocol fedavg local_steps = 2, local_epochs = 1: expected exactly one of them": {
            "name": "fedavg",
            "lr": 0.1,
            "local_steps": 2,
            "local_epochs": 1,
        },
        "client_protocol lr = 0: expected a positive number": {
            "name": "fedavg",
            "lr": 0,
            "local_steps": 1,
        },
        "client_protocol local_batch_size = 0: expected a positive integer": {
            "name": "fedavg",
            "lr": 0.1,
            "local_steps": 1,
            "local_batch_size": 0,
        },
        "client_protocol aggregate clients = None: expected a value": {"name": "aggregate"},
        "client_protocol fedsgd option 'lr': expected no options": {"name": "fedsgd", "lr": 1},
        "client_protocol aggregate inner = Aggregate(clients=2, inner=FedSGD()): expected fedsgd "
        "or fedavg": {
            "name": "aggregate",
            "clients": 2,
            "inner": {"name": "aggregate", "clients": 2},
        },
    }
    for message, spec in cases.items():
        with pytest.raises(ValueError) as caught:
            protocol_from_spec(spec)
        assert str(caught.value) == message


def test_an_unsupported_protocol_is_refused_before_any_trial():
    fedavg = FedAvg(lr=0.1, local_steps=2)
    with pytest.raises(UnsupportedClientProtocol) as caught:
        prepare_attack("rgap", {}, frozenset(Capability), fedavg)
    assert str(caught.value) == (
        "attack 'rgap' does not support the client protocol 'fedavg' (it supports: fedsgd)"
    )
    # The inner protocol of an aggregate counts too.
    with pytest.raises(UnsupportedClientProtocol, match="'aggregate' .*supports: fedsgd\\)"):
        prepare_attack("fishing", {}, frozenset(Capability), Aggregate(clients=2))
    # Inverting Gradients simulates FedAvg only with the local hyperparameters.
    with pytest.raises(RequirementsNotGranted, match="requires batch_size, local_hyperparameters"):
        prepare_attack("inverting-gradients", {}, frozenset(), Aggregate(2, fedavg))
    prepared = prepare_attack(
        "inverting-gradients", {}, frozenset({Capability.BATCH_SIZE}), Aggregate(clients=2)
    )
    assert prepared.requires == frozenset({Capability.BATCH_SIZE})
    # A harness that prepared the attack for FedSGD cannot run it under FedAvg.
    spy = prepare_attack("protocol-spy-test", {}, frozenset())
    ProtocolSpy.last_observation = None
    with pytest.raises(ValueError, match="was prepared for the client protocol"):
        run_trial(victim_spec(), spy, Defense(), setting(fedavg, frozenset(), 2), trial_batch(2))
    assert ProtocolSpy.last_observation is None


def victim_spec() -> Victim:
    return Victim("fcn", SHAPE, CLASSES, {"widths": (16,)}, 0, torch.float64)


def setting(
    protocol, granted, batch_size, attack="protocol-spy-test", isolation="in-process"
) -> TrialSetting:
    return TrialSetting(
        cell="protocols",
        attack_name=attack,
        defense_name="none",
        batch_size=batch_size,
        input_shape=SHAPE,
        num_classes=CLASSES,
        mean=(0.0,),
        std=(1.0,),
        granted=granted,
        budget=Budget(),
        dtype=torch.float64,
        client_mode="eval",
        seed=0,
        success_psnr=30.0,
        isolation=isolation,
        client_protocol=protocol,
    )


def trial_batch(samples: int) -> dict:
    images, labels = private_batch(samples)
    return {
        "trial": 0,
        "images": images,
        "labels": labels,
        "sample_ids": [f"s{i}" for i in range(samples)],
    }


@pytest.mark.parametrize(
    ("granted", "seen"),
    [
        (frozenset({Capability.BATCH_SIZE}), {"name": "aggregate", "inner": {"name": "fedavg"}}),
        (
            frozenset({Capability.BATCH_SIZE, Capability.LOCAL_HYPERPARAMETERS}),
            {
                "name": "aggregate",
                "clients": 2,
                "inner": {
                    "name": "fedavg",
                    "lr": 0.1,
                    "local_steps": 3,
                    "local_epochs": None,
                    "local_batch_size": 1,
                },
            },
        ),
    ],
)
def test_the_local_hyperparameters_reach_the_attacker_only_when_granted(granted, seen):
    protocol = Aggregate(clients=2, inner=FedAvg(lr=0.1, local_steps=3, local_batch_size=1))
    spy = prepare_attack("protocol-spy-test", {}, granted, protocol)
    record = run_trial(victim_spec(), spy, Defense(), setting(protocol, granted, 2), trial_batch(4))
    observation = ProtocolSpy.last_observation
    assert observation.client_protocol == seen
    assert observation.batch_size == 4  # the samples behind the sum: K·B
    assert record.record["client_protocol"] == protocol.spec()
    assert record.record["defense_report"] == {"clients": [{}, {}]}
    assert len(record.record["metrics"]["samples"]) == 4  # scored against every client's samples


@pytest.mark.parametrize(
    "protocol",
    [
        FedAvg(lr=0.3, local_steps=4),
        FedAvg(lr=0.1, local_steps=3, local_batch_size=2),  # one epoch of 3 local batches
        Aggregate(clients=2, inner=FedAvg(lr=0.2, local_epochs=2)),
        Aggregate(clients=3),
    ],
)
def test_inverting_gradients_simulation_reproduces_the_client_update(protocol):
    model = victim_model()
    images, labels = private_batch(6)
    generator = torch.Generator().manual_seed(11)
    share = protocol.share(model, images, labels, Defense(), generator)
    granted = frozenset({Capability.BATCH_SIZE, Capability.LOCAL_HYPERPARAMETERS})
    observation = observe(model, share.update, labels, granted, protocol)
    # The attacker's dummy slot i plays the client's i-th sample of its first epoch.
    order = torch.arange(6)
    if isinstance(protocol, FedAvg) and protocol.local_batch_size is not None:
        order = torch.randperm(6, generator=torch.Generator().manual_seed(11))
    replayed = replayed_protocol(observation, "Inverting Gradients")
    assert replayed == protocol
    dummies = images[order].clone().requires_grad_()
    simulated = simulated_update(observation, replayed, dummies, labels[order])
    target = observation.gradients()
    assert max((s - t).abs().max().item() for s, t in zip(simulated, target, strict=True)) < 1e-12
    distance = cosine_gradient_distance(simulated, target)
    assert abs(distance.item()) < 1e-12
    (grad,) = torch.autograd.grad(distance, [dummies])  # differentiable w.r.t. the dummies
    assert grad.shape == dummies.shape


def test_inverting_gradients_without_hyperparameters_refuses_to_guess_fedavg():
    model = victim_model()
    images, labels = private_batch(2)
    protocol = FedAvg(lr=0.1, local_steps=2)
    share = protocol.share(model, images, labels, Defense(), torch.Generator().manual_seed(0))
    observation = observe(model, share.update, labels, frozenset(), protocol)
    assert observation.client_protocol == {"name": "fedavg"}
    with pytest.raises(RequirementsNotGranted, match="local_hyperparameters.*to simulate"):
        replayed_protocol(observation, "Inverting Gradients")
    # FedSGD clients need no hyperparameters: the gradient of all K·B dummies, up to K.
    summed = observe(model, share.update, labels, frozenset(), Aggregate(clients=2))
    assert summed.client_protocol == {"name": "aggregate", "inner": {"name": "fedsgd"}}
    assert replayed_protocol(summed, "Inverting Gradients") is None


@pytest.mark.parametrize(
    ("protocol", "samples"),
    [(FedAvg(lr=0.5, local_steps=1), 1), (Aggregate(clients=2), 2)],
)
def test_run_trial_under_fedavg_and_aggregate_records_the_protocol(protocol, samples):
    """The bias attack reads a FedAvg delta as a gradient: one full-batch step of one sample
    is inverted exactly; two clients of one sample each give a mixture."""
    attack = prepare_attack("bias", {}, frozenset(), protocol)
    run = run_trial(
        victim_spec(),
        attack,
        Defense(),
        setting(protocol, frozenset(), 1, "bias", isolation="process"),  # the payload crosses
        trial_batch(samples),
    )
    record = run.record
    assert record["status"] == "ok", record["error"]
    assert record["client_protocol"] == protocol.spec()
    assert record["defense_report"] == ({} if samples == 1 else {"clients": [{}, {}]})
    psnr = [s["psnr"] for s in record["metrics"]["samples"]]
    assert len(psnr) == samples
    if samples == 1:
        assert psnr[0] > 100
    else:
        assert max(p for p in psnr if p is not None) < 100
