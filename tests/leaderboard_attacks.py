"""Test attacks that cheat a leaderboard through its public protocol, not through the harness.

Both read only public things, inside their isolated worker: the track's dataset and seed.

* ``memorise-plan-test`` rebuilds the public trial plan (the batches the track's fixed seed
  draws) and answers the planned batch whose gradient matches the shared update best. On the
  public run it is exact; on verification's secret seed and transform it is not.
* ``enumerate-dataset-test`` tries every image of the public split with every label (batch
  size 1) and answers the best gradient match: no memorised plan, the same weakness.

Selection is by gradient distance only (what a server can compute), never by the truth.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from leakbench import Attack, Capability, Reconstruction, register_attack
from leakbench.registry import ATTACKS, DATAMODULES
from leakbench.threat_model import Observation


def gradient_distance(
    observation: Observation, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Squared distance between the shared update and the gradient of ``(images, labels)``."""
    model = observation.model
    with torch.enable_grad():
        loss = F.cross_entropy(model(images.to(observation.dtype)), labels)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    target = observation.gradients()
    return sum(float(((g - t) ** 2).sum()) for g, t in zip(grads, target, strict=True))


class _PublicData(Attack):
    """Holds the public dataset settings of the track it cheats."""

    requires = frozenset({Capability.BATCH_SIZE})

    def __init__(
        self,
        dataset: str = "synthetic-uniform",
        dataset_options: dict[str, Any] | None = None,
        split: str = "test",
        seed: int = 0,
        trials: int = 2,
    ) -> None:
        options = dict(dataset_options or {})
        super().__init__(
            dataset=dataset, dataset_options=options, split=split, seed=seed, trials=trials
        )
        self.dataset, self.options, self.split = dataset, options, split
        self.seed, self.trials = seed, trials

    def datamodule(self, batch_size: int) -> Any:
        return DATAMODULES.get(self.dataset)(
            **self.options,
            batch_size=batch_size,
            num_trials=self.trials,
            seed=self.seed,
            split=self.split,
        )

    def best(self, observation: Observation, candidates: list[tuple[Any, Any]]) -> Reconstruction:
        scored = [(gradient_distance(observation, x, y), i) for i, (x, y) in enumerate(candidates)]
        images, labels = candidates[min(scored)[1]]
        return Reconstruction(images=images.clone(), labels=labels.clone())


class MemorisePlan(_PublicData):
    def reconstruct(self, observation: Observation) -> Reconstruction:
        plan = self.datamodule(observation.batch_size).trials()
        return self.best(
            observation, [(plan[t]["images"], plan[t]["labels"]) for t in range(len(plan))]
        )


class EnumerateDataset(_PublicData):
    max_batch_size = 1

    def reconstruct(self, observation: Observation) -> Reconstruction:
        samples = self.datamodule(1).samples(self.split)
        candidates = [
            (samples[i][0][None], torch.tensor([c]))
            for i in range(len(samples))
            for c in range(observation.num_classes)
        ]
        return self.best(observation, candidates)


for _name, _cls in (
    ("memorise-plan-test", MemorisePlan),
    ("enumerate-dataset-test", EnumerateDataset),
):
    if _name not in ATTACKS:
        register_attack(_name)(_cls)
