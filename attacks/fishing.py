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
server: ``{"lp": {"solver", "solver_version", "objective" (the kind), "assignment" (the
rule), "status", "value" (the optimum: the perturbation's L2, L∞ or L1 size in pixel units),
"seconds" (one per sample), "cpu_seconds" (the solving thread's CPU time, per sample: what
the LP costs without the machine's load), "rows" ([given to the solver, in the LP] per sample),
"unprotected" (the samples left unperturbed, each with its status: a time limit, say, names
here the sample whose reconstruction it costs), "workers", "wall_seconds" (all LPs),
"time_limit" (per LP), "client_seconds" (the whole hook)}}``. Victims: the ExAN attack's
ReLU FCNs (``Flatten``, (``Linear``, ``ReLU``) × L, ``Linear``), with biases for exact recovery.

The paper's own LP is not reproduced here (only its abstract could be read); this is our
formulation of the idea it describes, of which the paper gives the objective (a small
perturbation that makes the batch exclusive) but not the constraints. Notation: pixels p_m ∈ [0,
1]^d of sample m (the model input is x_m = (p_m − μ)/σ per channel), perturbation Δ_m, ReLU
layers l = 1..L with pre-activations a_m^l. Every sample m owns a set J_m^l of k ≥ 1 units of
each constrained layer, disjoint across samples; O_m^l = ∪_{m' ≠ m} J_{m'}^l are the units the
other samples own. With margin ε > 0, the program of sample m is

    minimise   ‖Δ_m‖_2 (default; or ‖Δ_m‖_∞, ‖Δ_m‖_1)
    subject to a_m^l[j](p_m + Δ_m) ≥ ε     for j ∈ J_m^l        (owner active)
               a_m^l[j](p_m + Δ_m) ≤ −ε    for j ∈ O_m^l        (exclusivity)
               0 ≤ p_m + Δ_m ≤ 1                                (a valid image)
               ‖Δ_m‖_∞ ≤ τ_max                                  (optional budget)

On the first layer a^1(p + Δ) = a^1(p) + (W_1 diag(1/σ)) Δ is affine, so this is a convex QP
(L2: a least-distance program) or an LP (L∞, L1). After it every sample activates its own units
and none of the others', so each owns ≥ k ExANs. The programs of different samples share no
variable: M independent programs (called "LPs" below for all three objectives). With
``layers="all"`` (multi-layer FCNs) every ReLU layer is constrained: the target pattern T_m^l
of sample m is its current one with its own units switched on and the others' switched off;
inside the region where the layers below l follow their targets the network is affine in Δ_m,
a^{l+1} = W_{l+1} diag(T_m^l) a^l + b_{l+1}, so keeping every unit of layers 1..L−1 on its
target side (margin ε) and imposing the constraints above on layer L keeps the program's kind.

How many ExANs exclusivity needs. The ExAN attack's condition (≥ 2 ExANs per sample in the
last ReLU layer, ≥ 1 in the others; :mod:`leakbench.attacks.exan`) serves its blind grouping:
a lone unit cannot be told from a shared one by agreement. Here the server knows the
assignment, and one ExAN j of sample m per layer gives everything: column j of Ḡ_H is
(1/M) h_m[j] g_m (the label, and with the bias the exact loss vector through the gradient-scale
test, which also drops a group whose unit an unprotected sample shares), and the bias ratio of
row j gives the layer's input exactly. So k = 1 (default) is the minimum; each further unit
per sample adds B − 1 constraints to every other sample's program.

The objective. PSNR(perturbed, original) is a function of ‖Δ_m‖_2 alone (−10 log10(‖Δ‖²/d)),
so the L2 objective gives every sample its largest PSNR under its constraints: its optimum is at
most the L2 norm of any point the L∞ or L1 LP can return. The L∞ optimum spreads Δ over all
pixels at ±τ (PSNR ≈ −20 log10 τ, about 2 dB below the L2 optimum on lfw-subset); the L1 one
moves few pixels far (about 10 dB below). The margin ε (pre-activation units, against |a| of
order 1) costs little: 1e-5 and 1e-3 give the same PSNR to 0.1 dB, 1e-2 0.3 dB less at B = 64.
It is 1e-2 for float32 exactness with one unit per sample: the L2 optimum leaves the owner's
unit at exactly ε when it had to be switched on, and at ε = 1e-3 the gradient-scale test
could not resolve that lone unit's activation from a float32 update (one sample of 64 dropped
in 4 of 40 lfw-subset batches); at 1e-2 none was.

The L∞ LP is solved in its homogeneous form: with s = Δ/τ and t = 1/τ it becomes

    maximise t  subject to  G s ≥ c t,  −1 ≤ s ≤ 1,  lo t ≤ s ≤ hi t,  t ≥ max(1, 1/τ_max)

(G Δ ≥ c are the activation constraints, [lo, hi] = [−p, 1 − p] the box). Same optimum, but
the L∞ ball becomes variable bounds instead of 2d rows, which takes the simplex about 3× fewer
iterations. t ≥ 1 holds for every feasible point (|Δ| ≤ 1 in [0, 1]), so an infeasible
original is an infeasible homogeneous LP. The L1 LP splits Δ = u − v with u, v ≥ 0. The rows
are arrays and reach HiGHS only as they bind (:mod:`leakbench.attacks._fishing_lp`): a unit
far inactive for the sample, or a pixel far from 0 and 1, costs the solver nothing.

What bounds the perturbation: every unit another sample owns must be off for sample m, so m
switches off those of the k(B − 1) units the others own that it activates (on the ExAN
paper's lfw-subset FCN every unit is active for 40-60 % of any batch), and the smallest
perturbation that does grows with B. With the L2 objective the program's optimum is that
smallest perturbation for the given units, so the assignment alone is left: it chooses the
k·B units and their owners in a squared-L2 proxy (each switch's squared distance
(a + ε)²/‖g_j‖², summed; the rows g_j are nearly orthogonal and the proxy is within 0.2 dB of
the programs' optima). ``min_cost`` (default) minimises the batch's summed squared
perturbation exactly in the proxy (an assignment problem), i.e. its mean MSE. Weighting the
samples differently moves the median little: ``max_psnr`` (the sum of the samples' log squared
perturbations, i.e. their mean PSNR) and the powers between them change the median by less
than 0.5 dB at B = 64 and lower the worst samples' PSNR by up to 9 dB. What is left is the
condition itself: one exclusive unit per sample, so every sample switches off each of the
other B − 1 samples' units that it activates.

Steps, as :meth:`Fishing.client_hook` runs them (float64):

1. Pixels and pre-activations: p_m = x_m σ + μ; a_m^l of every constrained layer at p_m.
2. Assignment, per constrained layer (:mod:`leakbench.attacks._fishing_lp`; in deeper layers
   the weight rows stand in for the pixel Jacobian). ``"min_cost"`` (default): the k·B units
   and their owners that cost the perturbations least in total in the proxy, a rectangular
   assignment problem. ``"max_psnr"``: those that maximise the samples' mean PSNR in the
   proxy, by reweighted assignment problems.
   ``"margin"``: greedily, the (sample, unit) pairs with the largest exclusivity margin
   min(a_m[j] − ε, −ε − max_{m' ≠ m} a_{m'}[j]) over the unit's L1 weight norm in pixel space,
   until each sample owns k units. Both read the batch, so they run on the client and only
   their result travels. ``"seeded"``: a permutation of the units drawn from the trial's
   public seed, k consecutive units per sample, which the server could recompute. Samples that
   find no k free units are ``unassigned``.
3. One program per assigned sample, its rows as arrays; a sample whose unperturbed pixels
   satisfy every constraint needs no solver (objective 0).
4. The programs are solved in ``workers`` threads (default: the usable cores; NNLS and HiGHS
   release the GIL and CBC runs as a subprocess, so the solves overlap): the L2 objective's
   least-distance program by SciPy's NNLS (its dual), the LPs by HiGHS in-process (default)
   or CBC (every row, one process per LP); rows are added as they bind except for CBC; each
   single-threaded and under a time limit (NNLS: checked between its rounds of rows):
   ``time_limit`` if set, else half the trial's ``max_seconds`` spread over the LPs
   (``BUDGET_SHARE``), else ``DEFAULT_LP_SECONDS``.
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
   as loss-vector directions (:func:`leakbench.attacks.exan.validated_grouping`); with k = 1
   a group is one unit and the scale test of step 8 alone tells a sample from a shared unit.
8. The rest of the ExAN attack unchanged (:func:`leakbench.attacks.exan.recover_fcn`): the
   gradient-scale test keeps the groups that are samples and infers the batch size M (so M
   does not come from the assignment), the top-down bias ratios give the inputs exactly, and
   the labels come from the loss-vector directions.

Hyperparameters (documented defaults; until issue 22 they were k 2, ``linf``, epsilon 1e-3):
``k`` (1) units per sample and constrained layer; ``epsilon`` (1e-2) the activation margin, in
pre-activation units; ``objective`` (``"l2"``, ``"linf"`` or ``"l1"``); ``tau_max`` (None)
an L∞ budget in pixel units for every objective; ``solver`` (``"highs"`` or ``"cbc"``) the
LP solver of ``linf`` and ``l1`` (``l2`` takes the default and is solved by NNLS);
``assignment`` (``"min_cost"``, ``"max_psnr"``, ``"margin"`` or ``"seeded"``);
``layers``
(``"all"``: every ReLU layer, or ``"first"``: the paper's first-layer LP, which equals
``"all"`` on one hidden layer; the reconstruction needs the last ReLU layer's units, so
``"first"`` is refused for deeper FCNs); ``workers`` (None: the usable cores) parallel LPs;
``time_limit`` (None)
seconds per LP; ``tolerance`` (None) as in ``exan``. ``Budget.max_iterations`` does not apply:
the attack does not iterate.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from leakbench.attacks._fishing_lp import (
    LP_SOLVERS,
    LPResult,
    ReluLayer,
    assign_margin,
    assign_max_psnr,
    assign_min_cost,
    assign_seeded,
    per_pixel,
    pre_activations,
    relu_layers,
    sample_lp,
    solve_sample,
    solver_version,
)
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

OBJECTIVES = ("l2", "linf", "l1")
ASSIGNMENTS = ("min_cost", "max_psnr", "margin", "seeded")
LAYERS = ("all", "first")
DEFAULT_LP_SECONDS = 60.0  # per LP when the trial sets no time budget: nothing hangs
BUDGET_SHARE = 0.5  # of the trial's max_seconds that all LPs together may take
MIN_LP_SECONDS = 0.05
SOLVED = ("optimal", "feasible")  # statuses of a sample the client trains on perturbed
# Exactness of the reconstruction: the rest of the ExAN attack's hyperparameters, at its defaults.
# Units per group the reconstruction checks for agreement: ExAN's 2, or k where groups are smaller.
GROUP_SIZE = 2
SUPPORT_TOLERANCE = 0.0
RANK_TOLERANCE = 1e-10
ASSUMED_LABEL_PROBABILITY = 1 / 3


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


def usable_cores() -> int:
    """The cores this process may run on (its affinity), the LPs' default parallelism."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


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
        k: int = 1,
        epsilon: float = 1e-2,
        objective: str = "l2",
        tau_max: float | None = None,
        solver: str = "highs",
        assignment: str = "min_cost",
        layers: str = "all",
        workers: int | None = None,
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
        self.solver = check_choice("solver", solver, LP_SOLVERS)
        if self.objective == "l2" and self.solver != "highs":
            raise ValueError(
                f"solver {solver!r} solves the LP objectives (linf, l1); objective 'l2' is a "
                f"least-distance QP, solved by SciPy's NNLS"
            )
        self.assignment = check_choice("assignment", assignment, ASSIGNMENTS)
        self.layers = check_choice("layers", layers, LAYERS)
        self.workers = usable_cores() if workers is None else positive_int("workers", workers)
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

    def assign(
        self, layer: int, pre: np.ndarray, jacobian: np.ndarray, seed: int
    ) -> list[list[int]]:
        """Step 2 for one constrained layer: each sample's k units (or [] if it got none)."""
        if self.assignment == "seeded":
            return assign_seeded(pre.shape[0], pre.shape[1], self.k, seed, layer)
        if self.assignment == "margin":
            return assign_margin(pre, np.abs(jacobian).sum(axis=1), self.k, self.epsilon)
        if self.assignment == "max_psnr":
            return assign_max_psnr(pre, jacobian, self.k, self.epsilon)
        return assign_min_cost(pre, jacobian, self.k, self.epsilon)

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
        assignment = [
            self.assign(
                depth, pre[depth], pixel_jacobian if depth == 0 else layer.weight, context.seed
            )
            for depth, layer in enumerate(constrained)
        ]
        assigned = [m for m in range(batch) if all(owned[m] for owned in assignment)]
        # Step 3 and 4.
        limit = self.lp_seconds(context, len(assigned))

        def solve(m: int) -> LPResult:
            problem = sample_lp(m, layers, pre, assignment, pixel_jacobian, pixels, self.epsilon)
            return solve_sample(problem, self.objective, self.tau_max, self.solver, limit)

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
        solver = "nnls" if self.objective == "l2" else self.solver
        context.report["lp"] = {
            "solver": solver,
            "solver_version": solver_version(solver),
            "objective": self.objective,
            "assignment": self.assignment,
            "status": [r.status for r in results],
            "value": [r.objective for r in results],
            "seconds": [r.seconds for r in results],
            "cpu_seconds": [r.cpu_seconds for r in results],
            "rows": [[r.rows_given, r.rows_total] for r in results],
            "unprotected": [
                {"sample": m, "status": r.status}
                for m, r in enumerate(results)
                if r.status not in SOLVED
            ],
            "workers": self.workers,
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
        min_group_size = min(self.k, GROUP_SIZE)
        grouping, disagreeing = assignment_grouping(
            layers, groups, tolerance, precision, min_group_size
        )
        recovery = recover_fcn(
            layers,
            tolerance=tolerance,
            min_group_size=min_group_size,
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
    layers: list[LayerTensors],
    groups: list[list[int]],
    tolerance: float,
    precision: float,
    min_group_size: int,
) -> tuple[Any, int]:
    """Step 7: the assigned units as ExAN groups (those with ``min_group_size`` live units);
    returns the grouping and the dropped count.

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
        if live.numel() < min_group_size:
            continue
        if not units_agree(columns[live], last.weight_grad[live], tolerance, link):
            disagreeing += 1
            continue
        candidates.append(live)
    if not candidates:
        raise TrialFailure(
            f"no assigned group of {len(groups)} has {min_group_size} agreeing units with a "
            f"non-zero gradient"
        )
    grouping = validated_grouping(
        columns, candidates, tolerance, min_group_size, check_sum=last.bias_grad is None
    )
    return grouping, disagreeing
