"""``quantization``: the client shares a low-precision update (gradient quantisation).

Threat model: the client quantises every tensor of its update before sharing it; the server
sees only the quantised values (and each tensor's scale). Top-k sparsification is the separate
``pruning`` defense. Three schemes (``scheme``), each applied tensor by tensor, in float64, the
result cast back to the tensor's dtype:

* ``qsgd`` — stochastic quantisation of Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
  Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017. With s
  ``levels`` and a tensor v (the bucket is the whole tensor),

      Q_s(v_i) = ‖v‖₂ · sign(v_i) · ξ_i,   ξ_i = (ℓ_i + b_i) / s,   ℓ_i = ⌊s |v_i| / ‖v‖₂⌋,

  with b_i ~ Bernoulli(s |v_i| / ‖v‖₂ − ℓ_i) drawn from the trial's generator. So E[Q_s(v)] = v
  (unbiased) and every |Q_s(v_i)| / ‖v‖₂ lies on the s + 1 levels {0, 1/s, ..., 1}. Bits per
  entry: 1 (sign) + ⌈log₂(s + 1)⌉ (level), plus one 32-bit norm per tensor (no Elias coding).
* ``uniform`` — deterministic uniform quantisation to b ``bits``: with m = min v, M = max v and
  L = 2^b − 1 steps, Q(v_i) = m + round((v_i − m) / (M − m) · L) · (M − m) / L, the nearest of
  2^b evenly spaced values (round half to even). Bits per entry: b, plus two 32-bit floats per
  tensor.
* ``sign`` — scaled signSGD (Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed
  Optimisation for Non-Convex Problems", ICML 2018; the ‖v‖₁/n scale of Karimireddy, Rebjock,
  Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML
  2019, without error feedback since the defense is stateless): Q(v_i) = (‖v‖₁ / n) · sign(v_i).
  Bits per entry: 1, plus one 32-bit scale per tensor.

Steps, as :meth:`QuantizationDefense.apply` runs them:

1. the client's update through the client protocol (``compute_update``);
2. each tensor, in the update's order, quantised by the scheme (QSGD draws one uniform per
   entry from the generator, in float64 on the generator's device);
3. the report: scheme, levels (or bits), bits per entry with and without the per-tensor scales.

Adaptive attack (Kerckhoffs: the scheme and its levels or bits are public, QSGD's random
rounding is not): ``quantization-aware``, which matches through the quantiser's own model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.interfaces import ClientShare, Defense, UpdateFn, positive_int
from leakbench.registry import register_defense

SCALE_BITS = 32  # each tensor's norm, range or scale travels as one float32


def qsgd(values: Tensor, levels: int, generator: torch.Generator) -> Tensor:
    """QSGD's unbiased stochastic quantisation of ``values`` onto ``levels`` levels of its norm."""
    v = values.double()
    norm = torch.linalg.vector_norm(v)
    uniforms = torch.rand(
        v.shape, generator=generator, dtype=torch.float64, device=generator.device
    )
    if norm == 0:
        return values.clone()
    scaled = v.abs() / norm * levels
    lower = torch.floor(scaled)
    rounded_up = uniforms.to(v.device) < (scaled - lower)
    return (norm * torch.sign(v) * (lower + rounded_up) / levels).to(values.dtype)


def uniform_quantize(values: Tensor, bits: int) -> Tensor:
    """The nearest of 2^bits evenly spaced values between the tensor's minimum and maximum."""
    v = values.double()
    low, high = v.min(), v.max()
    if high == low:
        return values.clone()
    steps = 2**bits - 1
    width = (high - low) / steps
    return (low + torch.round((v - low) / width) * width).to(values.dtype)


def scaled_sign(values: Tensor) -> Tensor:
    """sign(v) times the mean magnitude ‖v‖₁ / n."""
    v = values.double()
    return (v.abs().mean() * torch.sign(v)).to(values.dtype)


SCHEMES = ("qsgd", "uniform", "sign")


@register_defense("quantization")
class QuantizationDefense(Defense):
    def __init__(
        self, scheme: str = "qsgd", levels: int | None = None, bits: int | None = None
    ) -> None:
        super().__init__(scheme=scheme, levels=levels, bits=bits)
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
        needs = {"qsgd": "levels", "uniform": "bits", "sign": None}[scheme]
        for name, value in (("levels", levels), ("bits", bits)):
            if name != needs and value is not None:
                raise ValueError(f"{name} does not apply to scheme {scheme!r}, got {value!r}")
        if scheme == "qsgd":
            positive_int("levels", levels)  # type: ignore[arg-type]
        if scheme == "uniform":
            positive_int("bits", bits)  # type: ignore[arg-type]
            if bits > 32:  # type: ignore[operator]
                raise ValueError(f"bits must be at most 32, got {bits!r}")
        self.scheme = scheme
        self.levels = levels
        self.bits = bits

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {
            "quantization-aware": {"scheme": self.scheme, "levels": self.levels, "bits": self.bits}
        }

    def bits_per_entry(self) -> int:
        """Bits that encode one entry, without the per-tensor scale."""
        if self.scheme == "qsgd":
            return 1 + math.ceil(math.log2(self.levels + 1))  # type: ignore[operator]
        if self.scheme == "uniform":
            return self.bits  # type: ignore[return-value]
        return 1

    def _quantizer(self, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
        if self.scheme == "qsgd":
            return lambda g: qsgd(g, self.levels, generator)  # type: ignore[arg-type]
        if self.scheme == "uniform":
            return lambda g: uniform_quantize(g, self.bits)  # type: ignore[arg-type]
        return scaled_sign

    def apply(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        compute_update: UpdateFn,
    ) -> ClientShare:
        # 1. The client's own update.
        update = compute_update(model, images, labels)
        # 2. Every tensor quantised, in the update's order.
        quantize = self._quantizer(generator)
        shared = {name: quantize(g) for name, g in update.items()}
        # 3. The report.
        entries = sum(g.numel() for g in update.values())
        scales = len(update) * SCALE_BITS * (2 if self.scheme == "uniform" else 1)
        info = {
            "scheme": self.scheme,
            "levels": self.levels,
            "bits": self.bits,
            "bits_per_entry": self.bits_per_entry(),
            "bits_per_entry_with_scales": self.bits_per_entry() + scales / max(entries, 1),
            "entries": entries,
        }
        return ClientShare(images=images, labels=labels, update=shared, info=info)
