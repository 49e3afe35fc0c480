"""Exclusivity analysis: activation patterns, exclusively activated neurons (ExANs), and the
exclusivity condition of Pan et al., "Exploring the Security Boundary of Data Reconstruction via
Neuron Exclusivity Analysis", USENIX Security 2022.

For a model and a batch x_1..x_B, every ReLU unit i of every ReLU layer l has an activation
pattern over the batch, d_m[i] = 1[a_m^l[i] > 0] with a_m^l the unit's input for sample m. For
convolutional layers a unit is one (channel, position) of the feature map. Unit i is an *ExAN*
of sample m iff it is active for m and for no other sample of the batch:

    ExAN_l(m) = { i : d_m[i] = 1 and d_m'[i] = 0 for every m' ≠ m }.

The *exclusivity condition* (the paper's insecure boundary, as restated by third-party
reproductions) holds for sample m iff it has at least ``min_last`` = 2 ExANs in the last ReLU
layer and at least ``min_other`` = 1 in every other ReLU layer; it holds for the batch iff it
holds for every sample. Batches that meet it are reconstructed exactly by the ExAN attack
(``leakbench.attacks.exan``); the others lie in the secure boundary.

ReLU layers are the ``nn.ReLU`` modules the forward pass calls, in call order; a module called
several times (torchvision's ResNet blocks reuse one) is one layer per call, named
``"<module>#<k>"``. Functional ``F.relu`` calls are invisible to this analysis.

This module is also the ``exclusivity`` covariate: the evaluator records it for every trial of
every attack, so any result can be sliced by exclusivity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.registry import register_covariate

MIN_EXANS_LAST_LAYER = 2
MIN_EXANS_OTHER_LAYERS = 1


@dataclass(frozen=True)
class ReluPattern:
    """The activation pattern of one ReLU layer over a batch."""

    name: str  # module name in the model, with "#k" for the k-th call of a reused module
    active: Tensor  # (B, units) bool: unit active (input > 0) for the sample
    unit_shape: tuple[int, ...]  # shape of one sample's units, e.g. (C, H, W) for conv layers
    producer: str | None = None  # the leaf module called just before (whose output it rectified)
    consumer: str | None = None  # the leaf module called just after

    @property
    def units(self) -> int:
        return self.active.shape[1]


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Run a forward pass without leaving a trace (BatchNorm running statistics in train mode)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def activation_patterns(model: nn.Module, images: Tensor) -> list[ReluPattern]:
    """Activation patterns of every ReLU layer for ``images``, in forward order.

    The model runs in the mode it is in (train-mode BatchNorm uses batch statistics, as on the
    client) and is left unchanged. Returns an empty list for a model without ``nn.ReLU``.
    Each pattern also names the leaf modules called just before and after the ReLU, which for
    ``Linear → ReLU → Linear`` are the layers whose gradient rows and columns the units own.
    """
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        return []
    calls: list[tuple[str, Tensor | None, tuple[int, ...]]] = []

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if isinstance(module, nn.ReLU):
                # ReLU(a) > 0 iff a > 0, also for in-place ReLUs whose input is rectified already.
                active = (output.detach() > 0).flatten(1).cpu()
                calls.append((name, active, tuple(output.shape[1:])))
            else:
                calls.append((name, None, ()))

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(recorder(name)) for name, m in leaves]
    try:
        with torch.no_grad(), buffers_restored(model):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    relu_calls = [i for i, (_, active, _) in enumerate(calls) if active is not None]
    counts: dict[str, int] = {}
    for i in relu_calls:
        counts[calls[i][0]] = counts.get(calls[i][0], 0) + 1
    seen: dict[str, int] = {}
    patterns = []
    for i in relu_calls:
        name, active, shape = calls[i]
        k = seen.get(name, 0)
        seen[name] = k + 1
        patterns.append(
            ReluPattern(
                name=f"{name}#{k}" if counts[name] > 1 else name,
                active=active,  # type: ignore[arg-type]
                unit_shape=shape,
                producer=calls[i - 1][0] if i > 0 else None,
                consumer=calls[i + 1][0] if i + 1 < len(calls) else None,
            )
        )
    return patterns


def exan_mask(active: Tensor) -> Tensor:
    """(B, units) bool: the unit is an ExAN of the sample (active for it and no other)."""
    return active & (active.sum(dim=0, keepdim=True) == 1)


def exan_counts(patterns: list[ReluPattern]) -> Tensor:
    """(B, L) int64: number of ExANs of each sample in each ReLU layer."""
    return torch.stack([exan_mask(p.active).sum(dim=1) for p in patterns], dim=1)


def condition_per_sample(
    counts: Tensor,
    min_last: int = MIN_EXANS_LAST_LAYER,
    min_other: int = MIN_EXANS_OTHER_LAYERS,
) -> Tensor:
    """(B,) bool: ≥ ``min_last`` ExANs in the last ReLU layer and ≥ ``min_other`` in the others."""
    last_ok = counts[:, -1] >= min_last
    other_ok = (counts[:, :-1] >= min_other).all(dim=1)
    return last_ok & other_ok


@dataclass(frozen=True)
class ExclusivityReport:
    """Per-sample ExAN counts of every ReLU layer of a model on one batch."""

    layers: list[str]
    units: list[int]
    counts: Tensor  # (B, L)
    condition: Tensor  # (B,) bool

    @property
    def holds(self) -> bool:
        """The exclusivity condition holds for every sample of the batch."""
        return bool(self.condition.all())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "units": self.units,
            "exans_per_sample": self.counts.tolist(),
            "min_exans_per_layer": self.counts.min(dim=0).values.tolist(),
            "condition_per_sample": self.condition.tolist(),
            "condition": self.holds,
            "min_exans_last_layer": MIN_EXANS_LAST_LAYER,
            "min_exans_other_layers": MIN_EXANS_OTHER_LAYERS,
        }


def analyse_exclusivity(model: nn.Module, images: Tensor) -> ExclusivityReport | None:
    """ExAN counts and the exclusivity condition of ``images`` on ``model`` (None: no ReLU)."""
    patterns = activation_patterns(model, images)
    if not patterns:
        return None
    counts = exan_counts(patterns)
    return ExclusivityReport(
        layers=[p.name for p in patterns],
        units=[p.units for p in patterns],
        counts=counts,
        condition=condition_per_sample(counts),
    )


@register_covariate("exclusivity")
def exclusivity_covariate(model: nn.Module, images: Tensor, labels: Tensor) -> dict | None:
    """Per-sample ExAN counts per ReLU layer, their minima, and the exclusivity condition."""
    report = analyse_exclusivity(model, images)
    return None if report is None else report.to_dict()
