"""``cocktail-party``: the Cocktail Party Attack (Kariyappa et al., ICML 2023).

Paper: S. Kariyappa, C. Guo, K. Maeng, W. Xiong, G. E. Suh, M. K. Qureshi, H.-H. S. Lee,
"Cocktail Party Attack: Breaking Aggregation-Based Privacy in Federated Learning using
Independent Component Analysis", ICML 2023.

Threat model: SoK letter B, informed eavesdropper (Carletti et al., USENIX Security 2025): an
honest-but-curious server that knows the architecture (the first trainable layer is a fully
connected layer fed the input) and observes one update. It uses the batch size where the run
grants it and otherwise reads it from the update's rank; it needs no labels.

Math. Let a = W x + b be the first layer (W: m × d) and δ_n = ∂ℓ_n/∂a the error signal of
sample n. The client shares

    ∇W = (1/B) Σ_n δ_n x_nᵀ = A X,        ∇b = (1/B) Σ_n δ_n = A 1,

with X (B × d) the inputs as rows and A = (1/B)[δ_1 … δ_B] (m × B) the mixing matrix: each of
the m rows of ∇W is a linear mixture of the B inputs, a blind source separation problem (the
cocktail party problem). With m ≥ B, rank(∇W) = B generically and the rows of X span the row
space of ∇W. Independent component analysis finds an unmixing U (B × m) that makes the rows of
U ∇W as statistically independent (non-Gaussian) as it can, across the d pixel positions
taken as observations; if the inputs are independent and non-Gaussian, U ∇W = D P X for a
diagonal scale D and a permutation P: the inputs, up to order, sign and scale. FedAvg (the
delta of the first layer is −η Σ_t Σ_n δ_{n,t} x_nᵀ) and a sum of K clients are mixtures of
the same form, so the attack reads every client protocol's update as it is.

Scale and sign. Where the layer has a bias they are exact: with Â = ∇W (U∇W)⁺ (m × B), the
mixing matrix of the recovered rows, ∇b = Â D 1 gives the scales d = Â⁺ ∇b, and x_n is row n
of U ∇W divided by d_n (the bias attack's observation, Phong et al. 2017, applied to each
source). Without a bias, sign and scale are not in the update; the attack then reads them from
the valid pixel range (our choice, :func:`range_scales`: each source scaled to span [0, 1] in
pixels, with the sign that leaves that range least), and the scale-aligned PSNR of the
canonical metrics (the least-squares gain against the matched truth, negative for a flipped
sign) is the score that measures the separation itself.

Where leakbench departs from the paper: the paper optimises the unmixing with Adam on
negentropy plus a total-variation prior and a penalty on similar unmixing vectors. Here the
unmixing is scikit-learn's FastICA (Hyvärinen & Oja 2000; logcosh negentropy approximation,
symmetric decorrelation), a maintained implementation of the classic algorithm the paper
adapts. And by default (``domain="derivatives"``) the contrast is taken on the horizontal and
vertical neighbour differences of every row read as an image, not on its pixels: the filter
is linear, so the differences of the rows of ∇W are the same mixture A of the differences of
the inputs; image derivatives are sparse (super-Gaussian) and much less correlated across
images than pixels, which is what ICA needs (on lfw-subset faces at B = 16: about 22 dB
instead of 14 dB scale-aligned PSNR). This plays the role of the paper's total-variation
prior. The unmixing found there is applied to ∇W itself, so nothing is lost. ``domain="pixels"``
is the plain contrast on pixels.

Steps, as the code runs them (float64):

1. The first trainable layer (``nn.Linear``, fed the flattened input); its update ∇W (m × d)
   and, if it has a bias, ∇b.
2. The number of sources B: the granted batch size, else the numerical rank of ∇W (singular
   values above the rounding level of the update's dtype). B must be below min(m, d).
3. The contrast data: the rows of ∇W (``pixels``) or their neighbour differences per channel
   (``derivatives``), as a table of observations (pixel positions) × mixtures (rows).
4. FastICA with B components, seeded by the trial's attacker seed: the unmixing U (B × m).
5. The sources S = U ∇W (B × d).
6. Scale and sign from the bias (above), or from the pixel range; the inputs reshaped to
   (C, H, W).

Hyperparameters: ``domain`` (``"derivatives"``), ``fun`` (FastICA's contrast: ``"logcosh"``,
``"exp"`` or ``"cube"``), ``max_iter`` (1000) and ``tol`` (1e-6) of FastICA.
``Budget.max_iterations`` does not apply: FastICA's own iteration cap bounds the work.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.attacks.bias import first_linear_layer
from leakbench.client import EVERY_PROTOCOL
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction

DOMAINS = ("derivatives", "pixels")
CONTRASTS = ("logcosh", "exp", "cube")
ATTACK = "the cocktail party attack"


def numerical_rank(matrix: Tensor, precision: torch.dtype) -> int:
    """The rank of ``matrix``, whose entries were rounded to ``precision``: its singular values
    above σ_max · max(shape) · eps(precision), the usual threshold of rounding noise (as
    ``numpy.linalg.matrix_rank`` sets it)."""
    singular = torch.linalg.svdvals(matrix)
    threshold = float(singular.max()) * max(matrix.shape) * torch.finfo(precision).eps
    return int((singular > threshold).sum())


def neighbour_differences(rows: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """Step 3: every row read as a (C, H, W) image, its horizontal and vertical neighbour
    differences concatenated: (rows, C·H·(W−1) + C·(H−1)·W)."""
    images = rows.reshape(-1, *input_shape)
    horizontal = images[..., :, 1:] - images[..., :, :-1]
    vertical = images[..., 1:, :] - images[..., :-1, :]
    return torch.cat([horizontal.flatten(1), vertical.flatten(1)], dim=1)


def unmixing(contrast: Tensor, sources: int, fun: str, max_iter: int, tol: float, seed: int):
    """Step 4: FastICA's unmixing matrix U (sources × mixtures) of ``contrast`` (mixtures ×
    observations), its iterations and whether it converged."""
    from sklearn.decomposition import FastICA  # scikit-learn loads only where the attack runs
    from sklearn.exceptions import ConvergenceWarning

    ica = FastICA(
        n_components=sources,
        whiten="unit-variance",
        fun=fun,
        max_iter=max_iter,
        tol=tol,
        random_state=seed % 2**32,
        # PCA from the eigenvectors of the mixtures' covariance (mixtures × mixtures), not an
        # SVD of the whole table: there are far more observations (pixels) than mixtures.
        whiten_solver="eigh",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica.fit(contrast.T.numpy())
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return torch.from_numpy(ica.components_).to(torch.float64), int(ica.n_iter_), converged


def bias_scales(weight_grad: Tensor, bias_grad: Tensor, sources: Tensor) -> Tensor:
    """Step 6: the scale d of every source, from ∇b = Â d with Â = ∇W S⁺."""
    mixing = torch.linalg.lstsq(sources.T, weight_grad.T).solution.T
    return torch.linalg.lstsq(mixing, bias_grad[:, None]).solution.flatten()


def range_scales(sources: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Step 6 without a bias (our choice): the scale d of every source read from the valid
    pixel range. With x = s/d and pixels p = x·std + mean, |d| makes the source's pixels span
    exactly [0, 1] (images hold a near-black and a near-white pixel), and the sign of d is the
    one whose pixels then leave [0, 1] least."""
    spread = sources * std
    magnitude = spread.amax(1) - spread.amin(1)
    violations = []
    for sign in (1.0, -1.0):
        pixels = sign * spread / magnitude[:, None] + mean
        violations.append((pixels.clamp(max=0).abs() + (pixels - 1).clamp(min=0)).sum(1))
    sign = torch.where(violations[0] <= violations[1], 1.0, -1.0).to(sources.dtype)
    return sign * magnitude


@register_attack("cocktail-party")
class CocktailParty(Attack):
    requires = frozenset()
    # SoK letter: B, as the SoK gives the Cocktail Party Attack.
    threat_letter = "B"
    client_protocols = EVERY_PROTOCOL
    threat_model = (
        "honest-but-curious server observing one update of a network whose first trainable "
        "layer is nn.Linear fed the input; uses the batch size if granted, else the update's "
        "rank; exact sign and scale only with a bias on that layer"
    )

    def __init__(
        self,
        domain: str = "derivatives",
        fun: str = "logcosh",
        max_iter: int = 1000,
        tol: float = 1e-6,
    ) -> None:
        super().__init__(domain=domain, fun=fun, max_iter=max_iter, tol=tol)
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if fun not in CONTRASTS:
            raise ValueError(f"fun must be one of {CONTRASTS}, got {fun!r}")
        positive_int("max_iter", max_iter)
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        self.domain = domain
        self.fun = fun
        self.max_iter = max_iter
        self.tol = float(tol)

    def check_model(self, model: nn.Module) -> None:
        first_linear_layer(model, ATTACK, bias=False)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        # Step 1: the first layer's update.
        name, layer = first_linear_layer(observation.model, ATTACK, bias=False)
        features = math.prod(observation.input_shape)
        if layer.in_features != features:
            raise TrialFailure(
                f"layer {name!r} takes {layer.in_features} features, but a sample of shape "
                f"{observation.input_shape} has {features}"
            )
        prefix = f"{name}." if name else ""
        weight_grad = observation.update[f"{prefix}weight"].detach().cpu().to(torch.float64)
        bias = observation.update.get(f"{prefix}bias") if layer.bias is not None else None
        # Step 2: how many sources.
        sources = observation.batch_size or numerical_rank(weight_grad, observation.dtype)
        limit = min(weight_grad.shape)
        if sources >= limit:
            raise TrialFailure(
                f"{sources} sources cannot be unmixed from {weight_grad.shape[0]} mixtures of "
                f"{weight_grad.shape[1]} values: the layer needs more units and inputs than "
                "the batch has samples"
            )
        # Step 3: the contrast data.
        if self.domain == "derivatives":
            if min(observation.input_shape[1:], default=1) < 2:
                raise TrialFailure(f"derivatives need images of 2×2 or more, not {features}")
            contrast = neighbour_differences(weight_grad, observation.input_shape)
        else:
            contrast = weight_grad
        # Steps 4-5: FastICA's unmixing, applied to ∇W itself.
        unmix, iterations, converged = unmixing(
            contrast, sources, self.fun, self.max_iter, self.tol, observation.seed
        )
        recovered = unmix @ weight_grad
        # Step 6: sign and scale, from the bias or else from the pixel range.
        info: dict[str, Any] = {
            "sources": sources,
            "sources_from": "batch size" if observation.batch_size else "rank",
            "ica_iterations": iterations,
            "ica_converged": converged,
            "domain": self.domain,
        }
        if bias is not None:
            bias_grad = bias.detach().cpu().to(torch.float64)
            scales = bias_scales(weight_grad, bias_grad, recovered)
            info["scale_from"] = "bias"
        else:
            per_channel = math.prod(observation.input_shape[1:])
            mean = torch.tensor(observation.mean, dtype=torch.float64)
            std = torch.tensor(observation.std, dtype=torch.float64)
            scales = range_scales(
                recovered,
                mean.repeat_interleave(per_channel),
                std.repeat_interleave(per_channel),
            )
            info["scale_from"] = "pixel range"
        if bool((scales == 0).any()):
            raise TrialFailure("a recovered source is zero: no sign or scale to give it")
        recovered = recovered / scales[:, None]
        images = recovered.reshape(-1, *observation.input_shape)
        return Reconstruction(images=images.to(observation.dtype), info=info)
