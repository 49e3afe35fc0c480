"""Rank analysis of R-GAP's per-layer systems, and the RA-I index (``leakbench rank``).

R-GAP (Zhu & Blaschko, ICLR '21) recovers a sample layer by layer from the top, solving for the
input ``x_i`` of layer ``i`` the linear system ``A_i = [K_i; W_i; P_i]`` (gradient, weight and
padding constraints; see :mod:`leakbench.analysis.conv_system`). The per-layer table reports:

R-GAP's quantities (as its reference code prints them):
  * unknowns of ``x_i`` with and without padding;
  * the rows of each block: gradient ``K_i``, weight ``W_i``, padding ``P_i``;
  * ``rank(A_i)`` and the deficit ``unknowns (with padding) − rank(A_i)``. A layer with a
    deficit cannot be recovered uniquely by the closed-form recursion.

Our reconstruction of R-GAP's rank analysis and of SSRAS's RA-I, not checked against the
papers' full texts, which could not be read:
  * virtual constraints ``V_i = |x_i| − rank(W_{i−1})``: ``f^{-1}(x_i)`` must lie in the range
    of the previous layer's operator, which removes that many degrees of freedom when layer
    ``i − 1`` expands. They are nonlinear through the activation, so closed-form R-GAP cannot use
    them; optimisation attacks implicitly can. ``V_1`` does not exist (the input has no parent).
  * ``RA_i = deficit_i − V_i`` (``RA_i > 0``: layer ``i`` is under-determined even with the
    virtual constraints) and the model index ``RA-I = Σ_i max(RA_i, 0)``; ``RA-I = 0`` predicts
    that the input is determined by the update.

Choices, stated:
  * ``k_i = ∂ℓ/∂(output of layer i)`` comes from a probe: a seeded standard-normal input and a
    seeded random label propagated through the model (so ReLU patterns and saturation are
    those of a real forward pass). The ranks are then the ones a trial attains almost surely.
  * After a ReLU, only the weight constraints of active units are kept (an inactive unit's
    pre-activation is unknown); a ReLU network is analysed but R-GAP itself refuses it.
  * Fully connected layer: ``A_i = [k_i ⊗ I; W_i]``; the gradient rows have ``|x_i|`` equal
    singular values ``‖k_i‖``, so ``rank(A_i) = |x_i|`` whenever ``k_i ≠ 0``.
  * Ranks are counted by SVD with numpy's default tolerance ``σ_max · max(M, N) · ε(float64)``
    (conv layers: see :meth:`ConvSystem.null_space`); all arithmetic is float64.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from leakbench.analysis.conv_system import ConvGeometry, ConvSystem, svd_rank, weight_constraints
from leakbench.interfaces import UnsupportedModelError
from leakbench.progress import track
from leakbench.registry import register_covariate

ELEMENTWISE = (nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.ReLU)
_REFUSAL_REASONS: dict[type, str] = {
    nn.modules.batchnorm._BatchNorm: "batch norm mixes the batch and its statistics into the layer",
    nn.MaxPool2d: "max-pooling is not invertible",
    nn.modules.pooling._AvgPoolNd: "pooling layers are not modelled by the layer systems",
    nn.modules.dropout._DropoutNd: "dropout is random and not invertible",
}


@dataclass(frozen=True)
class Stage:
    """One trainable layer and the element-wise activations that follow it."""

    name: str  # module path in the model, e.g. "10"
    layer: nn.Conv2d | nn.Linear
    activations: tuple[nn.Module, ...]
    in_shape: tuple[int, ...]  # per-sample input of the layer: (C, H, W) or (n,)
    out_shape: tuple[int, ...]  # per-sample output of the layer, before the activations

    def describe(self) -> str:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return f"fc {layer.in_features}→{layer.out_features}"
        k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        return f"conv {layer.in_channels}→{layer.out_channels} k{k} s{s} p{p}"

    def geometry(self) -> ConvGeometry:
        assert isinstance(self.layer, nn.Conv2d)
        return ConvGeometry.of(self.layer, self.in_shape[-2:])


def network_layers(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    """The leaf layers in forward order, refusing (naming the layer) what cannot be modelled.

    Accepted: a (nested) ``nn.Sequential`` of Conv2d and Linear layers, Flatten, and element-wise
    LeakyReLU, Sigmoid, Tanh, Identity or ReLU after a trainable layer, ending with the Linear
    layer that gives the logits.
    """
    leaves = _leaves(model, who)
    seen_trainable = False
    for name, module in leaves:
        if isinstance(module, nn.Conv2d):
            try:
                ConvGeometry.check(module)
            except ValueError as err:
                raise UnsupportedModelError(
                    f"{who} cannot handle layer '{name}' (Conv2d): {err}"
                ) from None
        elif isinstance(module, nn.Flatten):
            if (module.start_dim, module.end_dim) != (1, -1):
                raise UnsupportedModelError(
                    f"{who} cannot handle layer '{name}' (Flatten): only Flatten(1, -1)"
                )
        elif not seen_trainable and not isinstance(module, nn.Linear):
            raise UnsupportedModelError(
                f"{who} needs a trainable layer before any activation; the network starts "
                f"with '{name}' ({type(module).__name__})"
            )
        seen_trainable = seen_trainable or isinstance(module, (nn.Conv2d, nn.Linear))
    if not seen_trainable:
        raise UnsupportedModelError(f"{who} found no Conv2d or Linear layer in the network")
    last_name, last = leaves[-1]
    if not isinstance(last, nn.Linear):
        raise UnsupportedModelError(
            f"{who} needs the network to end with the Linear layer that gives the logits; "
            f"it ends with '{last_name}' ({type(last).__name__})"
        )
    return leaves


def network_stages(model: nn.Module, input_shape: tuple[int, ...], who: str) -> list[Stage]:
    """Group :func:`network_layers` into stages with their per-sample shapes."""
    stages: list[Stage] = []
    h = torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for name, module in network_layers(model, who):
            in_shape = tuple(h.shape[1:])
            h = module(h)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                stages.append(Stage(name, module, (), in_shape, tuple(h.shape[1:])))
            elif not isinstance(module, nn.Flatten):
                last = stages[-1]
                stages[-1] = replace(last, activations=(*last.activations, module))
    return stages


def _leaves(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    """The leaf modules in forward order (nested Sequentials flattened)."""
    allowed = (nn.Conv2d, nn.Linear, nn.Flatten, *ELEMENTWISE)
    if not isinstance(model, nn.Sequential):
        unsupported = [
            (n, m)
            for n, m in model.named_modules()
            if n and not list(m.children()) and not isinstance(m, allowed)
        ]
        detail = f"; its layer {_refusal(*unsupported[0])}" if unsupported else ""
        raise UnsupportedModelError(
            f"{who} needs an nn.Sequential network, not {type(model).__name__}{detail}"
        )
    leaves: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, nn.Sequential):
            continue
        if list(module.children()) or not isinstance(module, allowed):
            raise UnsupportedModelError(f"{who} cannot handle layer {_refusal(name, module)}")
        leaves.append((name, module))
    return leaves


def _refusal(name: str, module: nn.Module) -> str:
    reason = next(
        (text for kind, text in _REFUSAL_REASONS.items() if isinstance(module, kind)),
        "only Conv2d, Linear, Flatten and element-wise activations are modelled",
    )
    return f"'{name}' ({type(module).__name__}): {reason}"


@dataclass
class LayerRank:
    """One row of the rank table (see the module docstring for which columns are whose)."""

    index: int  # i, counted from the input (1-based)
    layer: str  # module path in the model
    kind: str
    unknowns_padded: int
    unknowns: int
    gradient_rows: int
    weight_rows: int
    padding_rows: int
    rank: int
    deficit: int
    tolerance: str
    virtual: int | None = None  # |x_i| − rank(W_{i−1}); None for i = 1 or when not computed
    ra: int | None = None  # deficit − virtual (our reconstruction)


@dataclass
class RankAnalysis:
    layers: list[LayerRank]
    rank_deficit: int  # Σ deficit_i (R-GAP's quantities)
    ra_index: int | None  # Σ max(RA_i, 0) (our reconstruction); None when V_i were skipped
    probe_seed: int

    def summary(self) -> dict[str, object]:
        return {
            "ra_index": self.ra_index,
            "rank_deficit": self.rank_deficit,
            "deficient_layers": [r.layer for r in self.layers if r.deficit > 0],
            "probe_seed": self.probe_seed,
        }


def analyse(
    model: nn.Module,
    input_shape: tuple[int, ...],
    seed: int = 0,
    virtual: bool = True,
    progress: bool = False,
) -> RankAnalysis:
    """Rank table and RA-I of ``model`` for single samples of ``input_shape`` (float64).

    ``virtual=False`` skips the virtual constraints (one SVD of every layer operator, the
    expensive part): R-GAP's quantities only, ``ra_index`` None. ``progress`` shows a bar per
    pass naming the layer being solved (large convolutions take minutes).
    """
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    stages = network_stages(model, tuple(input_shape), "rank analysis")
    probe = _probe(model, stages, tuple(input_shape), seed)
    layers = track(
        list(enumerate(zip(stages, probe, strict=True), start=1)),
        "rank of each layer's system",
        progress,
        name=lambda item: f"layer {item[0]} {item[1][0].name}",
    )
    rows = [_layer_rank(i, stage, k, mask) for i, (stage, (k, mask)) in layers]
    if not virtual:
        return RankAnalysis(rows, sum(r.deficit for r in rows), None, seed)
    pairs = track(
        list(zip(rows[1:], stages[:-1], strict=True)),
        "virtual constraints (SVD)",
        progress,
        name=lambda pair: f"layer {pair[0].index} {pair[0].layer}",
    )
    for row, previous in pairs:
        row.virtual = row.unknowns - svd_rank(layer_operator(previous))[0]
    for row in rows:
        row.ra = row.deficit - (row.virtual or 0)
    return RankAnalysis(
        rows, sum(r.deficit for r in rows), sum(max(r.ra or 0, 0) for r in rows), seed
    )


def _layer_rank(index: int, stage: Stage, k: np.ndarray, mask: np.ndarray | None) -> LayerRank:
    weight = stage.layer.weight.detach().numpy()
    n_in = math.prod(stage.in_shape)
    if isinstance(stage.layer, nn.Conv2d):
        geom = stage.geometry()
        system = ConvSystem(geom, weight, k, mask)
        rank_b, tolerance, _ = system.null_space()
        unknowns_padded, gradient_rows, weight_rows = (
            geom.unknowns_padded,
            geom.gradient_rows,
            system.weight_rows,
        )
        padding_rows, rank = geom.padding_rows, rank_b + geom.padding_rows
    else:
        rows_w = weight if mask is None else weight[mask.ravel()]
        if np.any(k):
            rank, tolerance = n_in, "‖k‖ > 0: full column rank"
        else:  # the gradient rows vanish; only the weight rows are left
            rank, tol = svd_rank(rows_w)
            tolerance = f"k = 0; W: {tol:.1e}"
        unknowns_padded, gradient_rows, weight_rows = n_in, weight.size, rows_w.shape[0]
        padding_rows = 0
    return LayerRank(
        index=index,
        layer=stage.name,
        kind=stage.describe(),
        unknowns_padded=unknowns_padded,
        unknowns=n_in,
        gradient_rows=gradient_rows,
        weight_rows=weight_rows,
        padding_rows=padding_rows,
        rank=rank,
        deficit=unknowns_padded - rank,
        tolerance=tolerance,
    )


def layer_operator(stage: Stage) -> np.ndarray:
    """The layer's linear map on its (unpadded) input, as a dense matrix."""
    weight = stage.layer.weight.detach().numpy()
    if isinstance(stage.layer, nn.Linear):
        return weight
    geom = stage.geometry()
    return weight_constraints(geom, weight)[:, geom.interior_columns].toarray()


def _probe(
    model: nn.Module, stages: list[Stage], input_shape: tuple[int, ...], seed: int
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per stage: ``k = ∂ℓ/∂(layer output)`` on a seeded random sample, and the ReLU row mask."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *input_shape, generator=generator, dtype=torch.float64)
    num_classes = stages[-1].layer.out_features
    label = torch.randint(num_classes, (1,), generator=generator)
    outputs: list[Tensor] = []
    masks: list[np.ndarray | None] = []
    h = x
    with torch.enable_grad():
        for stage in stages:
            if isinstance(stage.layer, nn.Linear) and h.dim() > 2:
                h = h.flatten(1)
            h = stage.layer(h)
            outputs.append(h)
            mask = torch.ones_like(h, dtype=torch.bool)
            for activation in stage.activations:
                if isinstance(activation, nn.ReLU):
                    mask &= h > 0
                h = activation(h)
            masks.append(None if bool(mask.all()) else mask[0].numpy())
        grads = torch.autograd.grad(F.cross_entropy(h, label), outputs)
    return [(g[0].numpy(), m) for g, m in zip(grads, masks, strict=True)]


_CACHE: dict[tuple[object, ...], RankAnalysis | None] = {}


def cached_analysis(model: nn.Module, input_shape: tuple[int, ...]) -> RankAnalysis | None:
    """:func:`analyse` once per (architecture, input shape, weights); None if not analysable."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    key = (repr(model), tuple(input_shape), digest.hexdigest())
    if key not in _CACHE:
        try:
            _CACHE[key] = analyse(model, tuple(input_shape))
        except UnsupportedModelError:
            _CACHE[key] = None
    return _CACHE[key]


@register_covariate("rank_index")
def rank_index(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, object] | None:
    """RA-I and R-GAP's total rank deficit of the victim (None for models it cannot analyse)."""
    analysis = cached_analysis(model, tuple(images.shape[1:]))
    return None if analysis is None else analysis.summary()


HEADER = (
    "i",
    "layer",
    "type",
    "unknowns (pad)",
    "unknowns",
    "grad rows",
    "weight rows",
    "pad rows",
    "rank(A_i)",
    "deficit",
    "virtual V_i",
    "RA_i",
)


def format_table(analysis: RankAnalysis, title: str) -> str:
    """The rank table as aligned text, with the legend saying which columns are whose."""
    body = [
        (
            r.index,
            r.layer,
            r.kind,
            r.unknowns_padded,
            r.unknowns,
            r.gradient_rows,
            r.weight_rows,
            r.padding_rows,
            r.rank,
            r.deficit,
            "—" if r.virtual is None else r.virtual,
            "—" if r.ra is None else r.ra,
        )
        for r in analysis.layers
    ]
    cells = [HEADER, *[tuple(str(v) for v in row) for row in body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = [title]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                v.ljust(w) if i in (1, 2) else v.rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        f"RA-I = {analysis.ra_index}   (R-GAP rank deficit, all layers: {analysis.rank_deficit})",
        "R-GAP's quantities: unknowns, rows, rank(A_i), deficit = unknowns (pad) − rank(A_i).",
        "Our reconstruction: V_i = |x_i| − rank(W_{i−1}), RA_i = deficit − V_i,",
        "RA-I = Σ max(RA_i, 0). Ranks by SVD, tolerance σ_max·max(M, N)·ε(float64); k from a",
        f"seeded random probe (seed {analysis.probe_seed}).",
    ]
    return "\n".join(lines)


def _resolve_shape(
    dataset: str | None, input_shape: Sequence[int] | None, num_classes: int | None
) -> tuple[tuple[int, ...], int]:
    """The input shape and class count: the dataset's, or the ones given (default 3×32×32, 10)."""
    from leakbench.registry import DATAMODULES, UnknownNameError

    if dataset is not None:
        try:
            datamodule = DATAMODULES.get(dataset)
        except UnknownNameError as err:
            raise ValueError(str(err)) from None
        if not hasattr(datamodule, "input_shape"):
            datamodule = datamodule()
        return tuple(datamodule.input_shape), int(datamodule.num_classes)
    shape = tuple(int(d) for d in input_shape) if input_shape else (3, 32, 32)
    return shape, int(num_classes) if num_classes is not None else 10


def run_rank_command(
    model: str,
    *,
    dataset: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    skip_virtual: bool = False,
    as_json: bool = False,
    progress: bool = True,
) -> int:
    """Print the rank analysis of ``model`` (built with ``seed``) for the dataset's input shape
    and classes, or for ``input_shape`` and ``num_classes``: a table, or JSON."""
    from leakbench.client import build_victim
    from leakbench.registry import UnknownNameError

    shape, classes = _resolve_shape(dataset, input_shape, num_classes)
    try:
        victim = build_victim(model, shape, classes, seed=seed, dtype=torch.float64)
    except UnknownNameError as err:
        raise ValueError(str(err)) from None
    analysis = analyse(victim, shape, seed=seed, virtual=not skip_virtual, progress=progress)
    if as_json:
        print(json.dumps({**analysis.summary(), "rows": [asdict(r) for r in analysis.layers]}))
    else:
        size = "×".join(str(d) for d in shape)
        print(format_table(analysis, f"{model}, input {size}, {classes} classes, init seed {seed}"))
    return 0
