"""``lfw-subset``: the real LFW faces that ship with scikit-image, usable with no download.

``skimage.data.lfw_subset()`` holds 200 grey 25×25 images in [0, 1]: 100 faces from Labeled
Faces in the Wild followed by 100 non-face background crops. Task: face (1) vs non-face (0).
Split: every fifth image (index % 5 == 4) is ``test`` (40 images), the rest ``train`` (160).
Normalisation: mean 0.3825, std 0.2711, measured on the train split.

Option ``mirrored`` (False): each image's left-right mirror image joins its split, with its
label and the id ``<id>m`` (400 images: 320 train, 80 test), so that batches of up to 320
distinct images can be drawn (the fishing track's B = 256; 160 train images hold no batch of
256). The mean and std are those of the split either way (mirroring moves no pixel value).
"""

from __future__ import annotations

from typing import Any

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

    def __init__(self, *, mirrored: bool = False, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(mirrored, bool):
            raise ValueError(f"mirrored: got {mirrored!r}, expected true or false")
        self.mirrored = mirrored

    def load_split(self, split: str) -> SampleDataset:
        pixels = torch.from_numpy(data.lfw_subset()).float().unsqueeze(1)
        index = torch.arange(len(pixels))
        keep = (index % 5 == 4) if split == "test" else (index % 5 != 4)
        labels = (index < 100).long()
        pixels, labels = pixels[keep], labels[keep]
        ids = [f"lfw-subset/{i:03d}" for i in index[keep].tolist()]
        if self.mirrored:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            labels = torch.cat([labels, labels])
            ids += [f"{i}m" for i in ids]
        return SampleDataset(pixels, labels, ids, self.mean, self.std)
