"""``imprint``: a zoo victim with an imprint block in front (Fowl, Geiping, Czaja, Goldblum,
Goldstein, "Robbing the Fed: Directly Obtaining Private Data in Federated Learning with Modified
Models", ICLR 2022).

The block maps an input x of shape (C, H, W), flattened to d = C·H·W values, to

    x + readout(ReLU(measure(x)))        measure: d → k ("bins"),  readout: k → d,

and a registered zoo model (``body``, with ``body_options``) takes the result. At the zoo's
initialisation the readout is zero, so the model computes what its body computes; the server
that sends this model sets the block's weights (:mod:`leakbench.attacks.robbing_the_fed`).
Parameter names: ``imprint.measure.{weight,bias}``, ``imprint.readout.{weight,bias}``, and
``body.<the body's own names>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.registry import MODELS, register_model


class ImprintBlock(nn.Module):
    """x ↦ x + readout(ReLU(measure(flatten(x)))), reshaped back to x's shape."""

    def __init__(self, input_shape: tuple[int, ...], bins: int) -> None:
        super().__init__()
        features = math.prod(input_shape)
        self.measure = nn.Linear(features, bins)
        self.readout = nn.Linear(bins, features)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.readout(torch.relu(self.measure(x.flatten(1)))).view_as(x)


class Imprinted(nn.Module):
    """An imprint block, then the body."""

    def __init__(self, imprint: ImprintBlock, body: nn.Module) -> None:
        super().__init__()
        self.imprint = imprint
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.imprint(x))


@register_model("imprint")
def imprint(
    input_shape: tuple[int, ...],
    num_classes: int,
    bins: int = 128,
    body: str = "fcn",
    body_options: Mapping[str, Any] | None = None,
) -> Imprinted:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if body == "imprint":
        raise ValueError("the body of an imprint model must be another zoo model, not imprint")
    network = MODELS.get(body)(tuple(input_shape), num_classes, **dict(body_options or {}))
    return Imprinted(ImprintBlock(tuple(input_shape), bins), network)
