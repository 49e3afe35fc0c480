"""Shape helpers shared by the victim builders."""

from __future__ import annotations

import math

import torch
from torch import nn


def flat_features(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of features ``features`` produces for one sample of ``input_shape``.

    Runs in eval mode so that probing the shape leaves BatchNorm running statistics untouched.
    """
    was_training = features.training
    features.eval()
    with torch.no_grad():
        n = math.prod(features(torch.zeros(1, *input_shape)).shape[1:])
    features.train(was_training)
    return n
