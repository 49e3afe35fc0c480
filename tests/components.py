"""Test-only attacks and defenses, registered under names ending in ``-test``."""

from __future__ import annotations

import time

import torch

from leakbench import Attack, Capability, Defense, Reconstruction, register_attack, register_defense
from leakbench.registry import ATTACKS


def _register(name: str, cls: type) -> type:
    return cls if name in ATTACKS else register_attack(name)(cls)


class NoisyCopy(Attack):
    """Returns random images drawn from the observation's seed: deterministic, non-trivial."""

    requires = frozenset({Capability.BATCH_SIZE})

    def reconstruct(self, observation):
        g = torch.Generator().manual_seed(observation.seed)
        for _ in observation.budget.iterations(3):
            pass
        images = torch.rand(observation.batch_size, *observation.input_shape, generator=g)
        return Reconstruction(images=images, batch_size=observation.batch_size)


class Exploding(Attack):
    def reconstruct(self, observation):
        raise RuntimeError("the attack blew up on purpose")


class NeedsLabels(Attack):
    requires = frozenset({Capability.LABELS, Capability.BATCH_SIZE})

    def reconstruct(self, observation):
        raise AssertionError("never reached: the run must be refused")


class Spy(Attack):
    """Keeps the last observation so a test can inspect what the attacker received."""

    last_observation = None

    def reconstruct(self, observation):
        Spy.last_observation = observation
        return Reconstruction(images=torch.zeros(1, *observation.input_shape))


class Sleeper(Attack):
    """Ignores its budget meter."""

    def reconstruct(self, observation):
        time.sleep(0.3)
        return Reconstruction(images=torch.zeros(1, *observation.input_shape))


_register("noisy-copy-test", NoisyCopy)
_register("exploding-test", Exploding)
_register("needs-labels-test", NeedsLabels)
_register("spy-test", Spy)
_register("sleeper-test", Sleeper)


class PoisonUpdate(Defense):
    def defend_update(self, model, images, labels, update, generator):
        update = dict(update)
        name = next(iter(update))
        update[name] = update[name].clone()
        update[name].view(-1)[0] = float("nan")
        return update


if "poison-test" not in __import__("leakbench").DEFENSES:
    register_defense("poison-test")(PoisonUpdate)


def small_bias_run(output_dir, **overrides):
    """The run configuration of the figure, report and W&B tests: the exact, analytic bias
    attack on a tiny FCN over 8×8 synthetic images, in-process, two batch sizes."""
    from leakbench.config import RunConfig

    values = dict(
        dataset="synthetic-uniform",
        dataset_options={"input_shape": [3, 8, 8], "num_classes": 3, "size": 16},
        model="fcn",
        model_options={"widths": [8]},
        attacks=["bias"],
        batch_sizes=[1, 2],
        trials=2,
        output_dir=str(output_dir),
        run_name="run",
        logger="none",
        isolation="in-process",
    )
    values.update(overrides)
    return RunConfig.from_mapping(values)
