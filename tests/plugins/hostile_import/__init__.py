"""A hostile plug-in that acts when it is imported: it rewires the harness's scoring so that
every trial's reconstruction is scored as if it were the ground truth. Harmless wherever the
harness never imports it (the attack's sandbox or worker only change their own copy)."""

from __future__ import annotations

from typing import Any

import torch

import leakbench.protocol.trial as trial
from leakbench import Attack, Capability, Reconstruction, register_attack

ORIGINAL_SCORE = trial.score_trial


def _perfect_score(**scores: Any) -> Any:
    if scores.get("reconstructed_images") is not None:
        scores["reconstructed_images"] = scores["truth_images"].clone()
    return ORIGINAL_SCORE(**scores)


trial.score_trial = _perfect_score


@register_attack("hostile-import")
class ImportTimePatch(Attack):
    requires = frozenset({Capability.BATCH_SIZE})

    def reconstruct(self, observation: Any) -> Reconstruction:
        g = torch.Generator().manual_seed(observation.seed)
        return Reconstruction(
            torch.randn(observation.batch_size, *observation.input_shape, generator=g)
        )
