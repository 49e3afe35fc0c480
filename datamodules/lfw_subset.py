"""``lfw-subset``: the real LFW faces that ship with scikit-image, usable with no download.

``skimage.data.lfw_subset()`` holds 200 grey 25×25 images in [0, 1]: 100 faces from Labeled
Faces in the Wild followed by 100 non-face background crops. Task: face (1) vs non-face (0).
Split: every fifth image (index % 5 == 4) is ``test`` (40 images), the rest ``train`` (160).
Normalisation: mean 0.3825, std 0.2711, measured on the train split.
"""

from __future__ import annotations

import torch
from skimage import data

from leakbench.datamodules.base import SampleDataset, TrialDataModule
from leakbench.registry import register_datamodule


@register_datamodule("lfw-subset")
class LFWSubsetDataModule(TrialDataModule):
    input_shape = (1, 25, 25)
    num_classes = 2
    mean = (0.3825,)
    std = (0.2711,)

    def load_split(self, split: str) -> SampleDataset:
        pixels = torch.from_numpy(data.lfw_subset()).float().unsqueeze(1)
        index = torch.arange(len(pixels))
        keep = (index % 5 == 4) if split == "test" else (index % 5 != 4)
        labels = (index < 100).long()
        ids = [f"lfw-subset/{i:03d}" for i in index[keep].tolist()]
        return SampleDataset(pixels[keep], labels[keep], ids, self.mean, self.std)
