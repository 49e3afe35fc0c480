"""Nothing reachable from an Observation is, or shares memory with, the private batch."""

import gc

import torch
from torch import Tensor

import tests.components  # noqa: F401
from leakbench.interfaces import Defense
from leakbench.protocol import TrialSetting, Victim, prepare_attack, run_trial
from leakbench.registry import ATTACKS, DATAMODULES
from leakbench.threat_model import Budget, Capability


def reachable_tensors(root: object) -> list[Tensor]:
    seen: set[int] = set()
    stack = [root]
    tensors = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            tensors.append(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
            continue
        stack.extend(gc.get_referents(obj))
    return tensors


def storage_of(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def observe(tmp_path, granted):
    """Run one in-process trial with a spying attack; return (private batch, attacker's
    observation). In-process, so the spy can keep the Observation for the walk; in the default
    mode it would not even share a process with the batch."""
    dm = DATAMODULES.get("synthetic-uniform")(input_shape=(1, 6, 6), num_classes=3, batch_size=2)
    batch = dm.trials()[0]
    victim = Victim("fcn", (1, 6, 6), 3, {"widths": (8,)})
    setting = TrialSetting(
        cell="spy",
        attack_name="spy-test",
        defense_name="none",
        batch_size=2,
        input_shape=(1, 6, 6),
        num_classes=3,
        mean=(0.0,),
        std=(1.0,),
        granted=granted,
        budget=Budget(),
        dtype=torch.float32,
        client_mode="eval",
        seed=0,
        success_psnr=30.0,
        isolation="in-process",
    )
    spy = prepare_attack("spy-test", {}, granted)
    run_trial(victim, spy, Defense(), setting, batch)
    return batch, ATTACKS.get("spy-test").last_observation


def test_observation_holds_no_reference_to_the_private_batch(tmp_path):
    batch, observation = observe(tmp_path, frozenset(Capability))
    private = [batch["images"], batch["labels"]]
    private_storages = {storage_of(t) for t in private}
    tensors = reachable_tensors(observation)
    assert tensors, "the walk must reach the update and the model"
    for t in tensors:
        assert all(t is not p for p in private)
        assert storage_of(t) not in private_storages
    # Granted labels are an equal copy, not the private tensor.
    assert torch.equal(observation.labels, batch["labels"])
    observation.labels[0] = 99
    assert batch["labels"][0] != 99


def test_ungranted_metadata_is_absent(tmp_path):
    _, observation = observe(tmp_path, frozenset())
    assert observation.labels is None and observation.batch_size is None
