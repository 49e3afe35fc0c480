"""ConvNet of Inverting Gradients (Geiping et al., NeurIPS '20): nine 3×3 conv-BN-ReLU blocks of
widths w, 2w, 2w, 4w, 4w, 4w, [max-pool 3], 4w, 4w, 4w, [max-pool 3], then a linear layer."""

from __future__ import annotations

from torch import nn

from leakbench.models._shapes import flat_features
from leakbench.registry import register_model


@register_model("convnet")
def convnet(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Sequential:
    plan = [1, 2, 2, 4, 4, 4, "pool", 4, 4, 4, "pool"]
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for step in plan:
        if step == "pool":
            layers.append(nn.MaxPool2d(3))
            continue
        out = int(step) * width
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(*features, nn.Linear(flat_features(features, input_shape), num_classes))
