"""``digits``: the real 8×8 handwritten digits that ship with scikit-learn, usable with no download.

``sklearn.datasets.load_digits()`` holds the 1797 test images of the UCI "Optical Recognition of
Handwritten Digits" set (Alpaydin & Kaynak, 1998): 8×8 grey images whose pixels count the ink in
4×4 blocks of a 32×32 bitmap, 0 to 16. Here a pixel is that count / 16, in [0, 1]; the task is
the digit, 10 classes.

Split: stratified by digit, 80 % ``train`` (1437 images) and 20 % ``test`` (360), drawn once
with ``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels,
random_state=0)``; within a split samples keep their order in ``load_digits``, and a sample's id
``digits/NNNN`` is its index there. Normalisation: mean 0.3054, std 0.3761, measured on the
train split.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from leakbench.datamodules.base import SampleDataset, TrialDataModule
from leakbench.registry import register_datamodule

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def split_indices() -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of each split, sorted."""
    # sklearn is imported here, not at module level: the registry imports every datamodule.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return {"train": np.sort(train), "test": np.sort(test)}


@register_datamodule("digits")
class DigitsDataModule(TrialDataModule):
    input_shape = (1, 8, 8)
    num_classes = 10
    mean = (0.3054,)
    std = (0.3761,)
    class_names: ClassVar[list[str]] = [str(digit) for digit in range(10)]

    def load_split(self, split: str) -> SampleDataset:
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = split_indices()[split]
        pixels = torch.from_numpy(digits.images[keep] / 16).float().unsqueeze(1)
        labels = torch.from_numpy(digits.target[keep]).long()
        ids = [f"digits/{i:04d}" for i in keep.tolist()]
        return SampleDataset(pixels, labels, ids, self.mean, self.std)

    def describe(self) -> dict[str, Any]:
        return {"dataset": "digits", "split_seed": SPLIT_SEED, **super().describe()}
