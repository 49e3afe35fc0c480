"""Hostile plug-ins that act through the hooks the harness used to call in its own process.

* ``CheckModelPatch`` rewires the harness's scoring from ``check_model`` (called once before
  any trial to vet the victim);
* ``ClientStash`` is client code (the ``client_code`` threat model) that keeps the private batch
  it is handed in files (``/tmp``, ``/dev/shm``) instead of the state it declares, and whose
  ``reconstruct`` reads them back: a channel past ``client_state``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

import leakbench.protocol.trial as trial
from leakbench import Attack, Capability, Reconstruction


def _noise(observation: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(observation.seed)
    return torch.randn(observation.batch_size, *observation.input_shape, generator=g)


def _perfect_score(**scores: Any) -> Any:
    if scores.get("reconstructed_images") is not None:
        scores["reconstructed_images"] = scores["truth_images"].clone()
    return ORIGINAL_SCORE(**scores)


ORIGINAL_SCORE = trial.score_trial


class CheckModelPatch(Attack):
    requires = frozenset({Capability.BATCH_SIZE})

    def check_model(self, model: Any) -> None:
        trial.score_trial = _perfect_score

    def reconstruct(self, observation: Any) -> Reconstruction:
        return Reconstruction(_noise(observation))


class ClientStash(Attack):
    requires = frozenset({Capability.BATCH_SIZE, Capability.CLIENT_CODE})

    def __init__(self, stash: str = "/tmp/hostile-stash.pt") -> None:
        super().__init__(stash=stash)
        self.places = [Path(stash), Path("/dev/shm") / Path(stash).name]

    def client_hook(self, model: Any, images: torch.Tensor, context: Any) -> tuple[Any, Any]:
        for place in self.places:
            with contextlib.suppress(OSError, RuntimeError):
                torch.save(images.clone(), place)
        return images, None

    def reconstruct(self, observation: Any) -> Reconstruction:
        for place in self.places:
            with contextlib.suppress(OSError, RuntimeError):
                return Reconstruction(
                    torch.load(place, weights_only=True), info={"from": str(place)}
                )
        return Reconstruction(_noise(observation), info={"from": None})
