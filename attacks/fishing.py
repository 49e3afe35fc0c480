"""``fishing``: fishing leakage by neuron-activation manipulation (Pan, Zhang, Yang, "Fishing
Leakage of Deep Learning Training Data via Neuron Activation Pattern Manipulation", 计算机研究与发展
/ Journal of Computer Research and Development 2022, doi 10.7544/issn1000-1239.20220498).

Threat model: an honest-but-curious server that ships client code (``Capability.CLIENT_CODE``):
a preprocessing step that the client runs on its private batch before it computes its FedSGD
update. The step perturbs every sample slightly so that the batch meets the neuron-activation
exclusivity condition of the ExAN attack (:mod:`leakbench.attacks.exan`); the server then
reconstructs the perturbed samples exactly from the averaged gradient, for batch sizes far
beyond those at which natural batches meet the condition. The model is not modified. What the
client code sends back besides the update (``client_state``, JSON data) is the assignment of
neurons to samples and nothing else: ``{"assignment": [layer][sample] → unit indices}``; never
pixels, activations or other statistics of the batch. The facts of its linear programs are the
client's report (``ClientContext.report``), recorded with the trial and never sent to the
server: ``{"lp": {"solver", "objective" (the kind), "status", "value" (the LP optimum: the
perturbation's L∞ or L1 size in pixel units), "seconds" (one per sample), "wall_seconds" (all
LPs), "time_limit" (per LP), "client_seconds" (the whole hook)}}``. Victims: the ExAN attack's
ReLU FCNs (``Flatten``, (``Linear``, ``ReLU``) × L, ``Linear``), with biases for exact recovery.

The paper's own LP is not reproduced here (only its abstract could be read); this is our
formulation of the idea it describes, of which the paper gives the objective (a small
perturbation that makes the batch exclusive) but not the constraints. Notation: pixels p_m ∈ [0,
1]^d of sample m (the model input is x_m = (p_m − μ)/σ per channel), perturbation Δ_m, ReLU
layers l = 1..L with pre-activations a_m^l. Every sample m owns a set J_m^l of k ≥ 2 units of
each constrained layer, disjoint across samples; O_m^l = ∪_{m' ≠ m} J_{m'}^l are the units the
other samples own. With margin ε > 0, the LP of sample m is

    minimise   ‖Δ_m‖_∞ (or ‖Δ_m‖_1)
    subject to a_m^l[j](p_m + Δ_m) ≥ ε     for j ∈ J_m^l        (owner active)
               a_m^l[j](p_m + Δ_m) ≤ −ε    for j ∈ O_m^l        (exclusivity)
               0 ≤ p_m + Δ_m ≤ 1                                (a valid image)
               ‖Δ_m‖_∞ ≤ τ_max                                  (optional budget)

On the first layer a^1(p + Δ) = a^1(p) + (W_1 diag(1/σ)) Δ is affine, so this is an LP. After
it every sample activates its own units and none of the others', so each owns ≥ k ExANs. The
LPs of different samples share no variable: M independent LPs. With ``layers="all"`` (multi-
layer FCNs) every ReLU layer is constrained: the target pattern T_m^l of sample m is its
current one with its own units switched on and the others' switched off; inside the region
where the layers below l follow their targets the network is affine in Δ_m,
a^{l+1} = W_{l+1} diag(T_m^l) a^l + b_{l+1}, so keeping every unit of layers 1..L−1 on its
target side (margin ε) and imposing the constraints above on layer L stays an LP.

The L∞ LP is solved in its homogeneous form: with s = Δ/τ and t = 1/τ it becomes

    maximise t  subject to  G s ≥ c t,  −1 ≤ s ≤ 1,  lo t ≤ s ≤ hi t,  t ≥ max(1, 1/τ_max)

(G Δ ≥ c are the activation constraints, [lo, hi] = [−p, 1 − p] the box). Same optimum, but
the L∞ ball becomes variable bounds instead of 2d rows, which takes the simplex about 3× fewer
iterations; the box rows are written only for pixels whose box is tighter than the largest
possible τ. t ≥ 1 holds for every feasible point (|Δ| ≤ 1 in [0, 1]), so an infeasible
original is an infeasible homogeneous LP. The L1 LP splits Δ = u − v with u, v ≥ 0.

Steps, as :meth:`Fishing.client_hook` runs them (float64):

1. Pixels and pre-activations: p_m = x_m σ + μ; a_m^l of every constrained layer at p_m.
2. Assignment, per constrained layer. ``"margin"`` (default): greedily, the (sample, unit)
   pairs with the largest exclusivity margin min(a_m[j] − ε, −ε − max_{m' ≠ m} a_{m'}[j]),
   divided by the unit's L1 weight norm in pixel space (the L∞ distance that margin is worth;
   in deeper layers the L1 norm of its weight row stands in), until each sample owns k units;
   it reads the batch, so it runs on the client and only its result travels. ``"seeded"``: a
   permutation of the units drawn from the trial's public seed, k consecutive units per
   sample, which the server could recompute. Samples that find no k free units are
   ``unassigned``.
3. One LP per assigned sample, built with PuLP; a sample whose unperturbed pixels satisfy
   every constraint needs no solver (objective 0).
4. The LPs are solved in ``workers`` threads (CBC runs as a subprocess and HiGHS releases the
   GIL, so the solves overlap; PuLP's model building does not), with CBC (default) or HiGHS,
   each LP single-threaded and under a time limit: ``time_limit`` if set, else half the
   trial's ``max_seconds`` spread over the LPs (``BUDGET_SHARE``), else ``DEFAULT_LP_SECONDS``.
   A limit is a guard, not a budget to spend: an LP that hits it makes the trial depend on the
   machine's load, so tracks set ``max_seconds`` well above what the LPs need. The solver's
   status is kept per sample: ``optimal``; ``feasible`` (time limit hit, the point found so
   far satisfies every constraint and is used); ``time_limit`` (stopped by the limit without a
   point that passes step 5); ``infeasible``; ``error: ...``.
5. Check: Δ is clipped to the box (and τ_max), the perturbed sample is cast to the client's
   dtype, and a float64 forward pass must show its own units above ε/2 and the others' below
   −ε/2 in every constrained layer; an optimum that fails is ``rejected`` (solver tolerances).
   Every sample whose LP did not give a checked solution stays unperturbed.
6. The client trains on the perturbed batch, in model-input space and dtype.

:meth:`Fishing.reconstruct` is the ExAN attack told the assignment:

7. The groups of the last ReLU layer are the samples' assigned units (those with a non-zero
   gradient column and row), instead of ExAN's blind grouping; a group whose units do not
   agree (its sample stayed unperturbed and shares them) is dropped, the others are validated
   as loss-vector directions (:func:`leakbench.attacks.exan.validated_grouping`).
8. The rest of the ExAN attack unchanged (:func:`leakbench.attacks.exan.recover_fcn`): the
   gradient-scale test keeps the groups that are samples and infers the batch size M (so M
   does not come from the assignment), the top-down bias ratios give the inputs exactly, and
   the labels come from the loss-vector directions.

Hyperparameters (documented defaults): ``k`` (2) units per sample and constrained layer;
``epsilon`` (1e-3) the activation margin, in pre-activation units; ``objective`` (``"linf"``
or ``"l1"``); ``tau_max`` (None) an L∞ budget in pixel units for either objective; ``solver``
(``"cbc"`` or ``"highs"``); ``assignment`` (``"margin"`` or ``"seeded"``); ``layers``
(``"all"``: every ReLU layer, or ``"first"``: the paper's first-layer LP, which equals
``"all"`` on one hidden layer; the reconstruction needs the last ReLU layer's units, so
``"first"`` is refused for deeper FCNs); ``workers`` (2) parallel LPs; ``time_limit`` (None)
seconds per LP; ``tolerance`` (None) as in ``exan``. ``Budget.max_iterations`` does not apply:
the attack does not iterate.
"""

from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pulp
import torch
from torch import Tensor, nn

from leakbench.attacks.exan import (
    LayerTensors,
    checked_residual,
    describe,
    fcn_layers,
    gather_layers,
    link_tolerance,
    recover_fcn,
    resolve_tolerance,
    units_agree,
    update_precision,
    validated_grouping,
)
from leakbench.interfaces import Attack, TrialFailure, UnsupportedModelError, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, ClientContext, Observation, Reconstruction

OBJECTIVES = ("linf", "l1")
SOLVERS = ("cbc", "highs")
ASSIGNMENTS = ("margin", "seeded")
LAYERS = ("all", "first")
DEFAULT_LP_SECONDS = 60.0  # per LP when the trial sets no time budget: nothing hangs
BUDGET_SHARE = 0.5  # of the trial's max_seconds that all LPs together may take
MIN_LP_SECONDS = 0.05
# Exactness of the reconstruction: the rest of the ExAN attack's hyperparameters, at its defaults.
MIN_GROUP_SIZE = 2
SUPPORT_TOLERANCE = 0.0
RANK_TOLERANCE = 1e-10
ASSUMED_LABEL_PROBABILITY = 1 / 3


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
    """What one sample's LP gave: Δ (None unless usable), its status, objective and time."""

    status: str
    delta: np.ndarray | None = None
    objective: float | None = None
    seconds: float = 0.0


def relu_layers(model: nn.Module) -> list[ReluLayer]:
    """The (Linear, ReLU) layers of a supported FCN, in float64 (refuses other victims)."""
    linears = fcn_layers(model)
    layers = []
    for _, linear in linears[:-1]:
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


def assign_margin(pre: np.ndarray, scale: np.ndarray, k: int, epsilon: float) -> list[list[int]]:
    """Greedy assignment of k units per sample by the largest normalised exclusivity margin.

    ``pre`` (B, n) are the pre-activations, ``scale`` (n,) each unit's L1 weight norm.
    """
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
    # A sample that could not get k units is unassigned: its units go back to nobody.
    return [sorted(c) if len(c) == k else [] for c in chosen]


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
    """Rows G Δ ≥ c of sample m over the constrained layers (the module docstring's LP)."""
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


def solver_command(solver: str, time_limit: float) -> pulp.LpSolver:
    """A PuLP solver for one LP, single-threaded (the LPs run side by side)."""
    if solver == "highs":
        return pulp.HiGHS(msg=False, timeLimit=time_limit, threads=1)
    coin = pulp.COIN_CMD(msg=False, timeLimit=time_limit, threads=1)
    if coin.available():  # a CBC of its own (PuLP 4 ships none: ``pip install pulp[cbc]``)
        return coin
    with warnings.catch_warnings():  # PuLP 3's bundled CBC, deprecated there
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1)


def _expression(variables: list[pulp.LpVariable], coefficients: np.ndarray) -> Any:
    # Activation rows are dense: zipping the whole row is the cheapest way to build them.
    if bool((coefficients != 0).all()):
        return pulp.LpAffineExpression(zip(variables, coefficients.tolist(), strict=True))
    nonzero = np.flatnonzero(coefficients).tolist()
    return pulp.LpAffineExpression(
        zip([variables[i] for i in nonzero], coefficients[nonzero].tolist(), strict=True)
    )


def build_linf(problem: SampleLP, tau_max: float | None) -> tuple[pulp.LpProblem, Any]:
    """The homogeneous L∞ LP (module docstring); returns it and a reader of (Δ, τ)."""
    d = problem.rows.shape[1]
    lp = pulp.LpProblem("fishing_linf", pulp.LpMaximize)
    s = [lp.add_variable(f"s{i}", -1.0, 1.0) for i in range(d)]
    t_min = 1.0 if tau_max is None else max(1.0, 1.0 / tau_max)
    t = lp.add_variable("t", t_min)
    lp += t
    variables = [*s, t]
    for r, (row, c) in enumerate(zip(problem.rows, problem.rhs, strict=True)):
        lp += _expression(variables, np.append(row, -c)) >= 0, f"a{r}"
    cap = 1.0 / t_min  # the largest τ: a box wider than that cannot bind
    for i in np.flatnonzero(problem.upper < cap).tolist():
        lp += s[i] - float(problem.upper[i]) * t <= 0, f"hi{i}"
    for i in np.flatnonzero(-problem.lower < cap).tolist():
        lp += s[i] - float(problem.lower[i]) * t >= 0, f"lo{i}"

    def read() -> tuple[np.ndarray, float] | None:
        scale = t.varValue
        values = [v.varValue for v in s]
        if scale is None or not scale > 0 or any(v is None for v in values):
            return None  # a point cut short before it had one
        return np.array(values, dtype=np.float64) / scale, 1.0 / scale

    return lp, read


def build_l1(problem: SampleLP, tau_max: float | None) -> tuple[pulp.LpProblem, Any]:
    """The L1 LP with Δ = u − v; returns it and a reader of (Δ, ‖Δ‖_1)."""
    d = problem.rows.shape[1]
    cap = math.inf if tau_max is None else tau_max
    lp = pulp.LpProblem("fishing_l1", pulp.LpMinimize)
    up = [lp.add_variable(f"u{i}", 0.0, min(float(problem.upper[i]), cap)) for i in range(d)]
    down = [lp.add_variable(f"v{i}", 0.0, min(float(-problem.lower[i]), cap)) for i in range(d)]
    lp += pulp.lpSum(up) + pulp.lpSum(down)
    variables = [*up, *down]
    for r, (row, c) in enumerate(zip(problem.rows, problem.rhs, strict=True)):
        lp += _expression(variables, np.concatenate([row, -row])) >= float(c), f"a{r}"

    def read() -> tuple[np.ndarray, float] | None:
        values = [(u.varValue, v.varValue) for u, v in zip(up, down, strict=True)]
        if any(a is None or b is None for a, b in values):
            return None
        delta = np.array([a - b for a, b in values], dtype=np.float64)
        return delta, float(np.abs(delta).sum())

    return lp, read


def solve_sample(
    problem: SampleLP, objective: str, tau_max: float | None, command: pulp.LpSolver
) -> LPResult:
    """Build and solve one sample's LP with PuLP and ``command``; never raises."""
    start = time.perf_counter()
    if bool((problem.rhs <= 0).all()):  # Δ = 0 already satisfies every constraint
        return LPResult("optimal", np.zeros(problem.rows.shape[1]), 0.0, 0.0)
    try:
        build = build_linf if objective == "linf" else build_l1
        lp, read = build(problem, tau_max)
        lp.solve(command)
        point = read() if lp.status != pulp.LpStatusInfeasible else None
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
    return result


def satisfied(
    layers: list[ReluLayer],
    inputs: np.ndarray,
    assignment: list[list[list[int]]],
    m: int,
    margin: float,
) -> bool:
    """Sample m's own units above ``margin`` and the others' below −margin, every layer."""
    pre = pre_activations(layers[: len(assignment)], inputs[None, :])
    for depth, owners in enumerate(assignment):
        a = pre[depth][0]
        for other, units in enumerate(owners):
            if units and (
                bool((a[units] <= margin).any())
                if other == m
                else bool((a[units] >= -margin).any())
            ):
                return False
    return True


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return value


@register_attack("fishing")
class Fishing(Attack):
    requires = frozenset({Capability.CLIENT_CODE})
    # SoK letter: F, active manipulation (code the server ships changes the client's batch).
    threat_letter = "F"
    threat_model = (
        "honest-but-curious server that ships client code: an LP perturbs each sample so the "
        "batch meets the exclusivity condition; the client returns the neuron assignment and "
        "its LP facts (solver, status, objective, time per sample); ReLU FCNs"
    )

    def __init__(
        self,
        k: int = 2,
        epsilon: float = 1e-3,
        objective: str = "linf",
        tau_max: float | None = None,
        solver: str = "cbc",
        assignment: str = "margin",
        layers: str = "all",
        workers: int = 2,
        time_limit: float | None = None,
        tolerance: float | None = None,
    ) -> None:
        super().__init__(
            k=k,
            epsilon=epsilon,
            objective=objective,
            tau_max=tau_max,
            solver=solver,
            assignment=assignment,
            layers=layers,
            workers=workers,
            time_limit=time_limit,
            tolerance=tolerance,
        )
        self.k = positive_int("k", k)
        if k < 2:
            raise ValueError(f"k must be at least 2 (the ExAN attack groups ≥ 2 units), got {k}")
        if not (isinstance(epsilon, int | float) and epsilon > 0):
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        if tau_max is not None and not tau_max > 0:
            raise ValueError(f"tau_max must be positive or None, got {tau_max!r}")
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be positive or None, got {time_limit!r}")
        if tolerance is not None and not 0 < tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1) or None, got {tolerance!r}")
        self.epsilon = float(epsilon)
        self.objective = check_choice("objective", objective, OBJECTIVES)
        self.tau_max = None if tau_max is None else float(tau_max)
        self.solver = check_choice("solver", solver, SOLVERS)
        self.assignment = check_choice("assignment", assignment, ASSIGNMENTS)
        self.layers = check_choice("layers", layers, LAYERS)
        self.workers = positive_int("workers", workers)
        self.time_limit = None if time_limit is None else float(time_limit)
        self.tolerance = tolerance

    def check_model(self, model: nn.Module) -> None:
        layers = relu_layers(model)
        if self.layers == "first" and len(layers) > 1:
            raise UnsupportedModelError(
                f"fishing with layers='first' constrains only the first of {len(layers)} ReLU "
                f"layers, but the reconstruction needs exclusive units in the last one; use "
                f"layers='all'"
            )

    def lp_seconds(self, context: ClientContext, count: int) -> float:
        """The time limit of one LP (step 4)."""
        if self.time_limit is not None:
            return self.time_limit
        budget = context.budget.max_seconds
        if budget is None:
            return DEFAULT_LP_SECONDS
        share = BUDGET_SHARE * budget * min(self.workers, max(count, 1)) / max(count, 1)
        return max(share, MIN_LP_SECONDS)

    def client_hook(
        self, model: nn.Module, images: Tensor, context: ClientContext
    ) -> tuple[Tensor, dict[str, Any]]:
        started = time.perf_counter()
        self.check_model(model)
        layers = relu_layers(model)
        batch = images.shape[0]
        if layers[0].weight.shape[1] != math.prod(context.input_shape):
            raise ValueError(
                f"the first Linear takes {layers[0].weight.shape[1]} features, but a sample of "
                f"shape {tuple(context.input_shape)} has {math.prod(context.input_shape)}"
            )
        std = per_pixel(context.std, tuple(context.input_shape))
        mean = per_pixel(context.mean, tuple(context.input_shape))
        # Step 1.
        inputs = images.detach().to(torch.float64).cpu().reshape(batch, -1).numpy()
        pixels = inputs * std + mean
        constrained = layers if self.layers == "all" else layers[:1]
        pre = pre_activations(constrained, inputs)
        pixel_jacobian = layers[0].weight / std  # ∂a^1/∂p
        # Step 2.
        assignment: list[list[list[int]]] = []
        for depth, layer in enumerate(constrained):
            if self.assignment == "seeded":
                assignment.append(
                    assign_seeded(batch, layer.weight.shape[0], self.k, context.seed, depth)
                )
            else:
                jac = pixel_jacobian if depth == 0 else layer.weight
                scale = np.abs(jac).sum(axis=1)
                assignment.append(assign_margin(pre[depth], scale, self.k, self.epsilon))
        assigned = [m for m in range(batch) if all(owned[m] for owned in assignment)]
        # Step 3 and 4.
        limit = self.lp_seconds(context, len(assigned))

        # Solver objects are made here, in the calling thread (warnings are not thread-safe).
        commands = {m: solver_command(self.solver, limit) for m in assigned}

        def solve(m: int) -> LPResult:
            problem = sample_lp(m, layers, pre, assignment, pixel_jacobian, pixels, self.epsilon)
            return solve_sample(problem, self.objective, self.tau_max, commands[m])

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            solved = dict(zip(assigned, pool.map(solve, assigned), strict=True))
        wall = time.perf_counter() - start
        # Step 5.
        results = [solved.get(m, LPResult("unassigned")) for m in range(batch)]
        trained = images.detach().clone()
        for m, result in enumerate(results):
            if result.delta is None:
                continue
            lower, upper = np.minimum(-pixels[m], 0.0), np.maximum(1.0 - pixels[m], 0.0)
            delta = np.clip(result.delta, lower, upper)
            if self.tau_max is not None:
                delta = np.clip(delta, -self.tau_max, self.tau_max)
            if not delta.any():
                continue
            # What the client will train on: model-input space, its dtype (x' = x + Δ/σ).
            sample = torch.from_numpy(inputs[m] + delta / std).to(images.dtype)
            check = sample.to(torch.float64).numpy()
            if satisfied(constrained, check, assignment, m, self.epsilon / 2):
                trained[m] = sample.reshape(images.shape[1:]).to(images.device)
            else:  # a point the time limit cut short is no solution; a failing optimum is rejected
                result.status = "time_limit" if result.status == "feasible" else "rejected"
                result.delta = None
        # Step 6: unperturbed samples stay bit-identical to the private ones.
        # Only the assignment travels; the LPs' facts are the client's report, recorded with
        # the trial for the benchmark and never sent to the server.
        context.report["lp"] = {
            "solver": self.solver,
            "objective": self.objective,
            "status": [r.status for r in results],
            "value": [r.objective for r in results],
            "seconds": [r.seconds for r in results],
            "wall_seconds": wall,
            "time_limit": limit,
            "client_seconds": time.perf_counter() - started,
        }
        return trained, {"assignment": assignment}

    def reconstruct(self, observation: Observation) -> Reconstruction:
        linears = fcn_layers(observation.model)
        if linears[0][1].in_features != math.prod(observation.input_shape):
            raise ValueError(
                f"{describe(*linears[0])} takes {linears[0][1].in_features} features, but a "
                f"sample of shape {observation.input_shape} has "
                f"{math.prod(observation.input_shape)}"
            )
        layers = gather_layers(observation, linears, "the fishing attack")
        groups = assigned_groups(observation.client_state, len(layers) - 1)
        tolerance = resolve_tolerance(self.tolerance, observation.dtype)
        precision = update_precision(observation.dtype)
        grouping, disagreeing = assignment_grouping(layers, groups, tolerance, precision)
        recovery = recover_fcn(
            layers,
            tolerance=tolerance,
            min_group_size=MIN_GROUP_SIZE,
            assumed_label_probability=ASSUMED_LABEL_PROBABILITY,
            support_tolerance=SUPPORT_TOLERANCE,
            rank_tolerance=RANK_TOLERANCE,
            precision=precision,
            grouping=grouping,
        )
        images = recovery.inputs.reshape(-1, *observation.input_shape)
        info = dict(recovery.info)
        info["groups_assigned"] = sum(1 for g in groups if g)
        info["groups_disagreeing"] = disagreeing
        info["gradient_residual"] = checked_residual(
            observation, images, recovery, tolerance, precision
        )
        return Reconstruction(
            images=images,
            labels=recovery.labels,
            batch_size=recovery.batch_size,
            info=info,
        )


def assigned_groups(state: Any, relu_count: int) -> list[list[int]]:
    """The last ReLU layer's units per sample, from the client state (validated)."""
    if not isinstance(state, dict) or "assignment" not in state:
        raise TrialFailure(
            "the observation carries no fishing client state: the client hook did not run"
        )
    assignment = state["assignment"]
    if not isinstance(assignment, list) or len(assignment) != relu_count:
        raise TrialFailure(
            f"the client state assigns units in {len(assignment)} ReLU layers, the model has "
            f"{relu_count}: the reconstruction needs the last one"
        )
    groups = assignment[-1]
    if not all(isinstance(g, list) and all(isinstance(u, int) for u in g) for g in groups):
        raise TrialFailure("the client state's assignment is not lists of unit indices")
    return groups


def assignment_grouping(
    layers: list[LayerTensors], groups: list[list[int]], tolerance: float, precision: float
) -> tuple[Any, int]:
    """Step 7: the assigned units as ExAN groups; returns the grouping and the dropped count.

    Agreement is judged as ExAN's grouping judges it (:func:`units_agree`, exactly within
    :func:`link_tolerance`); the direction's sum is left to the scale test where it runs.
    """
    link = link_tolerance(tolerance, precision)
    last, output = layers[-2], layers[-1]
    columns = output.weight_grad.T
    units_total = columns.shape[0]
    candidates, disagreeing = [], 0
    for owned in groups:
        if any(u < 0 or u >= units_total for u in owned):
            raise TrialFailure(f"assigned unit index out of range for {units_total} units")
        units = torch.tensor(owned, dtype=torch.long)
        live = units[(columns[units].norm(dim=1) > 0) & (last.weight_grad[units].norm(dim=1) > 0)]
        if live.numel() < MIN_GROUP_SIZE:
            continue
        if not units_agree(columns[live], last.weight_grad[live], tolerance, link):
            disagreeing += 1
            continue
        candidates.append(live)
    if not candidates:
        raise TrialFailure(
            f"no assigned group of {len(groups)} has {MIN_GROUP_SIZE} agreeing units with a "
            f"non-zero gradient"
        )
    grouping = validated_grouping(
        columns, candidates, tolerance, MIN_GROUP_SIZE, check_sum=last.bias_grad is None
    )
    return grouping, disagreeing
