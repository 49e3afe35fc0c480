"""``synthetic-uniform``: uniform-noise images with random labels. For tests only, never a
benchmark result: it has no structure an image prior could exploit. Pixels are U(0, 1) and the
normalisation is the identity unless set, so model inputs equal pixels."""

from __future__ import annotations

import torch

from leakbench.datamodules.base import SampleDataset, TrialDataModule
from leakbench.registry import register_datamodule


@register_datamodule("synthetic-uniform")
class SyntheticUniformDataModule(TrialDataModule):
    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 8, 8),
        num_classes: int = 10,
        size: int = 64,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        data_seed: int = 0,
        **trial_options: int | str,
    ) -> None:
        super().__init__(**trial_options)  # type: ignore[arg-type]
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.size = size
        self.mean = tuple(mean) if mean is not None else (0.0,) * self.input_shape[0]
        self.std = tuple(std) if std is not None else (1.0,) * self.input_shape[0]
        self.data_seed = data_seed

    def load_split(self, split: str) -> SampleDataset:
        offset = self.splits.index(split)
        g = torch.Generator().manual_seed(self.data_seed * 2 + offset)
        pixels = torch.rand(self.size, *self.input_shape, generator=g)
        labels = torch.randint(self.num_classes, (self.size,), generator=g)
        ids = [f"synthetic-{split}/{i:04d}" for i in range(self.size)]
        return SampleDataset(pixels, labels, ids, self.mean, self.std)
