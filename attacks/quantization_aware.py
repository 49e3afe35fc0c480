"""``quantization-aware``: gradient matching against the set of updates a known quantiser maps
to the shared one.

Defense it adapts to: :mod:`leakbench.defenses.quantization` (QSGD, uniform b-bit, scaled
sign). Threat model: an honest-but-curious server that knows the architecture, the parameters,
the batch size and the quantiser (scheme and levels or bits: Kerckhoffs; QSGD's random rounding
stays the client's), and observes one quantised update. Labels are used if granted, otherwise
read from the signs of the output bias gradient, which every scheme keeps, else learned.

The attack replaces the generic distance by the quantiser's own observation model (the
known-channel view of Balunović et al., "Bayesian Framework for Gradient Leakage", ICLR 2022:
the defended update is an observation of the client's through a known channel), per scheme,
with g' the dummy's update and q the shared one, tensor by tensor:

* ``uniform`` (b bits, deterministic): the tensor's minimum m and maximum M are shared exactly
  (they quantise to themselves), the step is w = (M − m)/(2^b − 1), and round-to-nearest puts
  the client's v_i in I_i = [q_i − w/2, q_i + w/2]. The distance is zero exactly on the updates
  the quantiser maps to q:  D = Σ_i dist(g'_i, I_i)² / Σ_i q_i².
* ``qsgd`` (s levels, random rounding): q_i = c · sign(v_i) · k_i with c = ‖v‖/s and the level
  k_i = ⌊r_i⌋ + Bernoulli(r_i − ⌊r_i⌋), r_i = |v_i|/c; so P(k_i | r_i) = max(0, 1 − |r_i − k_i|)
  (the tent: the two levels around r_i, with the weights QSGD rounds by). c is read back from q
  as the largest unit of which every |q_i| is an integer multiple of at most s (QSGD transmits
  ‖v‖). D is the mean negative log-likelihood of the observed levels with r_i = σ_i g'_i / c
  (σ_i the observed sign where k_i > 0; |g'_i|/c where k_i = 0), the tent floored at 0.01 and
  continued linearly beyond so that an inconsistent entry still has a gradient. The generic
  cosine treats q as g' plus noise and ignores which levels were possible.
* ``sign`` (scaled sign, deterministic): q_i = a · sign(v_i), a = ‖v‖₁/n. The attack applies
  the quantiser to the dummy's update, with the smooth sign a · tanh(g'_i / w), w = 0.1 ·
  mean |g'| (so that it has a gradient), and D = 1 − cos(Q(g'), q): the dummy is asked to
  produce the same signs, not the same magnitudes.

D is minimised with Inverting Gradients' optimiser and total-variation prior
(:mod:`leakbench.attacks._defense_aware`): among the updates consistent with what was shared,
the prior picks a natural input.

Closed-form start (for a first ``nn.Linear`` with a bias at one sample): Phong et al.'s bias
attack on the quantised update (:mod:`leakbench.attacks.bias`), clamped to the valid inputs.

Steps, as :meth:`QuantizationAware.reconstruct` runs them:

1. the scheme's distance D (uniform: the intervals; QSGD: the unit c and the observed levels);
2. the closed-form start where it applies;
3. the matching, ``restarts`` runs sharing the trial budget, the one with the smallest final D
   returned.

Hyperparameters: ``scheme``, ``levels``, ``bits`` (the defense's); the schedule
``iterations`` (2000; Inverting Gradients' published budget is 24 000), ``lr`` (0.1),
``tv_weight`` (1e-4), ``restarts`` (1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leakbench.attacks._defense_aware import (
    DefenseAwareAttack,
    Distance,
    MatchingSchedule,
    match,
)
from leakbench.attacks.bias import BiasAttack
from leakbench.defenses.quantization import SCHEMES
from leakbench.interfaces import TrialFailure, UnsupportedModelError, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction

# Relative tolerance of "an integer multiple of the unit" when reading QSGD's unit back.
UNIT_TOLERANCE = 1e-3
# QSGD's likelihood 1 − |r − k| is floored here; beyond, the loss grows linearly (a gradient
# still points back to the levels the client could have sent).
LIKELIHOOD_FLOOR = 0.01
# The smooth sign tanh(g / w) of the scaled-sign scheme: w is this fraction of mean |g|.
SIGN_WIDTH = 0.1


def qsgd_unit(shared: Tensor, levels: int) -> float:
    """c = ‖v‖/s: the largest c such that every |q_i|/c is an integer k_i ≤ s."""
    magnitudes = shared.double().abs().flatten()
    nonzero = magnitudes[magnitudes > 0]
    if nonzero.numel() == 0:
        return 0.0
    smallest = float(nonzero.min())
    for level in range(1, levels + 1):
        unit = smallest / level
        multiples = nonzero / unit
        if float(multiples.max()) <= levels + UNIT_TOLERANCE * levels and bool(
            ((multiples - multiples.round()).abs() <= UNIT_TOLERANCE * multiples).all()
        ):
            return unit
    raise TrialFailure(
        f"the shared values are not multiples of one unit on {levels} QSGD levels: was the "
        "update quantised with this scheme?"
    )


def uniform_intervals(shared: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """[lo, hi] per entry: the client's values b-bit round-to-nearest maps to ``shared``."""
    q = shared.double()
    half = (q.max() - q.min()) / (2**bits - 1) / 2
    return q - half, q + half


def uniform_distance(bounds: Sequence[tuple[Tensor, Tensor]], scale: float) -> Distance:
    """Σ dist(g', I)² / Σ q²: zero exactly on the updates the quantiser maps to U."""

    def distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        total = torch.zeros((), dtype=dummy[0].dtype, device=dummy[0].device)
        for g, (lo, hi) in zip(dummy, bounds, strict=True):
            below = (lo.to(g.dtype) - g).clamp_min(0)
            above = (g - hi.to(g.dtype)).clamp_min(0)
            total = total + (below**2 + above**2).sum()
        return total / scale

    return distance


def qsgd_distance(shared: Sequence[Tensor], levels: int) -> Distance:
    """Mean negative log-likelihood of the observed QSGD levels under the dummy's update."""
    units = [qsgd_unit(q, levels) for q in shared]
    observed = [
        (
            ((q.double().abs() / c).round() if c > 0 else torch.zeros_like(q.double())).to(q.dtype),
            torch.sign(q),
        )
        for q, c in zip(shared, units, strict=True)
    ]
    entries = sum(q.numel() for q in shared)

    def distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        total = torch.zeros((), dtype=dummy[0].dtype, device=dummy[0].device)
        for g, c, (level, sign) in zip(dummy, units, observed, strict=True):
            if c == 0:
                continue
            # r: the dummy's level before rounding, signed by the observed sign where k > 0.
            r = torch.where(level > 0, sign * g, g.abs()) / c
            gap = (r - level).abs()
            inside = (1 - gap).clamp_min(LIKELIHOOD_FLOOR)
            outside = (gap - (1 - LIKELIHOOD_FLOOR)).clamp_min(0) / LIKELIHOOD_FLOOR
            total = total + (-torch.log(inside) + outside).sum()
        return total / entries

    return distance


def sign_distance(shared: Sequence[Tensor]) -> Distance:
    """1 − cosine between the quantiser applied to the dummy's update (a smooth sign) and U."""
    scales = [float(q.double().abs().mean()) for q in shared]

    def distance(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        dot = norm_dummy = norm_target = dummy[0].new_zeros(())
        for g, q, a in zip(dummy, target, scales, strict=True):
            width = SIGN_WIDTH * g.detach().abs().mean().clamp_min(torch.finfo(g.dtype).tiny)
            quantised = a * torch.tanh(g / width)
            dot = dot + (quantised * q).sum()
            norm_dummy = norm_dummy + (quantised**2).sum()
            norm_target = norm_target + (q**2).sum()
        return 1 - dot / (norm_dummy * norm_target).sqrt().clamp_min(torch.finfo(dot.dtype).tiny)

    return distance


@register_attack("quantization-aware")
class QuantizationAware(DefenseAwareAttack):
    adapts_to = frozenset({"quantization"})
    threat_model = (
        "honest-but-curious server observing one quantised update; knows the architecture, the "
        "parameters, the batch size and the quantiser (not its random rounding)"
    )

    def __init__(
        self,
        scheme: str = "qsgd",
        levels: int | None = None,
        bits: int | None = None,
        iterations: int = 2000,
        lr: float = 0.1,
        tv_weight: float = 1e-4,
        restarts: int = 1,
    ) -> None:
        self.schedule = MatchingSchedule(iterations, lr, tv_weight, restarts)
        super().__init__(scheme=scheme, levels=levels, bits=bits, **self.schedule.hparams())
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
        if scheme == "qsgd":
            positive_int("levels", levels)  # type: ignore[arg-type]
        if scheme == "uniform":
            positive_int("bits", bits)  # type: ignore[arg-type]
        self.scheme = scheme
        self.levels = levels
        self.bits = bits

    def reconstruct(self, observation: Observation) -> Reconstruction:
        # 1. The scheme's distance to the shared update.
        shared = [g.detach() for g in observation.gradients()]
        scale = float(sum(g.double().pow(2).sum() for g in shared))
        if scale == 0:
            raise TrialFailure("the quantised update is zero: nothing to match")
        if self.scheme == "uniform":
            bounds = [uniform_intervals(g, self.bits) for g in shared]  # type: ignore[arg-type]
            distance = uniform_distance(bounds, scale)
        elif self.scheme == "qsgd":
            distance = qsgd_distance(shared, self.levels)  # type: ignore[arg-type]
        else:
            distance = sign_distance(shared)
        # 2. The closed-form start, 3. matching.
        return match(
            observation,
            "quantization-aware",
            distance,
            self.schedule,
            start=_bias_start(observation),
            info={"scheme": self.scheme},
        )


def _bias_start(observation: Observation) -> Tensor | None:
    """The bias attack's estimate on the quantised update, for one sample where it applies."""
    if observation.batch_size != 1:
        return None
    try:
        return BiasAttack().reconstruct(observation).images
    except (UnsupportedModelError, TrialFailure):
        return None
