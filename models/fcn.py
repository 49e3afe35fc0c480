"""Fully connected victims.

* ``fcn``: d-w_1-...-w_n-K with configurable widths, bias and activation.
* ``fcn-exan``: the ExAN paper's d-512-K ReLU net with biases (Pan et al., USENIX Sec '22, Fig. 6).
* ``fcn3``: R-GAP's FCN3, d-1000-100-K, LeakyReLU(0.2), no biases (Zhu & Blaschko, ICLR '21);
  R-GAP's single-logit output becomes K logits here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from leakbench.registry import register_model

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


@register_model("fcn")
def fcn(
    input_shape: tuple[int, ...],
    num_classes: int,
    widths: Sequence[int] = (512,),
    bias: bool = True,
    activation_name: str = "relu",
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(fan_in, width, bias=bias), activation(activation_name)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes, bias=bias))
    return nn.Sequential(*layers)


@register_model("fcn-exan")
def fcn_exan(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    return fcn(input_shape, num_classes, widths=(512,), bias=True, activation_name="relu")


@register_model("fcn3")
def fcn3(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    return fcn(
        input_shape, num_classes, widths=(1000, 100), bias=False, activation_name="leaky_relu"
    )
