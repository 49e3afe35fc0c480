"""The linear programs of the fishing attack (:mod:`leakbench.attacks.fishing`): the assignment
of units to samples, each sample's LP as arrays, and its solution with PuLP.

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

* ``min_cost`` (default): unit j given to sample m costs what the perturbations pay for it in
  the squared-L2 proxy Σ_{m' ≠ m} max(0, a_{m'}[j] + ε)² + max(0, ε − a_m[j])² (all other
  samples switch j off, its owner switches it on), over ‖g_j‖² (the squared L2 distance a unit
  of pre-activation costs); k units per sample, distinct, minimising the total: a rectangular
  assignment problem (``scipy.optimize.linear_sum_assignment`` on k copies of each sample).
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
from scipy.optimize import linear_sum_assignment
from torch import nn

from leakbench.attacks.exan import fcn_layers

LP_SOLVERS = ("highs", "cbc")


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


def assign_min_cost(
    pre: np.ndarray, jacobian: np.ndarray, k: int, epsilon: float
) -> list[list[int]]:
    """k distinct units per sample minimising the summed squared-L2 proxy of the perturbations
    (module docstring); ``jacobian`` (n, d) holds each unit's pre-activation gradient."""
    batch = pre.shape[0]
    squared = (jacobian**2).sum(axis=1)
    switch_off = np.maximum(pre + epsilon, 0.0) ** 2
    cost = switch_off.sum(axis=0) - switch_off + np.maximum(epsilon - pre, 0.0) ** 2
    cost = cost / np.where(squared > 0, squared, np.inf)
    cost = np.where(np.isfinite(cost), cost, np.finfo(np.float64).max / (4 * k * batch))
    slots, units = linear_sum_assignment(np.repeat(cost, k, axis=0))
    chosen: list[list[int]] = [[] for _ in range(batch)]
    for slot, unit in zip(slots.tolist(), units.tolist(), strict=True):
        chosen[slot // k].append(unit)
    return _complete(chosen, k)


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
    return f"CBC (PuLP {pulp.__version__}, one process per LP)"


def solve_sample(
    problem: SampleLP, objective: str, tau_max: float | None, solver: str, time_limit: float
) -> LPResult:
    """Build and solve one sample's LP; never raises."""
    start, cpu = time.perf_counter(), time.thread_time()
    total = len(problem.rhs)
    if bool((problem.rhs <= 0).all()):  # Δ = 0 already satisfies every constraint
        return LPResult("optimal", np.zeros(problem.rows.shape[1]), 0.0, rows_total=total)
    built: BuiltLP | None = None
    try:
        built = (build_linf if objective == "linf" else build_l1)(problem, tau_max)
        total = sum(len(b.lower) for b in built.blocks)
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
            result = LPResult("infeasible")
        elif lp.sol_status == pulp.LpSolutionOptimal and point is not None:
            result = LPResult("optimal", *point)
        elif lp.sol_status == pulp.LpSolutionIntegerFeasible:  # stopped by the time limit
            result = LPResult("time_limit") if point is None else LPResult("feasible", *point)
        elif lp.status == pulp.LpStatusNotSolved:
            result = LPResult("time_limit")
        else:
            result = LPResult(f"error: {pulp.LpStatus[lp.status]} without a solution")
    except Exception as exc:  # a solver crash leaves the sample unperturbed, never the trial
        result = LPResult(f"error: {type(exc).__name__}: {exc}")
    if result.delta is not None and not np.isfinite(result.delta).all():
        result = LPResult("error: non-finite solution")
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.thread_time() - cpu
    result.rows_given = built.rows_given[0] if built is not None else 0
    result.rows_total = total
    return result
