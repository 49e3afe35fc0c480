"""A secret, seeded, high-entropy change of every private sample before the client sees it.

Tracks fix a public dataset and a public seed, so an attack could memorise which samples each
trial draws, or enumerate the public dataset (with a few shifts, flips and gains) and keep the
image whose gradient matches best: with a change drawn from a short list, such a lookup found the
exact private sample. Leaderboard verification therefore draws its samples with a secret seed
and changes each one with this transform, whose parameters are continuous and end in per-pixel
noise: the batch the client trains on is in no list an attack can search, so an attack that
looks its answer up scores no better than the transformed image's distance from the public one,
while an attack that inverts the gradient reconstructs the transformed sample, noise and all.
``leakbench leaderboard lookup-bound TRACK`` measures that distance per track. The result is the
private batch: it is what the client holds, and scoring uses it as the ground truth.

For sample ``k`` of trial ``t``, with one generator seeded from ``(seed, t)`` that draws every
parameter of sample 0, then of sample 1, ..., all in float64 on pixels in [0, 1]:

1. a crop box of ``a`` times the image's area, ``a`` uniform in ``crop_scale``, with aspect ratio
   (width / height) log-uniform in ``crop_ratio``, at a uniform continuous position inside the
   image, turned by an angle uniform in ±``rotation`` degrees about its centre and mirrored
   left-right with probability ½ when ``flip`` is set, is resampled to the original size: one
   bilinear resampling (``torch.nn.functional.affine_grid``/``grid_sample``), reflecting where
   the turned box leaves the image;
2. contrast about the image's mean by a factor uniform in 1 ± ``contrast``, brightness by a gain
   uniform in 1 ± ``brightness`` and, for colour images, each channel by its own gain uniform
   in 1 ± ``colour``; a clamp to [0, 1];
3. a Gaussian blur (torchvision's ``gaussian_blur``, reflected edges) whose σ in pixels is
   uniform in ``blur``, with a kernel of 2⌈3σ⌉ + 1 taps;
4. the pixel range squeezed into [2σ, 1 − 2σ] (x ← 2σ + (1 − 4σ)·x) for σ = ``noise``, then
   Gaussian noise of standard deviation σ on every pixel and a clamp to [0, 1]. Without the
   squeeze the clamp would cut away half the noise of dark or bright pixels: a near-black image
   (lfw-subset holds some) would keep neither its structure under the other steps nor its noise,
   and a lookup would come within a few dB of it.

The sample is then normalised again with the dataset's mean and std. Each step's parameters are
drawn whether or not it has an effect, so every option changes only its own step. With the
options at their identity values (``crop_scale`` and ``crop_ratio`` [1, 1], the rest 0 or off)
the transform returns its input.

The defaults (:data:`DEFAULTS`, written out in every shipped track) keep a face a face, so an
attack's difficulty stays that of the track: the shipped entries' attacks reach what they reach
on the public trials. The noise σ = 0.04 sets the floor of any lookup: even knowing every other
parameter, a lookup stays −20·log10(σ) ≈ 28 dB from the truth, below the 30 dB at which a
sample counts as reconstructed and far below the 60 dB ceiling an inversion reaches; the
measured bound is recorded per track in its ``verification.lookup_bound``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

# torch is imported where a sample is changed: the leaderboard's pages describe the transform
# (``describe``) and must not pay for importing torch.

# The options and their defaults, in the order ``from_options`` names them.
DEFAULTS: dict[str, Any] = {
    "crop_scale": (0.7, 1.0),
    "crop_ratio": (0.85, 1.18),
    "rotation": 8.0,
    "flip": True,
    "brightness": 0.15,
    "contrast": 0.15,
    "colour": 0.1,
    "blur": (0.2, 0.6),
    "noise": 0.04,
}
_RANGES = ("crop_scale", "crop_ratio", "blur")


@dataclass(frozen=True)
class SampleChange:
    """The parameters drawn for one sample, and its noise (in pixels, before any clamp)."""

    crop: tuple[float, float, float, float]  # width, height (fractions), centre x, y (in [-1, 1])
    angle: float  # radians
    flipped: bool
    contrast: float
    brightness: float
    channel_gains: tuple[float, ...]
    blur_sigma: float
    noise_std: float
    noise: Tensor  # in pixels: noise_std times a standard normal draw


@dataclass(frozen=True)
class PrivateTransform:
    seed: int
    crop_scale: tuple[float, float] = DEFAULTS["crop_scale"]
    crop_ratio: tuple[float, float] = DEFAULTS["crop_ratio"]
    rotation: float = DEFAULTS["rotation"]
    flip: bool = DEFAULTS["flip"]
    brightness: float = DEFAULTS["brightness"]
    contrast: float = DEFAULTS["contrast"]
    colour: float = DEFAULTS["colour"]
    blur: tuple[float, float] = DEFAULTS["blur"]
    noise: float = DEFAULTS["noise"]

    def __post_init__(self) -> None:
        for name in _RANGES:
            value = getattr(self, name)
            if isinstance(value, str) or len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"private_transform: {name} must be [low, high], got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        scale, ratio, blur = self.crop_scale, self.crop_ratio, self.blur
        checks = [
            (0 < scale[0] <= scale[1] <= 1, f"crop_scale within (0, 1] (got {list(scale)})"),
            (ratio[0] > 0, f"crop_ratio above 0 (got {list(ratio)})"),
            (0 <= self.rotation <= 90, f"rotation in [0, 90] degrees (got {self.rotation})"),
            *(
                (0 <= getattr(self, name) < 1, f"{name} in [0, 1) (got {getattr(self, name)})")
                for name in ("brightness", "contrast", "colour")
            ),
            (blur[0] >= 0, f"blur at least 0 (got {list(blur)})"),
            # The squeeze of step 4 needs 4σ < 1.
            (0 <= self.noise < 0.25, f"noise in [0, 0.25) (got {self.noise})"),
        ]
        problems = [message for holds, message in checks if not holds]
        if problems:
            raise ValueError(f"private_transform needs {'; '.join(problems)}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PrivateTransform:
        """From a config mapping; a missing seed or an unknown key is refused by name."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown or "seed" not in options:
            problem = (
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                if unknown
                else "no seed"
            )
            raise ValueError(
                f"private_transform: {problem}; it takes {', '.join(known)} (seed required)"
            )
        return cls(**options)

    def draw(self, trial: int, count: int, shape: Sequence[int]) -> list[SampleChange]:
        """The parameters of the ``count`` samples of ``trial``, images of ``shape`` (C, H, W)."""
        import torch

        state = np.random.SeedSequence([self.seed, trial]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

        def uniform(low: float, high: float) -> float:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            return low + (high - low) * u

        changes = []
        for _ in range(count):
            area = uniform(*self.crop_scale)
            ratio = math.exp(uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
            width, height = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
            centre = (uniform(width - 1, 1 - width), uniform(height - 1, 1 - height))
            angle = math.radians(uniform(-self.rotation, self.rotation))
            flipped = uniform(0, 1) < 0.5 and self.flip
            contrast = uniform(1 - self.contrast, 1 + self.contrast)
            brightness = uniform(1 - self.brightness, 1 + self.brightness)
            gains = tuple(uniform(1 - self.colour, 1 + self.colour) for _ in range(shape[0]))
            sigma = uniform(*self.blur)
            noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
            changes.append(
                SampleChange(
                    crop=(width, height, *centre),
                    angle=angle,
                    flipped=flipped,
                    contrast=contrast,
                    brightness=brightness,
                    # Grey images have one channel: a per-channel gain would be a second
                    # brightness, so only colour images get them.
                    channel_gains=gains if shape[0] > 1 else (1.0,),
                    blur_sigma=sigma,
                    noise_std=self.noise,
                    noise=noise * self.noise,
                )
            )
        return changes

    def pixels(self, pixels: Tensor, trial: int, noise: bool = True) -> Tensor:
        """``pixels`` (N, C, H, W, in [0, 1]) changed as the module says, in float64;
        ``noise=False`` leaves out step 4's noise (the same parameters otherwise)."""
        import torch

        pixels = pixels.to(torch.float64)
        changes = self.draw(trial, pixels.shape[0], pixels.shape[1:])
        return torch.stack([apply(p, c, noise) for p, c in zip(pixels, changes, strict=True)])

    def __call__(
        self, images: Tensor, trial: int, mean: Sequence[float], std: Sequence[float]
    ) -> Tensor:
        """Normalised ``images`` of ``trial`` -> their changed versions, normalised."""
        import torch

        m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
        changed = self.pixels(images.to(torch.float64) * s + m, trial)
        return ((changed - m) / s).to(images.dtype)


def describe(options: Mapping[str, Any]) -> str:
    """In words, the change a track's ``private_transform`` options (no seed needed) make."""
    t = PrivateTransform.from_options({"seed": 0, **options})
    low, high = t.crop_scale
    mirror = ", mirrored with probability 1/2" if t.flip else ""
    return (
        f"cropped to a box of {low:.0%}–{high:.0%} of its area (aspect ratio "
        f"{t.crop_ratio[0]:g}–{t.crop_ratio[1]:g}) anywhere inside it, turned by up to "
        f"±{t.rotation:g}°{mirror}, its contrast and brightness scaled by up to "
        f"±{t.contrast:.0%} and ±{t.brightness:.0%} (each colour channel by up to "
        f"±{t.colour:.0%}), blurred (σ {t.blur[0]:g}–{t.blur[1]:g} px) and given Gaussian noise "
        f"of σ {t.noise:g} on every pixel"
    )


def apply(image: Tensor, change: SampleChange, noise: bool = True) -> Tensor:
    """One float64 image (C, H, W, in [0, 1]) with ``change`` applied."""
    import torch
    from torch.nn import functional as F
    from torchvision.transforms.v2.functional import gaussian_blur

    # 1. Output coordinates (x, y) in [-1, 1] -> input coordinates: crop box, turn, mirror.
    width, height, cx, cy = change.crop
    cos, sin = math.cos(change.angle), math.sin(change.angle)
    mirror = -1.0 if change.flipped else 1.0
    theta = torch.tensor(
        [[cos * width * mirror, -sin * height, cx], [sin * width * mirror, cos * height, cy]],
        dtype=torch.float64,
    )
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    out = F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )[0]
    # 2. Contrast about the mean, brightness, per-channel colour.
    mean = out.mean()
    gains = torch.tensor(change.channel_gains, dtype=torch.float64).view(-1, 1, 1)
    out = (((out - mean) * change.contrast + mean) * change.brightness * gains).clamp(0, 1)
    # 3. Blur.
    if change.blur_sigma > 0:
        taps = 2 * math.ceil(3 * change.blur_sigma) + 1
        taps = min(taps, 2 * (min(image.shape[-2:]) // 2) - 1)  # reflection needs taps < size
        sigma = [change.blur_sigma] * 2
        out = gaussian_blur(out[None], kernel_size=[taps, taps], sigma=sigma)[0]
    # 4. Noise, on pixels squeezed into [2σ, 1 − 2σ] so that the clamp leaves it whole.
    margin = 2 * change.noise_std
    out = margin + (1 - 2 * margin) * out
    if noise:
        out = out + change.noise
    return out.clamp(0, 1)
