"""The client: computes the update it shares in one FedSGD round."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def fedsgd_update(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Gradient of the mean cross-entropy of the batch w.r.t. every trainable parameter."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads, strict=True)}


def build_victim(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    **options: object,
) -> nn.Module:
    """Build a registered victim with a deterministic initialisation drawn from ``seed``."""
    from leakbench.registry import MODELS

    builder = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(tuple(input_shape), num_classes, **options)
    return model.to(dtype)
