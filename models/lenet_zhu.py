"""LeNet-Zhu: the sigmoid LeNet of DLG (Zhu, Liu, Han, NeurIPS '19).

conv(C→12, k5, s2, p2) → σ → conv(12→12, k5, s2, p2) → σ → conv(12→12, k5, s1, p2) → σ → FC → K.
Weights and biases are drawn from U(−0.5, 0.5), as in DLG. For 32×32 inputs the FC layer is 768→K.
"""

from __future__ import annotations

from torch import nn

from leakbench.models._shapes import flat_features
from leakbench.registry import register_model


@register_model("lenet-zhu")
def lenet_zhu(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 12, kernel_size=5, stride=2, padding=2),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, kernel_size=5, stride=2, padding=2),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, kernel_size=5, stride=1, padding=2),
        nn.Sigmoid(),
        nn.Flatten(),
    )
    model = nn.Sequential(*features, nn.Linear(flat_features(features, input_shape), num_classes))
    for p in model.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return model
