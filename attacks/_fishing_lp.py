"""The programs of the fishing attack (:mod:`leakbench.attacks.fishing`): the assignment of
units to samples, each sample's constraints as arrays, and their solution: the L2 objective's
least-distance QP with SciPy's NNLS, the L∞ and L1 LPs with PuLP.

The L2 objective (default) is a least-distance program (Lawson & Hanson, *Solving Least
Squares Problems*, 1974, ch. 23): minimise ‖Δ‖₂ subject to G Δ ≥ c (the activation rows and
the box as rows ±Δ_i ≥ ...). Its dual is a non-negative least-squares problem: with
E = [Gᵀ; cᵀ] and f = (0, …, 0, 1), u = argmin_{u ≥ 0} ‖E u − f‖ and r = E u − f, the optimum is
Δ = −r_{1..d} / r_{d+1}, and r_{d+1} = 0 means the rows are infeasible. SciPy's
``optimize.nnls`` (the Lawson–Hanson active-set method) solves it exactly in a few hundred
small steps; HiGHS' QP solver gives the same optimum about 60× slower on these problems (its
active set walks the 625 pixel bounds). The rows reach NNLS as they bind, as for HiGHS below.

PuLP is the modelling layer: variables, their bounds and the objective are PuLP's. The
activation and box constraints are dense blocks of rows that :func:`sample_lp` computes as
arrays; they reach the solver as arrays and only as far as they bind:

* HiGHS (default) runs in-process through PuLP's ``HiGHS`` (``highspy``), as
  :class:`LazyRowsHiGHS`: it starts from the rows the unperturbed sample violates, solves,
  adds the rows the solution violates (a sparse block at a time) and solves again from the
  previous basis, until no row is violated. A row that never binds (a unit far inactive for
  the sample, a pixel far from the ends of [0, 1]) never reaches the solver, and the answer is
  the optimum of the full LP: a relaxation whose optimum meets every row is optimal for all
  of them (and an infeasible relaxation is an infeasible LP).
* CBC (PuLP's ``PULP_CBC_CMD`` or ``COIN_CMD``) reads a model file, one process per LP, so
  it is given every row, written as PuLP expressions.

Assignment rules (step 2 of :mod:`leakbench.attacks.fishing`), per constrained layer with
pre-activations a (B × n) and the layer's Jacobian rows g_j in pixel space:

* ``min_cost`` (default): unit j given to sample m costs what the perturbations pay for it in the
  squared-L2 proxy Σ_{m' ≠ m} max(0, a_{m'}[j] + ε)² + max(0, ε − a_m[j])² (all other samples
  switch j off, its owner switches it on), each term over ‖g_j‖² (the squared L2 distance a
  unit of pre-activation costs: a sample's perturbation is then about the root of the sum of
  its terms, the rows g_j being nearly orthogonal); k units per sample, distinct, minimising
  the total: a rectangular assignment problem (``scipy.optimize.linear_sum_assignment`` on k
  copies of each sample). It minimises the batch's summed squared perturbation, i.e. its mean
  MSE, which the samples that are hardest to perturb dominate.
* ``max_psnr``: the assignment that maximises the samples' mean PSNR in the same
  proxy, Σ_m log(e_m + floor) over the samples' proxy squared perturbations e_m (the floor:
  the squared L2 of PSNR_CEILING dB). Concave in e, it is minimised by majorisation: each
  round solves the ``min_cost`` problem with sample m's terms weighted by 1/(e_m + floor) of
  the previous round, which can only lower the objective; MAX_PSNR_ROUNDS rounds or until the
  assignment repeats. It spends on a few hard samples what it saves on the others: on
  lfw-subset at B = 64 the mean PSNR (capped at 60 dB) rises by about 4 dB, the median by
  less than 0.5 dB, and the lowest falls by about 9 dB.
* ``margin``: greedily the (sample, unit) pairs with the largest exclusivity margin.
* ``seeded``: k consecutive units of a permutation drawn from the trial's public seed.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import pulp
from scipy import sparse
from scipy.optimize import linear_sum_assignment, nnls
from torch import nn

from leakbench.attacks.exan import fcn_layers

LP_SOLVERS = ("highs", "cbc")
MAX_PSNR_ROUNDS = 10
PSNR_CEILING = 60.0  # dB: above it a sample's perturbation no longer counts in ``max_psnr``
# Rows of the least-distance program count as met within this (pre-activation or pixel units;
# the attack checks its margin ε/2 on the result, far above it).
ROW_TOLERANCE = 1e-10
NNLS_ITERATIONS = 10  # per row: a guard (SciPy's default is 3 per row)


@dataclass(frozen=True)
class ReluLayer:
    """A Linear layer followed by a ReLU, in float64 numpy."""

    weight: np.ndarray  # (out, in)
    bias: np.ndarray  # (out,), zeros without a bias


@dataclass(frozen=True)
class SampleLP:
    """The LP data of one sample in pixel space: rows Δ ≥ rhs, lower ≤ Δ ≤ upper."""

    rows: np.ndarray  # (R, d)
    rhs: np.ndarray  # (R,)
    lower: np.ndarray  # (d,) −p (or less, never above 0)
    upper: np.ndarray  # (d,) 1 − p (never below 0)


@dataclass
class LPResult:
    """What one sample's LP gave: Δ (None unless usable), its status, objective and time,
    and the rows the solver was given of all the LP has."""

    status: str
    delta: np.ndarray | None = None
    objective: float | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this thread's CPU time: what a quiet machine would take
    rows_given: int = 0
    rows_total: int = 0


@dataclass
class RowBlock:
    """Rows ``lower ≤ matrix @ variables ≤ upper`` (a bound may be ±inf), and those the
    solver starts from (the others join when a solution violates them)."""

    variables: list[pulp.LpVariable]
    matrix: sparse.csr_matrix
    lower: np.ndarray
    upper: np.ndarray
    initial: np.ndarray  # bool per row

    def violated(self, values: np.ndarray, tolerance: float) -> np.ndarray:
        activity = self.matrix @ values
        return (activity < self.lower - tolerance) | (activity > self.upper + tolerance)


@dataclass
class BuiltLP:
    """A sample's LP: the PuLP model, its row blocks, and the reader of (Δ, objective)."""

    problem: pulp.LpProblem
    blocks: list[RowBlock]
    read: Callable[[], tuple[np.ndarray, float] | None]
    rows_given: list[int] = field(default_factory=lambda: [0])


def relu_layers(model: nn.Module) -> list[ReluLayer]:
    """The (Linear, ReLU) layers of a supported FCN, in float64 (refuses other victims)."""
    import torch

    layers = []
    for _, linear in fcn_layers(model)[:-1]:
        weight = linear.weight.detach().to(torch.float64).cpu().numpy()
        bias = (
            np.zeros(weight.shape[0])
            if linear.bias is None
            else linear.bias.detach().to(torch.float64).cpu().numpy()
        )
        layers.append(ReluLayer(weight=weight, bias=bias))
    return layers


def per_pixel(values: tuple[float, ...], input_shape: tuple[int, ...]) -> np.ndarray:
    """Per-channel statistics repeated over each channel's pixels, in flattening order."""
    channels = input_shape[0]
    if len(values) not in (1, channels):
        raise ValueError(f"{len(values)} normalisation values for {channels} channels")
    per_channel = np.broadcast_to(np.asarray(values, dtype=np.float64), (channels,))
    return np.repeat(per_channel, math.prod(input_shape[1:]))


def pre_activations(layers: list[ReluLayer], inputs: np.ndarray) -> list[np.ndarray]:
    """a^l for every layer, (B, n_l), of model inputs (B, d)."""
    out, h = [], inputs
    for layer in layers:
        a = h @ layer.weight.T + layer.bias
        out.append(a)
        h = np.maximum(a, 0.0)
    return out


def _complete(chosen: list[list[int]], k: int) -> list[list[int]]:
    # A sample that could not get k units is unassigned: its units go back to nobody.
    return [sorted(c) if len(c) == k else [] for c in chosen]


def assign_margin(pre: np.ndarray, scale: np.ndarray, k: int, epsilon: float) -> list[list[int]]:
    """Greedy assignment of k units per sample by the largest normalised exclusivity margin
    min(a_m[j] − ε, −ε − max_{m' ≠ m} a_{m'}[j]) / ``scale`` (each unit's L1 weight norm)."""
    batch, units = pre.shape
    if batch == 1:
        others = np.full_like(pre, -np.inf)
    else:
        top = np.argmax(pre, axis=0)
        ordered = np.sort(pre, axis=0)
        others = np.broadcast_to(ordered[-1], pre.shape).copy()
        others[top, np.arange(units)] = ordered[-2]
    margin = np.minimum(pre - epsilon, -epsilon - others) / np.where(scale > 0, scale, np.inf)
    chosen: list[list[int]] = [[] for _ in range(batch)]
    used = np.zeros(units, dtype=bool)
    full = 0
    for flat in np.argsort(-margin, axis=None, kind="stable"):
        m, j = divmod(int(flat), units)
        if len(chosen[m]) < k and not used[j]:
            chosen[m].append(j)
            used[j] = True
            full += len(chosen[m]) == k
            if full == batch:
                break
    return _complete(chosen, k)


def unit_costs(pre: np.ndarray, jacobian: np.ndarray, epsilon: float) -> tuple[np.ndarray, ...]:
    """The proxy's terms, (B, n) each: the squared L2 distance over which sample m switches
    unit j off (to −ε) and on (to ε); ``jacobian`` (n, d) holds each unit's pre-activation
    gradient. Moving a unit that no input moves costs the largest finite amount."""
    squared = (jacobian**2).sum(axis=1)
    movable = squared > 0
    huge = np.finfo(np.float64).max / (16 * pre.size)

    def distance(need: np.ndarray) -> np.ndarray:
        moved = np.where(movable, need / np.where(movable, squared, 1.0), huge)
        return np.where(need > 0, moved, 0.0)

    return distance(np.maximum(pre + epsilon, 0.0) ** 2), distance(
        np.maximum(epsilon - pre, 0.0) ** 2
    )


def _cheapest(off: np.ndarray, on: np.ndarray, weights: np.ndarray, k: int) -> list[list[int]]:
    """k distinct units per sample minimising Σ_m weights[m] · (m's proxy terms)."""
    weighted = weights[:, None] * off
    cost = weighted.sum(axis=0) - weighted + weights[:, None] * on
    slots, units = linear_sum_assignment(np.repeat(cost, k, axis=0))
    chosen: list[list[int]] = [[] for _ in range(off.shape[0])]
    for slot, unit in zip(slots.tolist(), units.tolist(), strict=True):
        chosen[slot // k].append(unit)
    return _complete(chosen, k)


def proxy_squared(off: np.ndarray, on: np.ndarray, chosen: list[list[int]]) -> np.ndarray:
    """Each sample's proxy squared perturbation under ``chosen``: the others' units off, its
    own on (an unassigned sample: 0, it stays as it is)."""
    owned = np.zeros(off.shape[1], dtype=bool)
    owned[[u for units in chosen for u in units]] = True
    return np.array(
        [
            off[m, owned].sum() - off[m, units].sum() + on[m, units].sum() if units else 0.0
            for m, units in enumerate(chosen)
        ]
    )


def assign_min_cost(
    pre: np.ndarray, jacobian: np.ndarray, k: int, epsilon: float
) -> list[list[int]]:
    """k distinct units per sample minimising the summed squared-L2 proxy of the perturbations
    (module docstring); ``jacobian`` (n, d) holds each unit's pre-activation gradient."""
    off, on = unit_costs(pre, jacobian, epsilon)
    return _cheapest(off, on, np.ones(pre.shape[0]), k)


def assign_max_psnr(
    pre: np.ndarray, jacobian: np.ndarray, k: int, epsilon: float
) -> list[list[int]]:
    """k distinct units per sample maximising the samples' mean proxy PSNR (module docstring),
    by up to MAX_PSNR_ROUNDS reweighted ``min_cost`` problems (each lowers the objective)."""
    off, on = unit_costs(pre, jacobian, epsilon)
    floor = jacobian.shape[1] * 10 ** (-PSNR_CEILING / 10)
    chosen = _cheapest(off, on, np.ones(pre.shape[0]), k)
    for _ in range(MAX_PSNR_ROUNDS):
        # An unassigned sample is not perturbed: its terms cost nothing.
        weights = np.array([1.0 if units else 0.0 for units in chosen])
        weights /= proxy_squared(off, on, chosen) + floor
        following = _cheapest(off, on, weights / weights.mean(), k)
        if following == chosen:
            break
        chosen = following
    return chosen


def assign_seeded(batch: int, units: int, k: int, seed: int, layer: int) -> list[list[int]]:
    """k consecutive units of a seeded permutation per sample (public: seed and layer only)."""
    order = np.random.default_rng([seed, layer]).permutation(units)
    return [
        sorted(order[m * k : (m + 1) * k].tolist()) if (m + 1) * k <= units else []
        for m in range(batch)
    ]


def sample_lp(
    m: int,
    layers: list[ReluLayer],
    pre: list[np.ndarray],
    assignment: list[list[list[int]]],
    pixel_jacobian: np.ndarray,
    pixels: np.ndarray,
    epsilon: float,
) -> SampleLP:
    """Rows G Δ ≥ c of sample m over the constrained layers (the attack's LP), as arrays."""
    rows, rhs = [], []
    jacobian, offset = pixel_jacobian, pre[0][m]  # a^1(p + Δ) = offset + jacobian Δ
    constrained = len(assignment)
    for depth in range(constrained):
        units = layers[depth].weight.shape[0]
        own = np.zeros(units, dtype=bool)
        own[assignment[depth][m]] = True
        foreign = np.zeros(units, dtype=bool)
        for other, owned in enumerate(assignment[depth]):
            if other != m:
                foreign[owned] = True
        target = (pre[depth][m] > 0) | own
        target &= ~foreign
        # Layers below the last constrained one keep every unit on its target side, so that
        # the map to the next layer stays affine; the last one constrains the assigned units.
        constrain = np.ones(units, dtype=bool) if depth < constrained - 1 else own | foreign
        sign = np.where(target, 1.0, -1.0)[constrain]
        rows.append(sign[:, None] * jacobian[constrain])
        rhs.append(epsilon - sign * offset[constrain])
        if depth < constrained - 1:
            nxt = layers[depth + 1]
            jacobian = nxt.weight @ (target[:, None] * jacobian)
            offset = nxt.weight @ (target * offset) + nxt.bias
    p = pixels[m]
    return SampleLP(
        rows=np.concatenate(rows),
        rhs=np.concatenate(rhs),
        lower=np.minimum(-p, 0.0),
        upper=np.maximum(1.0 - p, 0.0),
    )


def _pairs(first: np.ndarray, second: np.ndarray) -> sparse.csr_matrix:
    """Rows with ``first[i]`` on column i and ``second[i]`` on the last column (d + 1 wide)."""
    d = len(first)
    columns = np.stack([np.arange(d), np.full(d, d)], axis=1).ravel()
    values = np.stack([first, second], axis=1).ravel()
    return sparse.csr_matrix((values, columns, np.arange(0, 2 * d + 1, 2)), shape=(d, d + 1))


def build_linf(problem: SampleLP, tau_max: float | None) -> BuiltLP:
    """The homogeneous L∞ LP (see :mod:`leakbench.attacks.fishing`): with s = Δ/τ, t = 1/τ,
    maximise t subject to G s ≥ c t, −1 ≤ s ≤ 1, lo t ≤ s ≤ hi t, t ≥ max(1, 1/τ_max)."""
    d = problem.rows.shape[1]
    lp = pulp.LpProblem("fishing_linf", pulp.LpMaximize)
    s = [lp.add_variable(f"s{i}", -1.0, 1.0) for i in range(d)]
    t_min = 1.0 if tau_max is None else max(1.0, 1.0 / tau_max)
    t = lp.add_variable("t", t_min)
    # Every variable in the objective (s at 0): the model's variables are those PuLP sees there.
    lp += pulp.LpAffineExpression([(t, 1.0), *[(v, 0.0) for v in s]])
    variables = [*s, t]
    rows = len(problem.rhs)
    activation = RowBlock(
        variables,
        sparse.csr_matrix(np.hstack([problem.rows, -problem.rhs[:, None]])),
        np.zeros(rows),
        np.full(rows, np.inf),
        initial=problem.rhs > 0,  # violated by Δ = 0
    )
    upper_box = RowBlock(
        variables,
        _pairs(np.ones(d), -problem.upper),
        np.full(d, -np.inf),
        np.zeros(d),
        initial=np.zeros(d, dtype=bool),
    )
    lower_box = RowBlock(
        variables,
        _pairs(np.ones(d), -problem.lower),
        np.zeros(d),
        np.full(d, np.inf),
        initial=np.zeros(d, dtype=bool),
    )

    def read() -> tuple[np.ndarray, float] | None:
        scale = t.varValue
        values = [v.varValue for v in s]
        if scale is None or not scale > 0 or any(v is None for v in values):
            return None  # a point cut short before it had one
        return np.array(values, dtype=np.float64) / scale, 1.0 / scale

    return BuiltLP(lp, [activation, upper_box, lower_box], read)


def build_l1(problem: SampleLP, tau_max: float | None) -> BuiltLP:
    """The L1 LP with Δ = u − v, u, v ≥ 0 (the box and τ_max are their bounds)."""
    d = problem.rows.shape[1]
    cap = math.inf if tau_max is None else tau_max
    lp = pulp.LpProblem("fishing_l1", pulp.LpMinimize)
    up = [lp.add_variable(f"u{i}", 0.0, min(float(problem.upper[i]), cap)) for i in range(d)]
    down = [lp.add_variable(f"v{i}", 0.0, min(float(-problem.lower[i]), cap)) for i in range(d)]
    lp += pulp.lpSum(up) + pulp.lpSum(down)
    rows = len(problem.rhs)
    activation = RowBlock(
        [*up, *down],
        sparse.csr_matrix(np.hstack([problem.rows, -problem.rows])),
        problem.rhs.copy(),
        np.full(rows, np.inf),
        initial=problem.rhs > 0,
    )

    def read() -> tuple[np.ndarray, float] | None:
        values = [(u.varValue, v.varValue) for u, v in zip(up, down, strict=True)]
        if any(a is None or b is None for a, b in values):
            return None
        delta = np.array([a - b for a, b in values], dtype=np.float64)
        return delta, float(np.abs(delta).sum())

    return BuiltLP(lp, [activation], read)


def least_distance(rows: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """The least-distance program min ‖Δ‖₂ s.t. rows Δ ≥ rhs through its NNLS dual (module
    docstring); None when its optimum has ‖Δ‖² ≥ 2d or does not exist.

    At the dual optimum r_{d+1} = −1 / (1 + ‖Δ‖²) (from rᵀ E u = 0), so the test on r_{d+1}
    is a test on the optimum's norm: a Δ in the box [−1, 1]^d has ‖Δ‖² ≤ d, and a relaxation
    whose optimum exceeds 2d leaves the full program infeasible in the box."""
    d = rows.shape[1]
    if not len(rhs):
        return np.zeros(d)
    dual = np.vstack([rows.T, rhs[None, :]])
    target = np.zeros(d + 1)
    target[-1] = 1.0
    # SciPy's nnls aborts the process on a matrix without columns: the case above.
    weights, _ = nnls(dual, target, maxiter=NNLS_ITERATIONS * len(rhs))
    residual = dual @ weights - target
    if not residual[-1] < -1.0 / (1.0 + 2.0 * d):
        return None
    return -residual[:d] / residual[-1]


def solve_least_distance(problem: SampleLP, tau_max: float | None, time_limit: float) -> LPResult:
    """The L2 objective: min ‖Δ‖₂ over the sample's rows and box (and ``tau_max``), the rows
    given as they bind: those Δ = 0 violates first, then those each optimum violates."""
    d = problem.rows.shape[1]
    lower, upper = problem.lower, problem.upper
    if tau_max is not None:
        lower, upper = np.maximum(lower, -tau_max), np.minimum(upper, tau_max)
    # Every row as G Δ ≥ h: the activation rows, then Δ_i ≥ lower_i, then −Δ_i ≥ −upper_i.
    rows = np.vstack([problem.rows, np.eye(d), -np.eye(d)])
    rhs = np.concatenate([problem.rhs, lower, -upper])
    given = np.zeros(len(rhs), dtype=bool)
    adding = rhs > 0  # violated by Δ = 0
    started = time.monotonic()
    while True:
        given |= adding
        delta = least_distance(rows[given], rhs[given])
        if delta is None:
            return LPResult("infeasible", rows_given=int(given.sum()), rows_total=len(rhs))
        adding = ~given & (rows @ delta < rhs - ROW_TOLERANCE)
        if not adding.any():
            return LPResult(
                "optimal",
                delta,
                float(np.linalg.norm(delta)),
                rows_given=int(given.sum()),
                rows_total=len(rhs),
            )
        if time.monotonic() - started > time_limit:
            return LPResult("time_limit", rows_given=int(given.sum()), rows_total=len(rhs))


_BANNER_LOCK = threading.Lock()
_banner_shown = False


def _quiet_first_highs() -> None:
    """HiGHS prints its banner on stdout when the first solver object of a process is made;
    make that one with stdout pointed at /dev/null (file descriptor 1: the banner is C++)."""
    global _banner_shown
    import highspy

    with _BANNER_LOCK:
        if _banner_shown:
            return
        with contextlib.ExitStack() as stack:
            try:
                saved = os.dup(1)
            except OSError:  # no stdout at all: nothing to keep clean
                highspy.Highs()
            else:
                stack.callback(os.close, saved)
                null = os.open(os.devnull, os.O_WRONLY)
                stack.callback(os.close, null)
                stack.callback(os.dup2, saved, 1)
                os.dup2(null, 1)
                highspy.Highs()
        _banner_shown = True


class LazyRowsHiGHS(pulp.HiGHS):  # type: ignore[misc, valid-type]
    """PuLP's in-process HiGHS, given row blocks as arrays and adding them as they bind.

    PuLP builds the columns (and any rows it holds itself); the blocks' initial rows follow;
    after each solve the rows its solution violates are added (one sparse block) and HiGHS
    solves again from its last basis, until none is violated or the time limit is spent.
    """

    def __init__(self, blocks: Sequence[RowBlock], rows_given: list[int], **options: Any) -> None:
        super().__init__(mip=False, msg=False, **options)
        self.blocks = list(blocks)
        self.rows_given = rows_given

    def actualSolve(self, lp: pulp.LpProblem) -> int:
        import highspy

        _quiet_first_highs()
        started = time.monotonic()
        self.createAndConfigureSolver(lp)
        self.buildSolverModel(lp)
        model = lp.solverModel
        _, tolerance = model.getOptionValue("primal_feasibility_tolerance")
        columns = [np.array([v.index for v in b.variables], dtype=np.int32) for b in self.blocks]
        given = [np.zeros(len(b.lower), dtype=bool) for b in self.blocks]
        adding = [b.initial.copy() for b in self.blocks]
        while True:
            for block, cols, mask, new in zip(self.blocks, columns, given, adding, strict=True):
                rows = np.flatnonzero(new)
                if len(rows):
                    part = block.matrix[rows]
                    model.addRows(
                        len(rows),
                        np.where(
                            np.isfinite(block.lower[rows]), block.lower[rows], -highspy.kHighsInf
                        ),
                        np.where(
                            np.isfinite(block.upper[rows]), block.upper[rows], highspy.kHighsInf
                        ),
                        part.nnz,
                        part.indptr[:-1].astype(np.int32),
                        cols[part.indices],
                        part.data,
                    )
                    mask |= new
            if self.timeLimit is not None:
                left = float(self.timeLimit) - (time.monotonic() - started)
                model.setOptionValue("time_limit", max(left, 1e-6))
            model.run()
            if model.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                break
            values = np.asarray(model.getSolution().col_value)
            adding = [
                ~mask & block.violated(values[cols], tolerance)
                for block, cols, mask in zip(self.blocks, columns, given, strict=True)
            ]
            if not any(new.any() for new in adding):
                break
        self.rows_given[0] = int(sum(mask.sum() for mask in given))
        status, sol_status = self.findSolutionValues(lp)
        for variable in lp.variables():
            variable.modified = False
        lp.assignStatus(status, sol_status)
        return status


def _cbc(time_limit: float) -> pulp.LpSolver:
    coin = pulp.COIN_CMD(msg=False, timeLimit=time_limit, threads=1)
    if coin.available():  # a CBC of its own (PuLP 4 ships none: ``pip install pulp[cbc]``)
        return coin
    with warnings.catch_warnings():  # PuLP 3's bundled CBC, deprecated there
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1)


def _all_rows(built: BuiltLP) -> None:
    """Every row of every block as a PuLP constraint (a solver that reads model files)."""
    for index, block in enumerate(built.blocks):
        for r in range(block.matrix.shape[0]):
            lo, hi = block.matrix.indptr[r], block.matrix.indptr[r + 1]
            expression = pulp.LpAffineExpression(
                zip(
                    [block.variables[i] for i in block.matrix.indices[lo:hi].tolist()],
                    block.matrix.data[lo:hi].tolist(),
                    strict=True,
                )
            )
            if np.isfinite(block.lower[r]):
                built.problem += expression >= float(block.lower[r]), f"b{index}_{r}_lo"
            if np.isfinite(block.upper[r]):
                built.problem += expression <= float(block.upper[r]), f"b{index}_{r}_hi"
    built.rows_given[0] = sum(len(b.lower) for b in built.blocks)


def solver_version(solver: str) -> str:
    """The solver's name and version, as recorded with the trial."""
    if solver == "highs":
        return f"HiGHS (highspy {metadata.version('highspy')}, in-process)"
    if solver == "nnls":
        return f"NNLS (SciPy {metadata.version('scipy')}, least-distance QP, in-process)"
    return f"CBC (PuLP {pulp.__version__}, one process per LP)"


def solve_sample(
    problem: SampleLP, objective: str, tau_max: float | None, solver: str, time_limit: float
) -> LPResult:
    """Build and solve one sample's program (``objective`` l2: the least-distance QP, whatever
    ``solver`` says; linf or l1: the LP with ``solver``); never raises."""
    start, cpu = time.perf_counter(), time.thread_time()
    total = len(problem.rhs)
    if bool((problem.rhs <= 0).all()):  # Δ = 0 already satisfies every constraint
        return LPResult("optimal", np.zeros(problem.rows.shape[1]), 0.0, rows_total=total)
    built: BuiltLP | None = None
    try:
        if objective == "l2":
            result = solve_least_distance(problem, tau_max, time_limit)
        else:
            built = (build_linf if objective == "linf" else build_l1)(problem, tau_max)
            total = sum(len(b.lower) for b in built.blocks)
            result = _solve_lp(built, solver, time_limit)
    except Exception as exc:  # a solver crash leaves the sample unperturbed, never the trial
        result = LPResult(f"error: {type(exc).__name__}: {exc}")
    if result.delta is not None and not np.isfinite(result.delta).all():
        result = LPResult("error: non-finite solution")
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.thread_time() - cpu
    if built is not None:
        result.rows_given, result.rows_total = built.rows_given[0], total
    elif not result.rows_total:  # the least-distance program counts its own rows
        result.rows_total = total
    return result


def _solve_lp(built: BuiltLP, solver: str, time_limit: float) -> LPResult:
    if solver == "highs":
        command: pulp.LpSolver = LazyRowsHiGHS(
            built.blocks, built.rows_given, timeLimit=time_limit, threads=1
        )
    else:
        _all_rows(built)
        command = _cbc(time_limit)
    lp = built.problem
    lp.solve(command)
    point = built.read() if lp.status != pulp.LpStatusInfeasible else None
    if lp.status == pulp.LpStatusInfeasible:
        return LPResult("infeasible")
    if lp.sol_status == pulp.LpSolutionOptimal and point is not None:
        return LPResult("optimal", *point)
    if lp.sol_status == pulp.LpSolutionIntegerFeasible:  # stopped by the time limit
        return LPResult("time_limit") if point is None else LPResult("feasible", *point)
    if lp.status == pulp.LpStatusNotSolved:
        return LPResult("time_limit")
    return LPResult(f"error: {pulp.LpStatus[lp.status]} without a solution")
