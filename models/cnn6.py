"""CNN6 and CNN6-d, the R-GAP victims (Zhu & Blaschko, ICLR '21). No biases, LeakyReLU(0.2).

CNN6:   conv(C→12,k4,s2,p2) conv(12→36,k3,s2,p1) conv(36→36,k3,s1,p1) conv(36→36,k3,s1,p1)
        conv(36→64,k3,s2,p1) conv(64→128,k3,s1,p1) → FC → K
CNN6-d: the same with the second conv 12→20 and the third 20→36; its second layer is rank
        deficient (for 3×32×32 inputs: 280 short of the 4332 unknowns including padding).
R-GAP's single-logit output becomes K logits here.
"""

from __future__ import annotations

from torch import nn

from leakbench.models._shapes import flat_features
from leakbench.registry import register_model


def _cnn6(input_shape: tuple[int, ...], num_classes: int, width2: int) -> nn.Sequential:
    convs = [
        (input_shape[0], 12, 4, 2, 2),
        (12, width2, 3, 2, 1),
        (width2, 36, 3, 1, 1),
        (36, 36, 3, 1, 1),
        (36, 64, 3, 2, 1),
        (64, 128, 3, 1, 1),
    ]
    layers: list[nn.Module] = []
    for c_in, c_out, k, s, p in convs:
        layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=False), nn.LeakyReLU(0.2)]
    features = nn.Sequential(*layers, nn.Flatten())
    head = nn.Linear(flat_features(features, input_shape), num_classes, bias=False)
    return nn.Sequential(*features, head)


@register_model("cnn6")
def cnn6(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    return _cnn6(input_shape, num_classes, width2=36)


@register_model("cnn6-d")
def cnn6_d(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    return _cnn6(input_shape, num_classes, width2=20)
