"""``robbing-the-fed``: the imprint attack of Robbing the Fed (Fowl et al., ICLR 2022).

Paper: L. Fowl, J. Geiping, W. Czaja, M. Goldblum, T. Goldstein, "Robbing the Fed: Directly
Obtaining Private Data in Federated Learning with Modified Models", ICLR 2022.

Threat model: SoK letter G, data-enhanced manipulator (Carletti et al., USENIX Security 2025).
A malicious server changes the model it sends (``Capability.SERVER_MODEL``): it puts an imprint
block in front of the victim (the zoo model ``imprint``, :mod:`leakbench.models.imprint`), and
the client trains what it received. It places the block's bins with surrogate data
(``Capability.SURROGATE_DATA``: the dataset's other split). It needs neither the batch size nor
the labels, and it reads any client protocol's update.

Math. The server picks a measurement direction m (unit norm) and thresholds t_1 < … < t_k.
On a flattened model input x ∈ R^d the block computes h_i = ReLU(α (m·x − t_i)), i = 1..k,
and returns x + c Σ_i h_i (the readout's weights are all c, its bias 0). For sample b with
statistic s_b = m·x_b, unit i is active iff s_b > t_i. The readout gives every unit the same
error signal from sample b, ∂ℓ_b/∂h_i = c Σ_j ∂ℓ_b/∂out_j =: g_b, so the client's update of
the measure layer (weights w_i, biases β_i) is

    ∇w_i = (α/B) Σ_b g_b 1[s_b > t_i] x_b,        ∇β_i = (α/B) Σ_b g_b 1[s_b > t_i].

Units are cumulative: neighbouring differences isolate the samples of one bin (t_i, t_{i+1}]
(t_{k+1} = ∞), and a bin that holds exactly one sample b returns it exactly:

    (∇w_i − ∇w_{i+1}) / (∇β_i − ∇β_{i+1}) = x_b.

Bins. The server fits a Gaussian N(μ, σ²) to the statistic of the surrogate samples and puts
the thresholds at its quantiles t_i = μ + σ Φ⁻¹((i − 1)/k) (t_1: μ − 10σ in place of −∞), so
the k bins are equally likely. If the B samples' statistics are i.i.d. with that distribution,
sample b is recovered exactly iff no other sample shares its bin, so the expected recovered
fraction is

    E[recovered] / B = (1 − 1/k)^(B − 1):

0.884 for k = 512 bins at B = 64, 0.969 for k = 2048 at B = 64, 0.883 for k = 2048 at B = 256.
A bin of several samples gives their g_b-weighted mean (returned too: it matches nothing well).

Scales: α = ``gain`` and c = 1 / (gain · k · σ), so that the input the body sees moves by
c α Σ_i ReLU(s − t_i) ≈ (number of active bins)·(mean excess)/(k σ), of order one, and the
body's logits (hence g_b) stay unsaturated.

Client protocols: the ratio does not depend on how the update is scaled, so a FedSGD gradient,
a sum of K clients' gradients (secure aggregation: the bins separate every sample behind the
sum) and a FedAvg delta are read alike. Under FedAvg the ratio of one bin stays x_b over all
local steps as long as no sample changes bin and the readout gives every unit the same signal;
both drift as the local steps train the block (the paper's FedAvg discussion), which the
FedAvg track measures.

Steps, as the code runs them (float64):

1. (server, ``server_model``) The measurement direction m: a seeded Gaussian direction
   (``measurement="random"``) or the mean of the input (``"brightness"``), unit norm.
2. (server) The statistic of every surrogate sample and its Gaussian fit (μ, σ); thresholds
   t_i = μ + σ Φ⁻¹((i − 1)/k).
3. (server) The imprint model's state: measure weights α m, biases −α t_i, readout weights c,
   readout bias 0; the body's state is the victim's. Sent as plain data: the zoo name
   ``imprint``, its options (bins, body, body options) and the state.
4. (attacker, ``reconstruct``) The measure layer's update, its units sorted by threshold (read
   from the biases of the model it sent), neighbouring differences ΔW_i, Δβ_i.
5. A bin is non-empty where |Δβ_i| exceeds the rounding level of the cumulative sums
   (``EMPTY_BIN_ULPS`` units of the update dtype's precision times max_i |∇β_i|); each gives
   x̂ = ΔW_i / Δβ_i, a model input reshaped to (C, H, W).
6. Only ratios that are images are returned: every pixel within ``BOX_TOLERANCE`` of [0, 1]
   (de-normalised with the public mean and std). A sample or a mean of samples always is; the
   ratio of two differences that FedAvg's drift left non-zero is not, and is dropped.

Hyperparameters: ``bins`` k (512), ``measurement`` (``"random"``), ``gain`` α (0.3: under FedSGD any
gain is exact; under FedAvg a smaller one moves the readout less and a larger one the bins
less, and 0.3 balanced them best on digits at 4 local steps of lr 0.1).
``Budget.max_iterations`` does not apply: nothing iterates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from leakbench.client import EVERY_PROTOCOL
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction, ServerContext

MEASUREMENTS = ("random", "brightness")
# The lowest threshold stands for −∞: every plausible sample is above it.
LOWEST_THRESHOLD_SIGMAS = 10.0
# A bin whose bias difference is within this many ulps of the largest cumulative bias gradient
# is rounding, not a sample.
EMPTY_BIN_ULPS = 64
# How far outside [0, 1] a ratio's pixels may lie and still count as an image.
BOX_TOLERANCE = 0.05
MEASURE = "imprint.measure"
READOUT = "imprint.readout"


def expected_recovered_fraction(bins: int, batch_size: int) -> float:
    """(1 − 1/k)^(B − 1): the chance that a sample is alone among k equally likely bins."""
    return (1.0 - 1.0 / bins) ** (batch_size - 1)


def measurement_direction(kind: str, features: int, seed: int) -> Tensor:
    """Step 1: the unit vector m of the statistic s = m·x (float64)."""
    if kind == "brightness":
        direction = torch.ones(features, dtype=torch.float64)
    else:
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(features, generator=generator, dtype=torch.float64)
    return direction / direction.norm()


def gaussian_thresholds(statistics: Tensor, bins: int) -> tuple[Tensor, float]:
    """Step 2: the thresholds t_1 < … < t_k of k equally likely bins under the Gaussian fit of
    ``statistics``, and the fit's σ."""
    if statistics.numel() < 2:
        raise ValueError("fitting the bins needs at least 2 surrogate samples")
    mu, sigma = float(statistics.mean()), float(statistics.std())
    if not sigma > 0:
        raise ValueError("the surrogate samples' statistic does not vary: no bins to place")
    fit = NormalDist(mu, sigma)
    inner = torch.tensor([fit.inv_cdf(i / bins) for i in range(1, bins)], dtype=torch.float64)
    lowest = torch.tensor([mu - LOWEST_THRESHOLD_SIGMAS * sigma], dtype=torch.float64)
    return torch.cat([lowest, inner]), sigma


@register_attack("robbing-the-fed")
class RobbingTheFed(Attack):
    requires = frozenset({Capability.SERVER_MODEL, Capability.SURROGATE_DATA})
    # SoK letter: G, as the SoK gives Robbing the Fed (a modified model, bins from surrogate data).
    threat_letter = "G"
    client_protocols = EVERY_PROTOCOL
    threat_model = (
        "malicious server that sends a modified model (an imprint block in front of the victim) "
        "and places its bins with surrogate data; needs no batch size or labels"
    )

    def __init__(self, bins: int = 512, measurement: str = "random", gain: float = 0.3) -> None:
        super().__init__(bins=bins, measurement=measurement, gain=gain)
        positive_int("bins", bins)
        if measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
        if isinstance(gain, bool) or not isinstance(gain, int | float) or not gain > 0:
            raise ValueError(f"gain must be a positive number, got {gain!r}")
        self.bins = bins
        self.measurement = measurement
        self.gain = float(gain)

    def server_model(self, victim: Mapping[str, Any], context: ServerContext) -> dict[str, Any]:
        if context.surrogate_images is None:
            raise ValueError("Robbing the Fed places its bins with surrogate data (not given)")
        features = math.prod(context.input_shape)
        direction = measurement_direction(self.measurement, features, context.seed)
        surrogate = context.surrogate_images.reshape(-1, features).to(torch.float64)
        thresholds, sigma = gaussian_thresholds(surrogate @ direction, self.bins)
        readout = 1.0 / (self.gain * self.bins * sigma)
        imprint = {
            f"{MEASURE}.weight": self.gain * direction.repeat(self.bins, 1),
            f"{MEASURE}.bias": -self.gain * thresholds,
            f"{READOUT}.weight": torch.full((features, self.bins), readout, dtype=torch.float64),
            f"{READOUT}.bias": torch.zeros(features, dtype=torch.float64),
        }
        body = {f"body.{key}": value for key, value in victim["state"].items()}
        return {
            "name": "imprint",
            "options": {
                "bins": self.bins,
                "body": victim["name"],
                "body_options": dict(victim["options"]),
            },
            "state": {**imprint, **body},
        }

    def reconstruct(self, observation: Observation) -> Reconstruction:
        names = (f"{MEASURE}.weight", f"{MEASURE}.bias")
        if any(name not in observation.update for name in names):
            raise TrialFailure(
                "the update holds no imprint block: the client did not train the model the "
                "server sent"
            )
        weight_grad = observation.update[names[0]].to(torch.float64)
        bias_grad = observation.update[names[1]].to(torch.float64)
        # Step 4: units by increasing threshold t_i = −β_i / α, as the server set them.
        order = torch.argsort(-observation.model.imprint.measure.bias.detach(), stable=True)
        weight_grad, bias_grad = weight_grad[order], bias_grad[order]
        zero_row = torch.zeros_like(weight_grad[:1])
        weight_diff = weight_grad - torch.cat([weight_grad[1:], zero_row])
        bias_diff = bias_grad - torch.cat([bias_grad[1:], bias_grad.new_zeros(1)])
        # Step 5: non-empty bins, each one's ratio.
        ulp = torch.finfo(observation.update[names[1]].dtype).eps
        level = EMPTY_BIN_ULPS * ulp * float(bias_grad.abs().max())
        occupied = torch.nonzero(bias_diff.abs() > level).flatten()
        images = (weight_diff[occupied] / bias_diff[occupied, None]).reshape(
            -1, *observation.input_shape
        )
        # Step 6: a sample, or a mean of samples, is an image; what drift leaves is not.
        pixels = observation.to_image_space(images)
        valid = ((pixels >= -BOX_TOLERANCE) & (pixels <= 1 + BOX_TOLERANCE)).flatten(1).all(1)
        if not valid.any():
            raise TrialFailure("no bin of the imprint block holds an image: nothing to recover")
        return Reconstruction(
            images=images[valid].to(observation.dtype),
            info={
                "bins": int(bias_grad.numel()),
                "occupied_bins": int(occupied.numel()),
                "images": int(valid.sum()),
            },
        )
