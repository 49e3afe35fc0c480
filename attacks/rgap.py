"""``rgap``: R-GAP, the Recursive Gradient Attack on Privacy (Zhu & Blaschko, ICLR 2021).

Paper: J. Zhu, M. B. Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR 2021,
arXiv:2010.07733. Reference code JunyiZhu-AI/R-GAP (read for the method, not copied).

Threat model: an honest-but-curious server that knows the architecture and the parameters and
observes one FedSGD update of a SINGLE sample (batch size 1 is R-GAP's assumption, not granted
knowledge). The label is not given (``label="infer"``) unless the run grants it
(``label="known"``, which requires ``Capability.LABELS``). Closed form, float64 throughout.

Notation: layer i maps x_i to x_{i+1} = f_i(W_i x_i + b_i); k_i = ∂ℓ/∂(W_i x_i + b_i). The loss is
the cross-entropy of the K logits z = W_d x_d (+ b_d); g = ∂ℓ/∂z = softmax(z) − e_y = k_d and
∇W_d = g x_dᵀ.

1. Last layer, one of three cases (``info["last_layer"]``):

   * ``"bias ratio"`` (extension; breaching's multi-class R-GAP): with a bias, k_d = ∇b_d,
     x_d = ∇W_dᵀ∇b_d / ‖∇b_d‖² (least squares over the rows) and y = argmin ∇b_d. Unique.
   * ``"logistic"`` — R-GAP's single-logit case, K = 2 without bias. Two softmax logits are one
     logit μ = (w_1 − w_0)·x_d under the logistic loss with y' = ±1 (label 1 ↔ +1):
     ∇w := (∇W_d[1] − ∇W_d[0]) / 2 = κ x_d with κ = −y'/(1 + e^{y'μ}), hence
     (w_1 − w_0)·∇w = φ(u) := −u/(1 + e^u) with u = y'μ; then κ = −y'/(1 + e^u), x_d = ∇w/κ.
     φ is strictly decreasing on u ≤ 0 and has its minimum φ(u*) = 1 − u* ≈ −0.2785 at
     u* ≈ 1.2785 (e^{u*}(u* − 1) = 1). A value c = (w_1 − w_0)·∇w ≥ 0 has one root u ≤ 0;
     φ(u*) < c < 0 has two, 0 < u_1 < u* < u_2 (the sample is classified correctly, with low
     or high confidence); c < φ(u*) (noise) has none, and u* is taken and flagged. Roots are
     found by bracketed Brent iterations to machine precision.
     Which root and which label: R-GAP's code runs Adam from u = 0, which converges to the
     root nearest 0 (``root="smaller"``); its demo reverses the client's label so that u < 0
     and the root is unique, which a benchmark cannot do to a client. ``root="larger"`` takes
     u_2. The default ``root="auto"`` decides from the observation alone:
       - the label (unless given): (x_d, y) and (−x_d, 1 − y) give the same last-layer
         gradient but, through a non-odd activation, different lower ones. Every (label, root)
         candidate runs the recursion; the label is the one whose reconstruction's own update
         best reproduces the observed update (relative L2 distance over all parameters,
         ``update_distance``). Candidates whose first solved layer already fits 1000× worse
         than the best stop there (``PRUNE_RATIO``).
       - the root: the update decides too, except on a positively homogeneous network (no
         biases; LeakyReLU/identity only). There x and (u_2/u_1)·x give IDENTICAL updates (all
         k_i scale by κ(u_2)/κ(u_1) = u_1/u_2, all x_i by u_2/u_1, so every k_i x_iᵀ is
         unchanged), and no attack can tell them apart from the update. We then use the pixel
         range the threat model fixes: a candidate image, de-normalised with the public
         mean/std, must stay within [−δ, 1 + δ] (δ = 0.05, for rounding); among those the
         larger-scale one is taken (the other is the same picture with its contrast divided by
         u_2/u_1), otherwise the one closest to the box. ``info["scale_ambiguity"]`` records
         it. On such networks the recursion runs from u_1 only and the u_2 solution is that one
         scaled by u_2/u_1 (exact, and better conditioned than solving with k_i shrunk by
         u_1/u_2); this holds for ``"smaller"`` and ``"larger"`` too.
   * ``"rank-one SVD"`` (our extension), K ≥ 3 without bias: the top singular
     pair gives ∇W_d ≈ a wᵀ with ‖a‖ = 1, so g = s·a and x_d = w/s for one unknown scalar s,
     fixed by softmax(W_d w / s) − e_y = s·a. The label is y = argmax_c |a_c| (|g_y| = Σ_{c≠y}
     g_c exceeds every other entry) and sign(s) = −sign(a_y). For c ≠ y,
     log(s·a_c) = h_c/s − logsumexp(h/s) with h = W_d w, so 1/s is the slope of log|a_c|
     against h_c: a least-squares line over the non-label classes (weights a_c², the inverse
     delta-method variances) gives s in closed form. The root is unique; no choice is made.

2. Going down (R-GAP's recursion): pre_i = f_i^{-1}(x_{i+1}),
   k_i = (W_{i+1}ᵀ k_{i+1}) ⊙ f_i'(pre_i) (a transposed convolution for a conv layer).
3. Fully connected layer: ∇W_i = k_i x_iᵀ, so x_i = ∇W_iᵀ k_i / ‖k_i‖² (gradient constraints
   only, as R-GAP's code). With a bias (extension) k_i := ∇b_i, its exact observed value.
4. Conv layer: least squares on R-GAP's gradient, weight and padding constraints
   (:mod:`leakbench.analysis.conv_system`); with a bias (extension) W x = pre − b.

Supported victims: an ``nn.Sequential`` of Conv2d (zero padding, no groups or dilation) and
Linear layers, Flatten, and invertible element-wise activations: LeakyReLU (slope > 0),
Sigmoid, Tanh, Identity. Biases are supported as an extension (R-GAP's victims have none).
Refused up front, naming the layer: ReLU (not invertible without its activation pattern),
pooling, batch norm, any other module, and a single output logit. Sigmoid or tanh values
outside the open range (rounding or noise) are clamped and counted (``clamped_activations``).

Batch size > 1 (when granted): refused, unless ``allow_combination=True`` on a fully connected
network. Then, as in R-GAP's README ("reconstruct the combination"), the same recursion runs on
the batch-mean update and returns ONE image, a linear combination of the batch's images,
flagged ``info["combination"] = True``.

Hyperparameters: ``root`` ("auto" | "smaller" | "larger"), ``label`` ("infer" | "known"),
``allow_combination`` (False).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import torch
from scipy.special import expit
from torch import nn

from leakbench.analysis.conv_system import ConvSystem
from leakbench.analysis.rank import Stage, network_layers, network_stages
from leakbench.client import fedsgd_update
from leakbench.interfaces import Attack, TrialFailure, UnsupportedModelError
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction

ROOTS = ("auto", "smaller", "larger")
LABEL_SOURCES = ("infer", "known")
# argmin of φ(u) = −u/(1 + e^u): the root of e^u (u − 1) = 1; φ(U_STAR) = 1 − U_STAR.
U_STAR = 1.2784645427610737
_EPS = float(np.finfo(np.float64).eps)
# How far (in [0, 1] pixel units) a de-normalised candidate may leave the pixel box and still
# count as inside it, when choosing between scale-equivalent candidates.
BOX_SLACK = 0.05
# A candidate whose first solved layer fits PRUNE_RATIO times worse than the best is dropped.
PRUNE_RATIO = 1e3


def check_invertible(model: nn.Module, who: str = "R-GAP") -> None:
    """Refuse, naming the layer, what R-GAP's recursion cannot invert."""
    layers = network_layers(model, who)
    for name, module in layers:
        if isinstance(module, nn.ReLU):
            raise UnsupportedModelError(
                f"{who} cannot invert layer '{name}' (ReLU): ReLU is not invertible without a "
                "known activation pattern"
            )
        if isinstance(module, nn.LeakyReLU) and not module.negative_slope > 0:
            raise UnsupportedModelError(
                f"{who} cannot invert layer '{name}' (LeakyReLU): its negative slope "
                f"{module.negative_slope} is not positive"
            )
    name, last = layers[-1]
    if last.out_features < 2:
        raise UnsupportedModelError(
            f"{who} needs at least two logits; layer '{name}' has {last.out_features}, and "
            "cross-entropy over one logit has a zero gradient"
        )


@dataclass
class Candidate:
    """One solution of the last layer: its input x_d, k_d = ∂ℓ/∂z and the label it implies."""

    x: np.ndarray
    k: np.ndarray
    label: int
    detail: dict[str, Any] = field(default_factory=dict)


def logistic_roots(c: float) -> tuple[list[float], bool]:
    """All roots of φ(u) = −u/(1 + e^u) = c, ascending, and whether an exact root exists."""

    def phi(u: float) -> float:
        return float(-u * expit(-u))

    def solve(lo: float, hi: float) -> float:
        return float(
            scipy.optimize.brentq(lambda u: phi(u) - c, lo, hi, xtol=1e-300, rtol=4 * _EPS)
        )

    if c == 0:
        return [0.0], True
    if c > 0:  # φ(u) ≥ −u/2 for u ≤ 0, so φ(−2c − 1) > c brackets the root
        return [solve(-2 * c - 1, 0.0)], True
    if c <= phi(U_STAR):
        return [U_STAR], c == phi(U_STAR)
    hi = 2 * U_STAR
    while phi(hi) <= c:  # φ → 0⁻ as u → ∞
        hi *= 2
    return [solve(0.0, U_STAR), solve(U_STAR, hi)], True


def last_layer_candidates(
    weight: np.ndarray,
    bias: np.ndarray | None,
    grad_weight: np.ndarray,
    grad_bias: np.ndarray | None,
    label: int | None,
) -> tuple[str, list[Candidate]]:
    """The last-layer case (see the module docstring) and ALL its candidate solutions."""
    if grad_bias is not None:
        norm = float(grad_bias @ grad_bias)
        if norm == 0:
            raise TrialFailure("the last-layer bias gradient is zero: the loss is saturated")
        x = grad_weight.T @ grad_bias / norm
        return "bias ratio", [Candidate(x, grad_bias.copy(), int(np.argmin(grad_bias)))]
    if weight.shape[0] == 2:
        return "logistic", _logistic_candidates(weight, grad_weight, label)
    return "rank-one SVD", [_rank_one_candidate(weight, grad_weight, label)]


def _logistic_candidates(
    weight: np.ndarray, grad_weight: np.ndarray, label: int | None
) -> list[Candidate]:
    grad_row = (grad_weight[1] - grad_weight[0]) / 2
    if not np.any(grad_row):
        raise TrialFailure("the last-layer gradient is zero: nothing to invert")
    c = float((weight[1] - weight[0]) @ grad_row)
    roots, exact = logistic_roots(c)
    candidates = []
    for y in (0, 1) if label is None else (label,):
        sign = 1.0 if y == 1 else -1.0
        for index, u in enumerate(roots):
            kappa = -sign * float(expit(-u))
            detail = {"u": u, "root": index + 1, "roots": len(roots), "exact_root": exact}
            candidates.append(Candidate(grad_row / kappa, np.array([-kappa, kappa]), y, detail))
    return candidates


def _rank_one_candidate(
    weight: np.ndarray, grad_weight: np.ndarray, label: int | None
) -> Candidate:
    left, sigma, right = np.linalg.svd(grad_weight, full_matrices=False)
    if sigma[0] == 0:
        raise TrialFailure("the last-layer gradient is zero: nothing to invert")
    a, w = left[:, 0], sigma[0] * right[0]
    y = int(np.argmax(np.abs(a))) if label is None else int(label)
    sign = -np.sign(a[y])
    h = weight @ w
    others = [c for c in range(len(a)) if c != y and a[c] * sign > 0]
    if sign == 0 or len(others) < 2 or np.ptp(h[others]) == 0:
        raise TrialFailure(
            "the last-layer gradient does not fix the scale: fewer than two non-label classes "
            "with the expected sign and distinct logits"
        )
    root_weight = np.abs(a[others])  # square roots of the least-squares weights a_c²
    design = np.stack([h[others], np.ones(len(others))], axis=1) * root_weight[:, None]
    (slope, _), *_ = np.linalg.lstsq(design, np.log(np.abs(a[others])) * root_weight, rcond=None)
    if slope == 0 or np.sign(slope) != sign:
        raise TrialFailure("the last-layer gradient is inconsistent with one softmax sample")
    scale = 1.0 / slope
    return Candidate(w / scale, scale * a, y, {"scale": float(scale)})


def invert_activations(
    activations: tuple[nn.Module, ...], y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pre-activation, the activations' derivative there, and how many values were clamped."""
    derivative, clamped = np.ones_like(y), 0
    for activation in reversed(activations):
        if isinstance(activation, nn.LeakyReLU):
            slope = activation.negative_slope
            y = np.where(y > 0, y, y / slope)
            step = np.where(y > 0, 1.0, slope)
        elif isinstance(activation, nn.Sigmoid):
            inside = np.clip(y, np.finfo(np.float64).tiny, 1 - _EPS / 2)
            clamped += int(np.count_nonzero(inside != y))
            y, step = np.log(inside) - np.log1p(-inside), inside * (1 - inside)
        elif isinstance(activation, nn.Tanh):
            inside = np.clip(y, -1 + _EPS / 2, 1 - _EPS / 2)
            clamped += int(np.count_nonzero(inside != y))
            y, step = np.arctanh(inside), 1 - inside**2
        else:  # nn.Identity
            step = 1.0
        derivative = derivative * step
    return y, derivative, clamped


@dataclass
class _Layer:
    """A stage with its parameters and observed gradients, as float64 arrays."""

    stage: Stage
    weight: np.ndarray
    bias: np.ndarray | None
    grad_weight: np.ndarray
    grad_bias: np.ndarray | None

    @classmethod
    def of(cls, stage: Stage, observed: dict[str, torch.Tensor]) -> _Layer:
        names = [f"{stage.name}.weight"]
        if stage.layer.bias is not None:
            names.append(f"{stage.name}.bias")
        missing = [n for n in names if n not in observed]
        if missing:
            raise TrialFailure(f"the update lacks gradients for {missing}")
        arrays = [observed[n].numpy() for n in names]
        return cls(
            stage=stage,
            weight=stage.layer.weight.detach().numpy(),
            bias=None if stage.layer.bias is None else stage.layer.bias.detach().numpy(),
            grad_weight=arrays[0],
            grad_bias=arrays[1] if len(arrays) > 1 else None,
        )

    def input_gradient(self, k: np.ndarray) -> np.ndarray:
        """``Wᵀk``: the loss gradient with respect to the layer's input."""
        stage = self.stage
        if isinstance(stage.layer, nn.Linear):
            return self.weight.T @ k.ravel()
        return torch.nn.grad.conv2d_input(
            (1, *stage.in_shape),
            torch.from_numpy(self.weight),
            torch.from_numpy(k.reshape(1, *stage.out_shape)),
            stride=stage.layer.stride,
            padding=stage.layer.padding,
        )[0].numpy()


@dataclass
class _Walk:
    """The recursion from one last-layer candidate, one layer at a time."""

    candidate: Candidate
    x: np.ndarray  # input of layers[depth]
    k: np.ndarray  # ∂ℓ/∂(output of layers[depth])
    depth: int
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    clamped: int = 0
    failure: str | None = None
    image: torch.Tensor | None = None
    distance: float = math.inf  # relative distance of the image's own update to the observed

    def step(self, layers: list[_Layer]) -> None:
        """Solve for the input of the next layer down."""
        upper, layer = layers[self.depth], layers[self.depth - 1]
        stage = layer.stage
        pre, derivative, n = invert_activations(stage.activations, self.x.reshape(stage.out_shape))
        self.clamped += n
        k = upper.input_gradient(self.k).reshape(stage.out_shape) * derivative
        if isinstance(stage.layer, nn.Linear):
            if layer.grad_bias is not None:
                k = layer.grad_bias
            norm = float(k @ k)
            if norm == 0:
                raise TrialFailure(f"k vanishes at layer '{stage.name}': its input is not seen")
            x = layer.grad_weight.T @ k / norm
            fit = np.linalg.norm(layer.grad_weight - np.outer(k, x))
            report = {
                "solver": "gradient constraints",
                "relative_residual": float(fit / np.linalg.norm(layer.grad_weight)),
            }
        else:
            solution = ConvSystem(stage.geometry(), layer.weight, k).solve(
                layer.grad_weight, pre, layer.bias
            )
            x = solution.x
            report = {
                "solver": solution.method,
                "rank": solution.rank,
                "unknowns": solution.unknowns,
                "relative_residual": solution.relative_residual,
            }
        self.diagnostics.append({"layer": stage.name, **report})
        self.x, self.k, self.depth = x.ravel(), k, self.depth - 1

    def scaled(self, candidate: Candidate, factor: float) -> _Walk:
        """The same walk with every layer input multiplied by ``factor`` (homogeneous nets)."""
        assert self.image is not None
        note = {"solver": f"scaled ×{factor:.6g} from the smaller root"}
        return _Walk(
            candidate,
            self.x * factor,
            self.k / factor,
            self.depth,
            [{**d, **note} for d in self.diagnostics],
            self.clamped,
            image=self.image * factor,
        )

    @property
    def residual(self) -> float:
        return self.diagnostics[-1]["relative_residual"] if self.diagnostics else 0.0

    def summary(self) -> dict[str, Any]:
        outcome = {"failed": self.failure} if self.failure else {"update_distance": self.distance}
        return {"label": self.candidate.label, **self.candidate.detail, **outcome}


def _walk_all(layers: list[_Layer], candidates: list[Candidate]) -> list[_Walk]:
    """Run the recursion for every candidate, layer by layer, all in step.

    After the first solved layer, candidates whose relative residual exceeds the best one's by
    more than ``PRUNE_RATIO`` stop there: the update, not the pruning, would reject them anyway,
    and the pruning saves their remaining solves.
    """
    walks = [_Walk(c, c.x, c.k, len(layers) - 1) for c in candidates]
    active = list(walks)
    for depth in range(len(layers) - 1, 0, -1):
        for walk in active:
            try:
                walk.step(layers)
            except TrialFailure as err:
                walk.failure = str(err)
        active = [w for w in active if w.failure is None]
        if depth == len(layers) - 1 and active:
            floor = min(w.residual for w in active)
            for walk in active:
                if walk.residual > PRUNE_RATIO * floor + _EPS:
                    walk.failure = (
                        f"pruned after layer '{walk.diagnostics[-1]['layer']}': relative "
                        f"residual {walk.residual:.2e} vs best {floor:.2e}"
                    )
            active = [w for w in active if w.failure is None]
    return walks


def _update_distance(model: nn.Module, image: torch.Tensor, label: int, observed: dict) -> float:
    """‖∇θ ℓ(image, label) − observed‖ / ‖observed‖ over all parameters."""
    update = fedsgd_update(model, image, torch.tensor([label]))
    num = sum(float(((update[n] - g) ** 2).sum()) for n, g in observed.items())
    den = sum(float((g**2).sum()) for g in observed.values())
    return math.sqrt(num / den) if den > 0 else math.inf


def rgap_reconstruct(
    observation: Observation,
    *,
    root: str = "auto",
    label: int | None = None,
    allow_combination: bool = False,
) -> Reconstruction:
    """R-GAP on one observation.

    ``label``, when given, fixes the label in the logistic and rank-one cases; the bias-ratio
    case reads it from ∇b_d regardless.
    """
    batch = observation.batch_size
    if batch is not None and batch > 1 and not allow_combination:
        raise TrialFailure(
            f"R-GAP inverts the update of one sample; this batch has {batch} (allow_combination"
            "=True returns R-GAP's combination image on fully connected networks)"
        )
    combination = batch is not None and batch > 1
    model = copy.deepcopy(observation.model).to(device="cpu", dtype=torch.float64)
    check_invertible(model)
    stages = network_stages(model, observation.input_shape, "R-GAP")
    if combination and any(isinstance(s.layer, nn.Conv2d) for s in stages):
        raise TrialFailure("R-GAP's combination for batches is defined for FC networks only")
    observed = {n: g.detach().to("cpu", torch.float64) for n, g in observation.update.items()}
    layers = [_Layer.of(stage, observed) for stage in stages]
    top = layers[-1]
    case, candidates = last_layer_candidates(
        top.weight, top.bias, top.grad_weight, top.grad_bias, label
    )
    homogeneous = case == "logistic" and _positively_homogeneous(stages)

    def wanted(candidate: Candidate) -> bool:
        if case != "logistic" or (root == "auto" and not homogeneous):
            return True
        if homogeneous or root == "smaller":
            # On a homogeneous network the larger root's solution is the smaller one's scaled
            # (module docstring): solve once per label, from the better-conditioned root.
            return candidate.detail["root"] == 1
        return candidate.detail["root"] == candidate.detail["roots"]

    walks = _walk_all(layers, [c for c in candidates if wanted(c)])
    for walk in walks:
        if walk.failure is None:
            walk.image = torch.from_numpy(walk.x).reshape(1, *observation.input_shape)
            walk.distance = _update_distance(model, walk.image, walk.candidate.label, observed)
    done = [w for w in walks if w.image is not None]
    if not done:
        raise TrialFailure("; ".join(str(w.failure) for w in walks))
    best = min(done, key=lambda w: w.distance)
    scale_ambiguity = False
    if homogeneous and best.candidate.detail["roots"] == 2 and root != "smaller":
        larger = next(
            c for c in candidates if c.label == best.candidate.label and c.detail["root"] == 2
        )
        twin = best.scaled(larger, larger.detail["u"] / best.candidate.detail["u"])
        twin.distance = _update_distance(model, twin.image, larger.label, observed)
        walks.append(twin)
        scale_ambiguity = root == "auto"
        best = _inside_pixel_box([best, twin], observation) if scale_ambiguity else twin
    info = {
        "last_layer": case,
        "label": best.candidate.label,
        "label_given": label is not None,
        **best.candidate.detail,
        "update_distance": best.distance,
        "candidates": [w.summary() for w in walks],
        "layers": best.diagnostics,
        "clamped_activations": best.clamped,
        "combination": combination,
        "scale_ambiguity": scale_ambiguity,
    }
    assert best.image is not None
    return Reconstruction(
        images=best.image.to(observation.dtype),
        labels=None if combination else torch.tensor([best.candidate.label]),
        info=info,
    )


def _positively_homogeneous(stages: list[Stage]) -> bool:
    """f(αx) = αf(x) for α > 0: no biases, only LeakyReLU and identity activations."""
    return all(
        stage.layer.bias is None
        and all(isinstance(a, (nn.LeakyReLU, nn.Identity)) for a in stage.activations)
        for stage in stages
    )


def _inside_pixel_box(walks: list[_Walk], observation: Observation) -> _Walk:
    """Among scale-equivalent candidates: the largest one inside the pixel box (see module)."""

    def excess(walk: _Walk) -> float:
        assert walk.image is not None
        pixels = observation.to_image_space(walk.image[0])
        return max(0.0, -float(pixels.min()), float(pixels.max()) - 1.0)

    inside = [w for w in walks if excess(w) <= BOX_SLACK]
    if inside:
        return max(inside, key=lambda w: float(np.linalg.norm(w.x)))
    return min(walks, key=excess)


@register_attack("rgap")
class RGAP(Attack):
    requires = frozenset()
    # SoK letter: B, as the SoK gives R-GAP.
    threat_letter = "B"
    max_batch_size = 1  # a single-sample system; allow_combination=True lifts the limit
    threat_model = (
        "honest-but-curious server observing one FedSGD update of a single sample; knows the "
        "architecture and the parameters; label inferred (or granted with label='known')"
    )

    def __init__(
        self, root: str = "auto", label: str = "infer", allow_combination: bool = False
    ) -> None:
        super().__init__(root=root, label=label, allow_combination=allow_combination)
        if root not in ROOTS:
            raise ValueError(f"root must be one of {ROOTS}, got {root!r}")
        if label not in LABEL_SOURCES:
            raise ValueError(f"label must be one of {LABEL_SOURCES}, got {label!r}")
        self.root = root
        self.label = label
        self.allow_combination = bool(allow_combination)
        # One sample per update, unless the caller asked for R-GAP's documented combination.
        self.max_batch_size = None if self.allow_combination else 1
        if label == "known":
            self.requires = frozenset({Capability.LABELS})

    def check_model(self, model: nn.Module) -> None:
        check_invertible(model)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        label = None
        if self.label == "known":
            if observation.labels is None:
                raise TrialFailure("label='known' needs the labels capability")
            label = int(observation.labels[0])
        return rgap_reconstruct(
            observation, root=self.root, label=label, allow_combination=self.allow_combination
        )
