"""What every dataset module provides: normalised samples with stable ids, and trials.

A trial is one private batch: ``batch_size`` distinct samples of the attack split, drawn
deterministically from ``seed``. The test dataloader yields one trial per item, so Lightning's
distributed sampler shards trials (not samples) over processes.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class SampleDataset(Dataset):
    """In-memory samples: pixels in [0, 1], normalised on access. Items are (x, y, sample_id)."""

    def __init__(
        self,
        pixels: Tensor,
        labels: Tensor,
        sample_ids: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        if not (len(pixels) == len(labels) == len(sample_ids)):
            raise ValueError("pixels, labels and sample ids must have the same length")
        self.pixels = pixels.float()
        self.labels = labels.long()
        self.sample_ids = list(sample_ids)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        return (self.pixels[i] - self.mean) / self.std, int(self.labels[i]), self.sample_ids[i]


class TrialDataset(Dataset):
    """``num_trials`` private batches of ``batch_size`` distinct samples each.

    The plan walks through seeded permutations of the split, so the samples of one trial are
    distinct and consecutive trials cover the split before any sample repeats.
    """

    def __init__(self, samples: Dataset, batch_size: int, num_trials: int, seed: int) -> None:
        n = len(samples)  # type: ignore[arg-type]
        if num_trials < 1:
            raise ValueError(f"the number of trials must be at least 1, got {num_trials}")
        if batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {batch_size}")
        if batch_size > n:
            raise ValueError(
                f"batch size {batch_size} is larger than the attack split ({n} samples)"
            )
        rng = np.random.default_rng(seed)
        per_pass = n // batch_size
        passes = -(-num_trials // per_pass)
        order = np.concatenate([rng.permutation(n)[: per_pass * batch_size] for _ in range(passes)])
        self.plan = order[: num_trials * batch_size].reshape(num_trials, batch_size)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, trial: int) -> dict[str, Any]:
        items = [self.samples[int(i)] for i in self.plan[trial]]
        return {
            "trial": trial,
            "images": torch.stack([x for x, _, _ in items]),
            "labels": torch.tensor([y for _, y, _ in items], dtype=torch.long),
            "sample_ids": [sid for _, _, sid in items],
        }


class TrialDataModule(LightningDataModule):
    """Base class: subclasses say how to load a split; trials and loaders come from here.

    Class attributes every subclass sets: ``input_shape`` (C, H, W) after its documented
    resize/crop, ``num_classes``, and the normalisation ``mean``/``std`` the evaluator uses to
    de-normalise. Instances may refine them in ``__init__`` (e.g. a chosen resolution).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    def __init__(
        self,
        batch_size: int = 1,
        num_trials: int = 1,
        seed: int = 0,
        split: str = "test",
        train_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.splits)}")
        self.batch_size = batch_size
        self.num_trials = num_trials
        self.seed = seed
        self.split = split
        self.train_batch_size = train_batch_size
        self._cache: dict[str, Dataset] = {}

    @abstractmethod
    def load_split(self, split: str) -> Dataset:
        """Return the samples of ``split`` as (normalised x, label, sample id) items."""

    def samples(self, split: str) -> Dataset:
        if split not in self._cache:
            self._cache[split] = self.load_split(split)
        return self._cache[split]

    def trials(self) -> TrialDataset:
        return TrialDataset(self.samples(self.split), self.batch_size, self.num_trials, self.seed)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.trials(), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Plain shuffled mini-batches of the train split, for training victims."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.samples("train"),
            batch_size=self.train_batch_size,
            shuffle=True,
            generator=generator,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "split": self.split,
        }
