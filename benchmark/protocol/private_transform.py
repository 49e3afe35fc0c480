"""A secret, seeded change of every private sample before the client sees it.

Tracks fix a public dataset and a public seed, so an attack could memorise which samples each
trial draws, or enumerate the public dataset and keep the image whose gradient matches best.
Leaderboard verification therefore draws its samples with a secret seed and changes each one with
this transform, so the batch the client trains on is in no list the attack can search. The result
is the private batch: it is what the client holds, and scoring uses it as the ground truth.

For sample ``k`` of trial ``t``, with a generator seeded from ``(seed, t)``, in [0, 1] pixels:

1. a shift by (dy, dx), each uniform in {−``max_shift``, …, ``max_shift``}, with edge padding
   (the image size stays the same);
2. a horizontal flip with probability ½ when ``flip`` is set;
3. a brightness gain g = 1 ± u with u uniform in [``brightness``/2, ``brightness``] and a fair
   sign, then a clamp to [0, 1]. The gain never comes near 1, so every sample changes even when
   the shift is zero and there is no flip: no public image is ever within a few dB of exact.

The sample is then normalised again with the dataset's mean and std.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class PrivateTransform:
    seed: int
    max_shift: int = 2
    flip: bool = True
    brightness: float = 0.1

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PrivateTransform:
        """From a config mapping; a missing seed or an unknown key is refused by name."""
        known = {"seed", "max_shift", "flip", "brightness"}
        unknown = sorted(set(options) - known)
        if unknown or "seed" not in options:
            raise ValueError(
                f"private_transform takes {', '.join(sorted(known))} (seed required); "
                f"got {', '.join(sorted(options)) or 'nothing'}"
            )
        transform = cls(**options)
        if transform.max_shift < 0 or not 0 <= transform.brightness < 1:
            raise ValueError(
                f"private_transform needs max_shift >= 0 and 0 <= brightness < 1, got "
                f"{transform.max_shift} and {transform.brightness}"
            )
        return transform

    def __call__(
        self, images: Tensor, trial: int, mean: Sequence[float], std: Sequence[float]
    ) -> Tensor:
        state = np.random.SeedSequence([self.seed, trial]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        m = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
        s = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
        out = []
        for image in images * s + m:
            shift = torch.randint(
                -self.max_shift, self.max_shift + 1, (2,), generator=generator
            ).tolist()
            flip = bool(torch.rand((), generator=generator) < 0.5) and self.flip
            size = self.brightness * (1 + float(torch.rand((), generator=generator))) / 2
            gain = 1 + size if bool(torch.rand((), generator=generator) < 0.5) else 1 - size
            out.append((_shift(image, *shift).flip(-1) if flip else _shift(image, *shift)) * gain)
        return (torch.stack(out).clamp(0, 1) - m) / s


def _shift(image: Tensor, dy: int, dx: int) -> Tensor:
    """``image`` moved by (dy, dx) pixels, the uncovered border filled from the edge."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return image
    padded = F.pad(image[None], (p, p, p, p), mode="replicate")[0]
    h, w = image.shape[-2:]
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]
