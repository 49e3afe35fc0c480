"""The LightningModule that trains a victim on what a defense shares (see ``training.py``).

Kept apart, with an underscore, because the models registry imports every public module of
``leakbench.models`` and importing Lightning costs about two seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from lightning import LightningModule
from torch import Tensor, nn

from leakbench.client import fedsgd_update
from leakbench.interfaces import Defense

# Lightning's banners ("GPU available: ...", tips) would fill the output of every training run.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class DefendedTraining(LightningModule):
    """Manual optimisation: each step's gradient is the update the defense would share."""

    def __init__(
        self,
        model: nn.Module,
        defense: Defense,
        defense_name: str,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        seed: int,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.defense = defense
        self.defense_name = defense_name
        self.make_optimizer = make_optimizer
        # The defense's randomness (noise, ...) comes from one stream seeded by the run's seed.
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(list(self.model.parameters()))

    def training_step(self, batch: tuple[Tensor, Tensor, list[str]], batch_idx: int) -> None:
        images, labels, _ = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        share = self.defense.apply(self.model, images, labels, self.generator, fedsgd_update)
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(set(trainable) - set(share.update))
        if missing:
            raise ValueError(
                f"defense {self.defense_name!r} shared no update for {', '.join(missing[:4])}: "
                "expected one per trainable parameter"
            )
        for name, parameter in trainable.items():
            parameter.grad = share.update[name].detach().to(parameter.device, parameter.dtype)
        optimizer.step()
