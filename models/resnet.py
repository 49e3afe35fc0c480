"""ResNet-18 (torchvision) adapted to small inputs: a 3×3 stride-1 stem without max-pooling, as
is usual for 32×32 images, and the datamodule's channel count. Attack it in eval mode: BatchNorm
in train mode cannot take a batch of one at this resolution."""

from __future__ import annotations

from torch import nn

from leakbench.registry import register_model


@register_model("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # Imported here: torchvision's models and ops would otherwise add 0.3 s to every sandbox
    # and worker start, for a victim few runs use.
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
