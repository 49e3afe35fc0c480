"""``exan``: the ExAN attack on ReLU fully connected networks (Pan, Zhang, Yan, Zhu, Yang,
"Exploring the Security Boundary of Data Reconstruction via Neuron Exclusivity Analysis",
USENIX Security 2022, arXiv 2010.13356).

Threat model: an honest-but-curious server that knows the architecture and the parameters and
observes one FedSGD update (the mean cross-entropy gradient of a batch). The batch size and the
labels are NOT given: the attack infers both and reports them. Victims: ``nn.Sequential`` of
``Flatten``, then (``Linear``, ``ReLU``) × L, then ``Linear`` (L ≥ 1), with or without biases.

Notation (ours, following the paper's). Layers l = 1..H (H = L + 1), a_m^l = W_l h_m^{l-1} + b_l,
h_m^l = ReLU(a_m^l), h_m^0 = x_m, logits z_m = a_m^H. Per-sample loss vector
g_m = softmax(z_m) − e_{y_m}; δ_m^H = g_m, δ_m^l = D_m^l W_{l+1}ᵀ δ_m^{l+1} with the activation
pattern D_m^l = diag(1[a_m^l > 0]). The update is Ḡ_l = (1/M) Σ_m δ_m^l h_m^{l-1}ᵀ and
ḡ_l = (1/M) Σ_m δ_m^l. A unit is an ExAN of sample m when only m activates it
(:mod:`leakbench.analysis.exclusivity`).

Identities the attack rests on (exact at an ExAN j of sample m in ReLU layer l):

* column j of Ḡ_{l+1} is (1/M) h_m^l[j] δ_m^{l+1}; for l = L it is a positive multiple of g_m;
* row j of Ḡ_l is (1/M) δ_m^l[j] h_m^{l-1}ᵀ, and ḡ_l[j] = (1/M) δ_m^l[j], so with a bias
  h_m^{l-1} = Ḡ_l[j, :] / ḡ_l[j] exactly (the bias trick, made valid in a batch by exclusivity),
  and without one the row gives h_m^{l-1} up to scale; its support is sample m's pattern in
  layer l − 1.

Algorithm (float64 throughout):

1. Grouping (Algorithm B.1, made robust). Every unit j of the last ReLU layer with a non-zero
   column c_j of Ḡ_H and a non-zero row r_j of Ḡ_L gets the signature (c_j/‖c_j‖, ±r_j/‖r_j‖).
   Units are linked when both directions agree within ``tolerance`` (chord distance, the row up
   to sign): ExANs of one sample share their signature. Connected components with at least
   ``min_group_size`` units are candidate groups; a candidate is valid only if its column
   direction is a softmax-minus-one-hot vector (exactly one negative entry; without a bias in
   the last ReLU layer also entries summing to zero within ``tolerance``, with one the scale
   test checks the direction against an actual one). Its negative entry is its label
   (Algorithm B.2). The row half of
   the signature is our addition: it removes the spurious groups of mixed columns that
   column-only grouping produces, and the column alone cannot separate two
   samples of one class when K = 2 (every g_m of class 0 is a multiple of (−1, 1)).
2. Scale test (our addition; needs a bias in the last ReLU layer). With collinear loss vectors
   (K = 2) all units active for the same set of samples share one signature too, so valid
   groups of shared units exist. A group's bias ratio (step 3) is a candidate input v_g of
   layer L, exact for a true sample; a forward pass through the last two layers gives its
   loss vector g_g and hence predictions of its units' columns of Ḡ_H and entries of ḡ_L. A
   true sample's observed values are exactly 1/M times its predictions; a group of shared
   units is proportional with another factor, or not at all. The groups whose factor is 1/M
   for an integer M, for the M most groups agree on, are the samples, and M is the inferred
   batch size; it exceeds the number of groups when some samples have too few ExANs to be
   found, which lets the attack return the samples it can recover outside the insecure
   boundary and still report the right batch size. The loss vectors g_g are exact. Without that
   bias, every valid group is a sample (with K = 2 the batch size may then be overestimated).

   Tolerances relative to each candidate's scale (trained, confident victims). An ExAN column
   or row is a single product, exact to a few machine epsilons of the update, so signatures are
   also compared exactly (difference of unit vectors, not cosines, which resolve only
   ~sqrt(eps)) within ``LINK_EPS`` = 1024 epsilons: a unit shared with a sample whose loss
   vector is 1e-8 of the other's is no longer taken for an ExAN of the other, which made that
   sample inexact (MSE 1e-15 instead of 1e-32). A loss vector g = softmax(z) − e_y is known
   only to ~eps in probability units (the cancellation p_y − 1), i.e. to eps/‖g‖ relative, so
   each group's proportionality and 1/M tests allow 1024 eps + ``LOSS_EPS`` (64) eps/‖g_g‖ (in
   float32 at most ``tolerance`` for the first term), and only groups precise enough to tell
   M from M ± 1 vote on M; the others are kept when they fit the voted M to their precision.
   The final gradient-residual check allows the same widening for the largest loss vector.
3. Top-down (Algorithm B.3). For l = L..1 and each sample, the rows of Ḡ_l at its ExANs give
   v_m^{l-1}: with a bias the least-squares ratio Σ_j ḡ_l[j] Ḡ_l[j, :] / Σ_j ḡ_l[j]² (exactly
   h_m^{l-1}); without one the leading right singular vector (h_m^{l-1} up to a positive scale,
   the sign chosen so that the ExANs are active). Only the largest set of rows that agree is
   used: a unit shared with a sample the attack did not find looks exclusive but disagrees. A
   sample whose rows are ambiguous (ties, or a lone row while samples are missing) or who has
   no ExAN is dropped; the trial fails when no sample is left, or without a first-layer bias.
   The support of v_m^{l-1} is the pattern of layer l − 1, and the units active for exactly one
   recovered sample are the ExANs of layer l − 1. The pattern of every ReLU layer follows from
   a_m^l = W_l v_m^{l-1} (+ b_l), whose signs are exact in both cases (positive homogeneity
   without a bias).
4. Inputs. With a first-layer bias, x_m = v_m^0 exactly (ratio at first-layer ExANs). Without
   one, Δ^1 = [δ_1^1 … δ_M^1] comes from back-propagating g_m through the recovered patterns,
   and X solves M Ḡ_1 = Δ^1 Xᵀ by least squares (unique iff rank Δ^1 = M, which first-layer
   ExANs guarantee). When the last ReLU layer has no bias either, g_m = s_m u_m takes its scale
   from the paper's heuristic: |g_{m,y}| = 1 − p_Y with p_Y = ``assumed_label_probability``
   = 1/3 (the pseudo-code's g_{m1} = 2/3 of its upper bound). A wrong s_m only rescales x_m by
   the inverse factor, so the output is exact up to a per-sample scale, and the system stays
   consistent; a residual above ``tolerance`` means samples are missing and fails the trial.

Diagnostics in ``info``: candidate, rejected (invalid direction) and dropped (scale test)
groups, samples found and dropped, ExANs per recovered sample and layer, the loss-scale source,
and the share of the update the reconstruction leaves unexplained (``gradient_residual``: ≈ 0
when the attack is exact and complete). Degenerate numerics (no valid group, no group with an
integral scale or an ambiguous one, zero bias gradients at every ExAN of a sample, a
rank-deficient or inconsistent first-layer system, no sample left, or an exact answer for the
whole batch whose residual exceeds ``tolerance``) end the trial with :class:`TrialFailure`.

Client protocols: all, the update read through :func:`leakbench.client.fedsgd_equivalent` as
the FedSGD gradient of every sample behind it (our extension; the paper treats FedSGD). Exact
for a sum of K FedSGD clients when ``Capability.LOCAL_HYPERPARAMETERS`` gives K (the sum is K
times the mean over all K·B samples, so the attack sees one batch of K·B and infers M = K·B;
without K the 1/M scale test sees the wrong scale) and for one full-batch FedAvg step. After
several local steps the identities above hold only at θ_0 while the delta mixes gradients at
moving weights: groups stop being exact and the residual check usually fails the trial.

Hyperparameters (documented defaults):

* ``tolerance`` (None): what counts as equal: chord distances of grouping and of row
  agreement, the sum of a loss-vector direction, the relative residual and the deviation from
  1/M of the scale test, and the first-layer system's residual. None
  picks 1e-6 for a float64 update and 1e-4 for a float32 one (ExAN columns and rows are single
  products, exact to ~1e-7 in float32; shared units differ by orders of magnitude more).
* ``min_group_size`` (2): units per group, the "≥ 2 ExANs in the last ReLU layer" of the
  exclusivity condition.
* ``assumed_label_probability`` (1/3): p_Y of the no-bias scale heuristic.
* ``support_tolerance`` (0.0): an entry of v_m^{l-1} counts as active when it exceeds this
  fraction of the vector's largest entry (exact zeros stay zeros in float32 too).
* ``rank_tolerance`` (1e-10): relative singular-value cut for rank Δ^1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from leakbench.analysis.exclusivity import exan_mask
from leakbench.client import EVERY_PROTOCOL, fedsgd_equivalent
from leakbench.interfaces import Attack, TrialFailure, UnsupportedModelError
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction

DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}  # cosine-resolved comparisons
FALLBACK_TOLERANCE = 1e-3  # float16 / bfloat16 updates
# Chord distances between units compare exact single products (ExAN columns h_j g, rows
# δ_j x), equal to a few machine epsilons of the update: anything further apart is another
# sample's contribution, however small that sample's loss vector.
LINK_EPS = 1024
# A loss vector g = softmax(z) − e_y is known to ~eps in probability units (the cancellation
# p_y − 1), i.e. to eps / ‖g‖ relative: a confident sample's checks widen by that much.
LOSS_EPS = 64


def link_tolerance(tolerance: float, precision: float) -> float:
    """The chord tolerance of grouping and row agreement (``precision``: the update's eps)."""
    return min(tolerance, LINK_EPS * precision) if precision > 0 else tolerance


def loss_tolerance(tolerance: float, precision: float, loss_norm: Tensor) -> Tensor:
    """Per candidate: ``tolerance`` widened by the relative precision of its loss vector."""
    return tolerance + LOSS_EPS * precision / loss_norm


@dataclass
class LayerTensors:
    """One Linear (or Conv2d) layer's parameters and shared gradients, in float64."""

    name: str  # "layer <index> (Linear)"
    weight: Tensor  # (out, in) or (out, in, kh, kw)
    bias: Tensor | None
    weight_grad: Tensor
    bias_grad: Tensor | None


def describe(index: int | str, module: nn.Module) -> str:
    return f"layer {index} ({type(module).__name__})"


def fcn_linear_layers(
    layers: list[tuple[str, nn.Module]], attack: str = "the ExAN attack"
) -> list[tuple[str, nn.Linear]]:
    """Validate a head ``[Linear, ReLU, ..., Linear]`` and return its ``(name, Linear)`` pairs.

    ``layers`` are the head's ``(name, module)`` in forward order. Refuses, naming the layer, any
    module other than Linear/ReLU, a ReLU that does not follow a Linear, two Linears in a row,
    a head that does not end with a Linear, and a head without ReLU.
    """
    linears: list[tuple[str, nn.Linear]] = []
    previous: nn.Module | None = None
    for name, module in layers:
        if isinstance(module, nn.Linear):
            if isinstance(previous, nn.Linear):
                raise UnsupportedModelError(
                    f"{describe(name, module)} follows a Linear without a ReLU in between; "
                    f"{attack} needs (Linear, ReLU) pairs followed by the output Linear"
                )
            linears.append((name, module))
        elif type(module) is nn.ReLU:
            if not isinstance(previous, nn.Linear):
                raise UnsupportedModelError(
                    f"{describe(name, module)} does not follow a Linear layer; {attack} needs "
                    f"(Linear, ReLU) pairs followed by the output Linear"
                )
        else:
            raise UnsupportedModelError(
                f"{describe(name, module)} is not supported by {attack}: the fully connected "
                f"part may hold only Linear and ReLU layers"
            )
        previous = module
    if not linears:
        raise UnsupportedModelError(f"{attack} needs a Linear output layer; the model has none")
    if not isinstance(previous, nn.Linear):
        raise UnsupportedModelError(
            f"{describe(*layers[-1])} is the last layer; {attack} needs the logits to come from "
            f"a Linear layer"
        )
    if len(linears) < 2:
        raise UnsupportedModelError(
            f"{attack} needs at least one ReLU layer between Linear layers; the fully connected "
            f"part is a single Linear"
        )
    return linears


def sequential_children(model: nn.Module, attack: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModelError(
            f"{attack} needs an nn.Sequential victim; got {type(model).__name__}"
        )
    return list(model.named_children())


def fcn_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers of a supported ReLU FCN (``Flatten`` first, then the head)."""
    children = sequential_children(model, "the ExAN attack")
    head = children
    while head and isinstance(head[0][1], nn.Flatten):
        if head[0][1].start_dim != 1:
            raise UnsupportedModelError(
                f"{describe(*head[0])} flattens from dimension {head[0][1].start_dim}; the ExAN "
                f"attack needs Flatten(start_dim=1)"
            )
        head = head[1:]
    return fcn_linear_layers(head)


def gather_layers(
    observation: Observation, modules: list[tuple[str, nn.Module]], attack: str = "the ExAN attack"
) -> list[LayerTensors]:
    """Parameters and shared gradients of ``modules`` in float64; refuses a missing tensor."""
    gathered = []
    for name, layer in modules:
        grads = {}
        for kind in ("weight", "bias"):
            param = getattr(layer, kind)
            if param is None:
                continue
            key = f"{name}.{kind}"
            grad = observation.update.get(key)
            if grad is None:
                raise ValueError(
                    f"the shared update lacks the {kind} gradient of {describe(name, layer)} "
                    f"({key!r}); {attack} needs the gradient of every layer it inverts"
                )
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(
                    f"the {kind} gradient of {describe(name, layer)} has shape "
                    f"{tuple(grad.shape)}, expected {tuple(param.shape)}"
                )
            grads[kind] = grad.detach().to(torch.float64).cpu()
        gathered.append(
            LayerTensors(
                name=describe(name, layer),
                weight=layer.weight.detach().to(torch.float64).cpu(),
                bias=None if layer.bias is None else layer.bias.detach().to(torch.float64).cpu(),
                weight_grad=grads["weight"],
                bias_grad=grads.get("bias"),
            )
        )
    return gathered


@dataclass
class Grouping:
    """Groups of last-ReLU-layer units whose column and row signatures agree (step 1)."""

    exans: list[Tensor]  # per group, its units: a sample's ExANs for a true group
    directions: Tensor  # (groups, K) unit loss-vector directions u_g
    candidates: int  # components with at least min_group_size units
    rejected: int  # candidates whose direction is not a softmax-minus-one-hot vector


def _links(vectors: Tensor, tolerance: float, up_to_sign: bool) -> Tensor:
    """Pairs of rows whose directions agree within ``tolerance`` (chord distance)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    gram = unit @ unit.T
    if up_to_sign:
        gram = gram.abs()
    return gram >= 1.0 - 0.5 * tolerance**2  # sqrt(2 − 2 cos) ≤ tolerance


def _components(links: Tensor) -> list[Tensor]:
    count, label = connected_components(csr_matrix(links.numpy()), directed=False)
    label = torch.from_numpy(label)
    return [torch.nonzero(label == c).flatten() for c in range(count)]


def _agreeing_sets(
    vectors: Tensor, tolerance: float, up_to_sign: bool, link: float | None = None
) -> list[Tensor]:
    """Sets of rows whose directions agree; one set at once when all agree with the first.

    Directions are compared through cosines, which resolve chord distances only down to
    ~sqrt(eps) (1e-8 in float64). With ``link`` below ``tolerance`` every such set is split
    further by exact chord distances (:func:`_exact_split`).
    """
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cosine = unit @ unit[0]
    if up_to_sign:
        cosine = cosine.abs()
    if bool((cosine >= 1.0 - 0.5 * tolerance**2).all()):
        sets = [torch.arange(len(vectors))]
    else:
        sets = _components(_links(vectors, tolerance, up_to_sign))
    if link is None or link >= tolerance:
        return sets
    return [part for members in sets for part in _exact_split(unit, members, link, up_to_sign)]


def _exact_split(unit: Tensor, members: Tensor, link: float, up_to_sign: bool) -> list[Tensor]:
    """Components of ``members`` linked within ``link``, measured as the norm of the difference
    of their unit vectors (signs aligned to the first when ``up_to_sign``), exact to rounding."""
    if members.numel() == 1:
        return [members]
    u = unit[members]
    if up_to_sign:  # the set agrees up to sign: align every direction with the first
        u = u * torch.where(u @ u[0] < 0, -1.0, 1.0).to(u.dtype)[:, None]
    chords = torch.cdist(u, u, compute_mode="donot_use_mm_for_euclid_dist")
    return [members[part] for part in _components(chords <= link)]


def units_agree(columns: Tensor, rows: Tensor, tolerance: float, link: float | None = None) -> bool:
    """Whether units could be ExANs of one sample: their columns of Ḡ_H agree in direction and
    their rows of Ḡ_L up to sign (chord distances within ``tolerance``, and ``link``)."""
    return (
        len(_agreeing_sets(columns, tolerance, False, link)) == 1
        and len(_agreeing_sets(rows, tolerance, True, link)) == 1
    )


def group_last_layer(
    output_grad: Tensor,
    last_relu_grad: Tensor,
    tolerance: float,
    min_group_size: int,
    link: float | None = None,
    check_sum: bool = True,
) -> Grouping:
    """Group the units of the last ReLU layer (step 1 of the module docstring).

    ``output_grad`` is Ḡ_H (K × n), ``last_relu_grad`` is Ḡ_L (n × d); units are linked within
    ``tolerance`` and, exactly, within ``link`` (see :func:`_agreeing_sets`); the direction's
    sum is checked only with ``check_sum``.
    """
    columns = output_grad.T
    units = torch.nonzero((columns.norm(dim=1) > 0) & (last_relu_grad.norm(dim=1) > 0)).flatten()
    if units.numel() == 0:
        raise TrialFailure("no unit of the last ReLU layer has a non-zero gradient")
    # Rows are compared only within a set of units whose columns agree (cheap for K > 2).
    groups = []
    for column_set in _components(_links(columns[units], tolerance, False)):
        if column_set.numel() >= min_group_size:
            linked = units[column_set]
            for rows in _agreeing_sets(last_relu_grad[linked], tolerance, True, link):
                members = linked[rows]
                # Columns too, exactly: a tiny loss vector tilts a shared unit's column alone.
                groups += [
                    members[c] for c in _agreeing_sets(columns[members], tolerance, False, link)
                ]
    groups.sort(key=lambda g: int(g.min()))
    return validated_grouping(columns, groups, tolerance, min_group_size, check_sum)


def validated_grouping(
    columns: Tensor,
    groups: list[Tensor],
    tolerance: float,
    min_group_size: int,
    check_sum: bool = True,
) -> Grouping:
    """Keep the candidate groups whose summed column is a softmax-minus-one-hot direction.

    ``columns`` are the units' columns of Ḡ_H (n × K); ``groups`` are candidate unit sets, kept
    in the given order; those with fewer than ``min_group_size`` units are no candidates. A
    valid direction has one negative entry and, with ``check_sum``, sums to zero within
    ``tolerance``. The sum is only as exact as the loss vector's scale allows (a confident
    sample's g_y = p_y − 1 cancels), so where the scale test follows (a bias in the last ReLU
    layer) it is left to that test, which compares each group with an actual softmax-minus-
    one-hot vector to its own precision.
    """
    exans, directions = [], []
    candidates = rejected = 0
    for members in groups:
        if members.numel() < min_group_size:
            continue
        candidates += 1
        direction = columns[members].sum(dim=0)
        direction = direction / direction.norm()
        bad_sum = check_sum and abs(float(direction.sum())) > tolerance
        if int((direction < 0).sum()) != 1 or bad_sum:
            rejected += 1
            continue
        exans.append(members)
        directions.append(direction)
    if not exans:
        raise TrialFailure(
            f"no valid group of last-layer gradient columns ({candidates} candidate groups of "
            f"≥ {min_group_size} units, {rejected} rejected as invalid loss vectors)"
        )
    return Grouping(
        exans=exans,
        directions=torch.stack(directions),
        candidates=candidates,
        rejected=rejected,
    )


def previous_activation(
    layer: LayerTensors,
    exans: Tensor,
    tolerance: float,
    support_tolerance: float,
    trust_single_row: bool,
    link: float | None = None,
) -> Tensor | None:
    """v^{l-1} of one sample from its ExAN rows in ``layer`` (step 2), or None if ambiguous.

    Only the largest set of rows that agree (bias ratios, or directions up to sign, within
    ``tolerance``) is used: a unit that looks exclusive but is shared with a sample the attack
    did not find disagrees with the sample's true ExANs. A tie between sets is ambiguous, and
    so is a lone row unless ``trust_single_row`` (every sample of the batch was found).
    """
    if layer.bias_grad is not None:
        exans = exans[layer.bias_grad[exans] != 0]
        if exans.numel() == 0:
            raise TrialFailure(f"every ExAN of a sample in {layer.name} has a zero bias gradient")
        rows, bias_rows = layer.weight_grad[exans], layer.bias_grad[exans]
        sets = _agreeing_sets(rows / bias_rows[:, None], tolerance, False, link)
    else:
        exans = exans[layer.weight_grad[exans].norm(dim=1) > 0]
        if exans.numel() == 0:
            raise TrialFailure(f"every ExAN row of a sample in {layer.name} is zero")
        rows = layer.weight_grad[exans]
        sets = _agreeing_sets(rows, tolerance, True, link)
    sizes = sorted((len(s) for s in sets), reverse=True)
    if (len(sizes) > 1 and sizes[0] == sizes[1]) or (sizes[0] == 1 and not trust_single_row):
        return None
    agreeing = max(sets, key=len)
    exans, rows = exans[agreeing], rows[agreeing]
    if layer.bias_grad is not None:
        bias_rows = bias_rows[agreeing]
        v = bias_rows @ rows / (bias_rows @ bias_rows)
    else:
        v = torch.linalg.svd(rows, full_matrices=False).Vh[0]
        # The ExANs are active: a_j = W_j v > 0 fixes the sign of the direction.
        if float((layer.weight[exans] @ v).sum()) < 0:
            v = -v
    # Entries the rows do not touch are exact zeros (inactive units below), not SVD round-off.
    v = torch.where(rows.abs().amax(dim=0) > 0, v, torch.zeros_like(v))
    return _clip_support(v, support_tolerance)


def _clip_support(values: Tensor, support_tolerance: float) -> Tensor:
    """Zero the entries at most ``support_tolerance`` times their row's largest magnitude."""
    if support_tolerance == 0:
        return values
    largest = values.abs().amax(dim=-1, keepdim=True)
    return torch.where(values.abs() > support_tolerance * largest, values, torch.zeros_like(values))


@dataclass
class ScaleSelection:
    """Groups kept by the gradient-scale test, the batch size, and their exact loss vectors."""

    keep: list[int]
    batch_size: int
    loss_vectors: Tensor  # (kept, K)
    residual_max: float


def group_bias_ratios(layer: LayerTensors, groups: list[Tensor]) -> Tensor:
    """Least-squares bias ratio Σ_j ḡ[j] Ḡ[j, :] / Σ_j ḡ[j]² of every group, (groups, d).

    For the groups of the last ReLU layer, whose rows already agree in direction, this is
    step 3's estimate for all groups at once. A group whose bias gradients all vanish gets NaN.
    """
    weights = torch.zeros(len(groups), layer.weight_grad.shape[0], dtype=torch.float64)
    for g, units in enumerate(groups):
        weights[g, units] = layer.bias_grad[units]
    norms = (weights**2).sum(dim=1, keepdim=True)
    ratios = weights @ layer.weight_grad / norms
    # Entries no row of the group touches are exact zeros (inactive units below).
    touched = (weights != 0).to(torch.float64) @ (layer.weight_grad != 0).to(torch.float64)
    ratios = torch.where(touched > 0, ratios, torch.zeros_like(ratios))
    return torch.where(norms > 0, ratios, torch.full_like(ratios, math.nan))


def select_by_gradient_scale(
    grouping: Grouping,
    inputs: Tensor,
    last_relu: LayerTensors,
    output: LayerTensors,
    tolerance: float,
    precision: float = 0.0,
) -> ScaleSelection:
    """Keep the groups that are samples, and infer M (needs a bias in the last ReLU layer L).

    A group's candidate input v_g of layer L (``inputs``, one row per group) and its label
    give, by a forward pass through the last two layers, its hidden values h_g and loss vector
    g_g, hence predictions of the observed column j of Ḡ_H and of ḡ_L[j] at its units:
    h_g[j] g_g and (W_Hᵀ g_g)[j] 1[a_j > 0]. For a true sample the observed values are exactly
    1/M times the predictions. A group of shared units (collinear loss vectors, K = 2) is often
    also proportional to its predictions, but with another factor. Groups proportional within
    ``tolerance`` whose factor ρ is 1/M for an integer M are kept; the M most groups agree on is
    the inferred batch size (it exceeds the number of kept groups when some samples have too
    few ExANs to be found). A group of shared units can fit some M by coincidence, so a decision
    needs a strict majority, and a lone fitting group must be the only proportional one;
    otherwise the trial fails as ambiguous (when only one sample is found nothing tells it from
    such a group).

    Each group's tolerance is relative to its own scale (:func:`loss_tolerance`): a confident
    sample's loss vector, hence its observed gradients, is known only to ``precision`` / ‖g_g‖.
    Only groups precise enough to tell M from M ± 1 vote on the batch size; a less precise
    group is kept when it is proportional with the voted factor 1/M within its tolerance.
    """
    labels = grouping.directions.argmin(dim=1)
    pre = inputs @ last_relu.weight.T + last_relu.bias  # (groups, n)
    hidden = pre.clamp(min=0)
    logits = hidden @ output.weight.T
    if output.bias is not None:
        logits = logits + output.bias
    loss = logits.softmax(dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    # Per unit of each group: its predicted and observed column of Ḡ_H and entry of ḡ_L,
    # reduced to the three inner products the proportionality fit needs.
    group_of = torch.cat([torch.full_like(u, g) for g, u in enumerate(grouping.exans)])
    units = torch.cat(grouping.exans)
    h = hidden[group_of, units]
    bias_predicted = (loss @ output.weight)[group_of, units] * (pre[group_of, units] > 0)
    observed_columns = output.weight_grad[:, units].T
    observed_bias = last_relu.bias_grad[units]
    loss_g = loss[group_of]

    def per_group(values: Tensor) -> Tensor:
        return torch.zeros(len(grouping.exans), dtype=torch.float64).index_add_(0, group_of, values)

    po = per_group(h * (loss_g * observed_columns).sum(dim=1) + bias_predicted * observed_bias)
    pp = per_group(h**2 * (loss_g**2).sum(dim=1) + bias_predicted**2)
    oo = per_group((observed_columns**2).sum(dim=1) + observed_bias**2)
    rho = po / pp
    # ‖o − ρp‖ / ‖o‖ from the differences themselves: through oo − ρ·po it would resolve only
    # ~sqrt(eps), too coarse for exact products.
    r = rho[group_of]
    miss = ((observed_columns - (r * h)[:, None] * loss_g) ** 2).sum(dim=1)
    miss = miss + (observed_bias - r * bias_predicted) ** 2
    residual = (per_group(miss) / oo).sqrt()
    # Observed and predicted values are exact products up to rounding and the loss vector's
    # own precision: the fit's tolerance is the chord one widened to each group's scale.
    allowed = loss_tolerance(link_tolerance(tolerance, precision), precision, loss.norm(dim=1))
    proportional = (pp > 0) & (rho > 0) & (residual <= allowed) & torch.isfinite(rho)
    factors: dict[int, list[int]] = {}
    coarse = []
    for g in torch.nonzero(proportional).flatten().tolist():
        m = round(1 / float(rho[g]))
        if float(allowed[g]) * (m + 1) >= 0.5:  # cannot tell M from M ± 1
            coarse.append(g)
        elif m >= 1 and abs(float(rho[g]) * m - 1) <= float(allowed[g]):
            factors.setdefault(m, []).append(g)
    feasible = sorted(
        (m for m, groups in factors.items() if len(groups) <= m), key=lambda m: -len(factors[m])
    )
    if not feasible:
        raise TrialFailure(
            f"no group's gradients are 1/M times those of its reconstruction for an integer M "
            f"({len(grouping.exans)} valid groups)"
        )
    if len(feasible) > 1 and len(factors[feasible[0]]) == len(factors[feasible[1]]):
        tied = sorted(m for m in feasible if len(factors[m]) == len(factors[feasible[0]]))
        raise TrialFailure(
            f"ambiguous batch size: as many groups fit M = {tied[0]} as M = {tied[1]} "
            f"({len(factors[tied[0]])} each)"
        )
    batch_size = feasible[0]
    keep = factors[batch_size]
    others = int(proportional.sum()) - len(coarse) - 1
    if len(keep) == 1 and others > 0:
        raise TrialFailure(
            f"ambiguous batch size: a single group fits M = {batch_size}, and {others} other "
            f"groups are proportional to their reconstructions with other factors"
        )
    # Less precise groups join when they fit the voted M, best fits first, up to M groups.
    fits = {g: abs(float(rho[g]) * batch_size - 1) / float(allowed[g]) for g in coarse}
    extra = sorted((g for g, fit in fits.items() if fit <= 1), key=lambda g: fits[g])
    keep = sorted(keep + extra[: batch_size - len(keep)])
    return ScaleSelection(
        keep=keep,
        batch_size=batch_size,
        loss_vectors=loss[keep],
        residual_max=float(residual[proportional].max()),
    )


@dataclass
class FCNRecovery:
    """What the ExAN attack recovers from the gradients of a ReLU FCN head."""

    inputs: Tensor  # (N, d) head inputs of the recovered samples: exact with a first-layer bias
    labels: Tensor  # (N,)
    batch_size: int  # inferred M ≥ N
    loss_vectors: Tensor  # (N, K) g_m, exact ("bias") or by the p_Y heuristic
    loss_scale: str
    patterns: list[Tensor]  # per ReLU layer, (N, n_l) bool
    inputs_exact: bool
    info: dict[str, Any] = field(default_factory=dict)


def recover_fcn(
    layers: list[LayerTensors],
    *,
    tolerance: float,
    min_group_size: int,
    assumed_label_probability: float,
    support_tolerance: float,
    rank_tolerance: float,
    precision: float = 0.0,
    grouping: Grouping | None = None,
) -> FCNRecovery:
    """Steps 1-4 of the module docstring on a head given as its Linear layers.

    ``precision`` is the machine epsilon of the update's dtype (0: use ``tolerance`` alone);
    it sets the chord tolerance (:func:`link_tolerance`) and each group's loss-vector
    tolerance (:func:`loss_tolerance`). ``grouping`` replaces step 1 when the last ReLU
    layer's groups are known beforehand (the fishing attack assigns them; see
    :func:`validated_grouping`).
    """
    relu_layers = layers[:-1]
    last, output = relu_layers[-1], layers[-1]
    link = link_tolerance(tolerance, precision)
    if grouping is None:
        grouping = group_last_layer(
            output.weight_grad,
            last.weight_grad,
            tolerance,
            min_group_size,
            link=link,
            check_sum=last.bias_grad is None,
        )
    info: dict[str, Any] = {
        "groups_candidate": grouping.candidates,
        "groups_rejected": grouping.rejected,
        "tolerance": tolerance,
    }
    labels = grouping.directions.argmin(dim=1)
    if last.bias_grad is not None:
        top = _clip_support(group_bias_ratios(last, grouping.exans), support_tolerance)
        zero_bias = int(top.isnan().any(dim=1).sum())
        if zero_bias == len(top):
            raise TrialFailure(
                f"every unit of every group in {last.name} has a zero bias gradient: no bias "
                f"ratio exists"
            )
        info["groups_with_zero_bias_gradient"] = zero_bias
        selection = select_by_gradient_scale(grouping, top, last, output, tolerance, precision)
        keep, batch_size = selection.keep, selection.batch_size
        loss_vectors, loss_scale = selection.loss_vectors, "bias"
        info["groups_dropped_by_scale_test"] = len(grouping.exans) - len(keep)
        info["scale_test_residual_max"] = selection.residual_max
    else:
        # Without the scale test every group counts as a sample.
        estimates = [
            previous_activation(last, exans, tolerance, support_tolerance, True, link)
            for exans in grouping.exans
        ]
        if any(v is None for v in estimates):
            raise TrialFailure(f"the ExAN rows of a group in {last.name} disagree")
        top = torch.stack(estimates)  # type: ignore[arg-type]
        keep, batch_size = list(range(len(top))), len(top)
        u = grouping.directions
        # |g_y| = 1 − p_Y fixes the scale of g = s u (the paper's heuristic).
        loss_vectors = u * (1.0 - assumed_label_probability) / u.gather(1, labels[:, None]).abs()
        loss_scale = "heuristic"
    labels = labels[keep]
    exans = [grouping.exans[g] for g in keep]
    complete = len(keep) == batch_size

    # Step 2, top-down: values[k] is v^k, the input of Linear k+1 (values[0] = x), read from the
    # ExAN rows of relu_layers[k]; its support gives the ExANs of the ReLU layer below.
    values: list[Tensor] = [torch.empty(0)] * len(relu_layers)
    values[-1] = top[keep]
    exan_counts = [[int(e.numel()) for e in exans]]
    alive = torch.ones(len(keep), dtype=torch.bool)
    for k in range(len(relu_layers) - 2, -1, -1):
        mask = exan_mask(values[k + 1] > 0)
        exans = [torch.nonzero(row).flatten() for row in mask]
        exan_counts.insert(0, [int(e.numel()) for e in exans])
        recovered = []
        for sample, sample_exans in enumerate(exans):
            v = None
            if alive[sample] and sample_exans.numel() > 0:
                v = previous_activation(
                    relu_layers[k], sample_exans, tolerance, support_tolerance, complete, link
                )
            if v is None:
                alive[sample] = False
                v = torch.zeros(relu_layers[k].weight.shape[1], dtype=torch.float64)
            recovered.append(v)
        values[k] = torch.stack(recovered)
        complete = complete and bool(alive.all())
    if not bool(alive.all()) and (relu_layers[0].bias is None or not bool(alive.any())):
        lost = torch.nonzero(~alive).flatten().tolist()
        raise TrialFailure(
            f"recovered samples {lost} have no ExAN (or no consistent one) in some ReLU layer: "
            f"the batch is outside the insecure boundary"
        )

    # Pattern of the ReLU after relu_layers[k]: the sign of its input computed from values[k]
    # (exact, or up to a positive scale exactly when that layer has no bias).
    patterns = []
    for k, layer in enumerate(relu_layers):
        pre = values[k] @ layer.weight.T
        if layer.bias is not None:
            pre = pre + layer.bias
        patterns.append(pre > 0)

    inputs_exact = relu_layers[0].bias is not None
    if inputs_exact:
        inputs = values[0]
    else:
        inputs = _least_squares_inputs(
            layers, patterns, loss_vectors, batch_size, rank_tolerance, tolerance
        )
        # The first-layer ExAN rows are multiples of x_m: where they vanish x_m is exactly zero
        # (e.g. an inactive unit when the input is a conv ReLU output), not LS round-off.
        inputs = torch.where(values[0] != 0, inputs, torch.zeros_like(inputs))
    info.update(
        {
            "exans_per_layer": exan_counts,  # [ReLU layer][recovered sample]
            "samples_found": len(keep),
            "samples_dropped": int((~alive).sum()),
            "loss_scale": loss_scale,
            "inputs_exact": inputs_exact,
        }
    )
    return FCNRecovery(
        inputs=inputs[alive],
        labels=labels[alive],
        batch_size=batch_size,
        loss_vectors=loss_vectors[alive],
        loss_scale=loss_scale,
        patterns=[p[alive] for p in patterns],
        inputs_exact=inputs_exact,
        info=info,
    )


def first_layer_deltas(
    layers: list[LayerTensors], patterns: list[Tensor], loss_vectors: Tensor
) -> Tensor:
    """δ_m^1 = ∂ℓ_m/∂a_m^1, (N, n_1): g_m back-propagated through the recovered patterns."""
    delta = loss_vectors  # δ^H
    for k in range(len(layers) - 2, -1, -1):
        delta = (delta @ layers[k + 1].weight) * patterns[k]
    return delta


def _least_squares_inputs(
    layers: list[LayerTensors],
    patterns: list[Tensor],
    loss_vectors: Tensor,
    m: int,
    rank_tolerance: float,
    tolerance: float,
) -> Tensor:
    """Solve M Ḡ_1 = Δ^1 Xᵀ with Δ^1 back-propagated through the recovered patterns.

    With every sample found the system is consistent even under a wrong loss scale (Δ^1 Xᵀ is
    unchanged); a relative residual above ``tolerance`` means samples are missing.
    """
    coefficients = first_layer_deltas(layers, patterns, loss_vectors).T  # (n_1, M)
    singular = torch.linalg.svdvals(coefficients)
    rank = int((singular > rank_tolerance * singular[0]).sum()) if singular[0] > 0 else 0
    if rank < m:
        raise TrialFailure(
            f"the first-layer system is rank deficient (rank {rank} < {m} samples): the inputs "
            f"are not unique"
        )
    target = m * layers[0].weight_grad
    inputs = torch.linalg.lstsq(coefficients, target).solution
    residual = float((coefficients @ inputs - target).norm()) / float(target.norm())
    if residual > tolerance:
        raise TrialFailure(
            f"the first-layer system leaves {residual:.2e} of the gradient unexplained: samples "
            f"are missing (the batch is outside the insecure boundary)"
        )
    return inputs


def gradient_residual(
    model: nn.Module, observation: Observation, images: Tensor, labels: Tensor, batch_size: int
) -> float:
    """The share of the update the reconstruction leaves unexplained, in float64.

    ‖update − ∇θ (1/M) Σ_n CE(model(x̂_n), ŷ_n)‖ / ‖update‖ over the N ≤ M recovered samples:
    ≈ 0 when the attack is exact and complete, large when it is wrong or missed samples.
    """
    params = {n: p.detach().to(torch.float64) for n, p in model.named_parameters()}
    buffers = {
        n: b.to(torch.float64) if b.is_floating_point() else b for n, b in model.named_buffers()
    }
    names = [name for name in params if name in observation.update]
    with torch.enable_grad():
        for name in names:
            params[name].requires_grad_(True)
        logits = functional_call(model, {**params, **buffers}, (images.to(torch.float64),))
        loss = F.cross_entropy(logits, labels, reduction="sum") / batch_size
        grads = torch.autograd.grad(loss, [params[name] for name in names])
    difference = total = 0.0
    for name, grad in zip(names, grads, strict=True):
        observed = observation.update[name].detach().to(torch.float64).cpu()
        difference += float(((grad.cpu() - observed) ** 2).sum())
        total += float((observed**2).sum())
    return math.sqrt(difference / total) if total > 0 else math.inf


def checked_residual(
    observation: Observation,
    images: Tensor,
    recovery: FCNRecovery,
    tolerance: float,
    precision: float = 0.0,
) -> float:
    """:func:`gradient_residual`, refusing an exact and complete answer that does not fit.

    An answer with exact inputs and loss vectors for every one of the M samples reproduces the
    update to rounding; a residual above ``tolerance`` (widened to the precision of the
    largest loss vector, which dominates the update) then means the samples were not what they
    seemed (e.g. two near-identical images taken for one sample counted twice).
    """
    residual = gradient_residual(
        observation.model, observation, images, recovery.labels, recovery.batch_size
    )
    claims_exact = recovery.inputs_exact and recovery.loss_scale == "bias"
    largest = recovery.loss_vectors.norm(dim=1).max() if len(recovery.loss_vectors) else None
    if largest is not None and precision > 0:
        tolerance = float(loss_tolerance(tolerance, precision, largest))
    if claims_exact and len(images) == recovery.batch_size and residual > tolerance:
        raise TrialFailure(
            f"the reconstruction of all {recovery.batch_size} samples leaves {residual:.1e} of "
            f"the update unexplained: the groups were not single samples"
        )
    return residual


def update_precision(dtype: torch.dtype) -> float:
    """Machine epsilon of the update's dtype (what its exact products are rounded to)."""
    return float(torch.finfo(dtype).eps)


def resolve_tolerance(tolerance: float | None, dtype: torch.dtype) -> float:
    if tolerance is not None:
        return tolerance
    return DEFAULT_TOLERANCE.get(dtype, FALLBACK_TOLERANCE)


def check_exan_hyperparameters(
    tolerance: float | None,
    min_group_size: int,
    assumed_label_probability: float,
    support_tolerance: float,
    rank_tolerance: float,
) -> None:
    if tolerance is not None and not (0 < tolerance < 1):
        raise ValueError(f"tolerance must be in (0, 1) or None, got {tolerance!r}")
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int):
        raise ValueError(f"min_group_size must be an integer, got {min_group_size!r}")
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be at least 1, got {min_group_size}")
    if not 0 < assumed_label_probability < 1:
        raise ValueError(
            f"assumed_label_probability must be in (0, 1), got {assumed_label_probability!r}"
        )
    if not 0 <= support_tolerance < 1:
        raise ValueError(f"support_tolerance must be in [0, 1), got {support_tolerance!r}")
    if not 0 < rank_tolerance < 1:
        raise ValueError(f"rank_tolerance must be in (0, 1), got {rank_tolerance!r}")


@register_attack("exan")
class ExAN(Attack):
    requires = frozenset()
    # SoK letter: B, as the SoK gives the closed-form attacks (R-GAP, SPEAR).
    threat_letter = "B"
    client_protocols = EVERY_PROTOCOL
    threat_model = (
        "honest-but-curious server observing one FedSGD update of a ReLU FCN; knows the "
        "architecture and the parameters; infers the batch size and the labels"
    )

    def __init__(
        self,
        tolerance: float | None = None,
        min_group_size: int = 2,
        assumed_label_probability: float = 1 / 3,
        support_tolerance: float = 0.0,
        rank_tolerance: float = 1e-10,
    ) -> None:
        super().__init__(
            tolerance=tolerance,
            min_group_size=min_group_size,
            assumed_label_probability=assumed_label_probability,
            support_tolerance=support_tolerance,
            rank_tolerance=rank_tolerance,
        )
        check_exan_hyperparameters(
            tolerance,
            min_group_size,
            assumed_label_probability,
            support_tolerance,
            rank_tolerance,
        )
        self.tolerance = tolerance
        self.min_group_size = min_group_size
        self.assumed_label_probability = float(assumed_label_probability)
        self.support_tolerance = float(support_tolerance)
        self.rank_tolerance = float(rank_tolerance)

    def check_model(self, model: nn.Module) -> None:
        fcn_layers(model)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        observation = fedsgd_equivalent(observation)
        linears = fcn_layers(observation.model)
        if linears[0][1].in_features != math.prod(observation.input_shape):
            raise ValueError(
                f"{describe(*linears[0])} takes {linears[0][1].in_features} features, but a "
                f"sample of shape {observation.input_shape} has "
                f"{math.prod(observation.input_shape)}"
            )
        layers = gather_layers(observation, linears)
        tolerance = resolve_tolerance(self.tolerance, observation.dtype)
        precision = update_precision(observation.dtype)
        recovery = recover_fcn(
            layers,
            tolerance=tolerance,
            min_group_size=self.min_group_size,
            assumed_label_probability=self.assumed_label_probability,
            support_tolerance=self.support_tolerance,
            rank_tolerance=self.rank_tolerance,
            precision=precision,
        )
        images = recovery.inputs.reshape(-1, *observation.input_shape)
        info = dict(recovery.info)
        info["gradient_residual"] = checked_residual(
            observation, images, recovery, tolerance, precision
        )
        if recovery.loss_scale == "bias":  # the victim's confidence p_y in each sample
            label_entries = recovery.loss_vectors.gather(1, recovery.labels[:, None]).flatten()
            info["inferred_label_probability"] = (1.0 + label_entries).tolist()
        return Reconstruction(
            images=images,
            labels=recovery.labels,
            batch_size=recovery.batch_size,
            info=info,
        )
