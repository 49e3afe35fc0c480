"""``dp-sgd``: the client's round of DP-SGD, with per-sample clipping and a privacy accountant.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016 (Algorithm 1). Threat model: the client computes its update with DP-SGD and
shares only the noisy, clipped mean; the server (the attacker) sees that update and nothing of
the per-sample gradients. The guarantee is (ε, δ)-differential privacy of the shared updates
with respect to one sample, computed by the Rényi-DP accountant of Mironov, Talwar, Zhang
("Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019) as implemented by Opacus.

For a batch of B samples (x_i, y_i), clipping bound C (``max_grad_norm``) and noise multiplier
σ (``noise_multiplier``), the shared update is

    g̃ = (1/B) · ( Σ_i g_i · min(1, C / ‖g_i‖₂) + N(0, σ² C² I) ),

where g_i = ∇_θ CE(f_θ(x_i), y_i) is sample i's gradient over every trainable parameter and
‖g_i‖₂ = sqrt(Σ_l ‖g_{i,l}‖²) its norm over all of them. Without clipping (C ≥ every ‖g_i‖) and
with σ = 0, g̃ is the FedSGD gradient of the mean loss.

Steps, as :meth:`DPSGDDefense.apply` runs them:

1. refuse a model that is not DP-compatible (a BatchNorm layer mixes the samples of a batch, so
   no per-sample gradient exists; Opacus' ``ModuleValidator`` validators name such layers);
2. per-sample gradients g_i with ``torch.func`` (``vmap`` of ``grad`` over the batch, through
   ``functional_call``), in the model's own mode. Opacus' ``GradSampleModule`` is not used: its
   hooks record activations only for modules in training mode, so it yields no per-sample
   gradient for a client in eval mode (the benchmark's usual client), and it writes hooks and
   ``grad_sample`` attributes onto the client's model, which must stay untouched;
3. per-sample norms in float64 and the clipping factors min(1, C / ‖g_i‖);
4. the sum of the clipped gradients;
5. Gaussian noise σC · n_l, n_l ~ N(0, I), drawn from the trial's generator tensor by tensor in
   parameter order, in each tensor's dtype on the generator's device, added to the sum;
6. division by B;
7. the report: σ, C, the sampling rate q, the number of steps T, δ, ε at δ from Opacus' RDP
   accountant for T steps of the sampled Gaussian mechanism (σ, q), and ``round_epsilon``: the
   ε of the one release the server observes in this round (q = 1, T = 1: the attacker sees
   this batch's update, so no subsampling amplifies it).

σ is either given or, with ``epsilon`` instead, the smallest σ (Opacus' ``get_noise_multiplier``,
binary search to 0.01 in ε) such that T steps at rate q cost at most ε at δ. The defaults are
q = 1 and T = 1 (one round on the client's whole batch, nothing else). Training a victim with
this defense (one ``apply`` per mini-batch of B out of N samples) is T = epochs · ⌈N/B⌉ steps at
q = B/N: :meth:`DPSGDDefense.options_for_training` fills them in, so ``epsilon`` is the ε of the
whole training and σ is calibrated for it (:func:`training_epsilon` gives the ε of a σ). The RDP
accountant assumes Poisson sampling of each batch; a shuffled loader of fixed-size batches is
the usual approximation (as in Abadi et al., Sec. 3.1).

Adaptive attack (Kerckhoffs: σ and C are public): ``noise-aware``, which models the clipping and
the Gaussian noise of known scale σC/B in its likelihood.

``compute_update`` (the client protocol) is not called: DP-SGD defines its own update, the
per-sample-clipped FedSGD gradient above.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from leakbench.interfaces import ClientShare, Defense, UpdateFn, positive_int
from leakbench.registry import register_defense


@contextlib.contextmanager
def _default_orders() -> Iterator[None]:
    """Opacus' accountant with its default Rényi orders, without its note that the best order
    was the largest: the bound is then still a valid upper bound on ε, perhaps not the tightest,
    and the value stays Opacus' own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` after ``steps`` steps of the sampled Gaussian mechanism (σ, q), from
    Opacus' RDP accountant; ``math.inf`` for σ = 0 (no privacy)."""
    _check_accounting(noise_multiplier, sample_rate, steps, delta)
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with _default_orders():
        return float(accountant.get_epsilon(delta=float(delta)))


def training_epsilon(
    noise_multiplier: float, batch_size: int, dataset_size: int, epochs: int, delta: float
) -> float:
    """ε of training with this defense: ``epochs`` passes over ``dataset_size`` samples in
    batches of ``batch_size`` (q = B/N, T = epochs · ⌈N/B⌉ steps, the last batch may be short)."""
    positive_int("batch_size", batch_size)
    positive_int("dataset_size", dataset_size)
    positive_int("epochs", epochs)
    if batch_size > dataset_size:
        raise ValueError(f"batch_size must be <= dataset_size={dataset_size}, got {batch_size}")
    steps = epochs * math.ceil(dataset_size / batch_size)
    return epsilon_spent(noise_multiplier, batch_size / dataset_size, steps, delta)


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The σ that Opacus' ``get_noise_multiplier`` finds for (ε, δ) after ``steps`` at ``q``."""
    _check_accounting(1.0, sample_rate, steps, delta)
    if not (_is_real(epsilon) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    from opacus.accountants.utils import get_noise_multiplier

    with _default_orders():
        sigma = get_noise_multiplier(
            target_epsilon=float(epsilon),
            target_delta=float(delta),
            sample_rate=float(sample_rate),
            steps=int(steps),
            accountant="rdp",
        )
    return float(sigma)


def dp_incompatible_layers(model: nn.Module) -> list[str]:
    """Names of the trainable layers Opacus' ``ModuleValidator`` rejects (BatchNorm, ...).

    Opacus' own ``validate`` also rejects any model in eval mode; only its per-layer validators
    are used here, since an eval-mode client is fine for per-sample gradients."""
    from opacus.validators import ModuleValidator

    return [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if type(module) in ModuleValidator.VALIDATORS
        and any(p.requires_grad for p in module.parameters(recurse=False))
        and ModuleValidator.VALIDATORS[type(module)](module)
    ]


def per_sample_gradients(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """∇_θ CE(f_θ(x_i), y_i) for every sample i: each tensor has the batch as first dimension.

    The model is used in its current mode and is not modified."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(params: dict[str, Tensor], image: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, (params, frozen, buffers), (image.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    with torch.enable_grad():
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(trainable, images, labels)
    return {name: g.detach() for name, g in grads.items()}


@register_defense("dp-sgd")
class DPSGDDefense(Defense):
    # Its update is the per-sample-clipped gradient, not ``compute_update``: no local steps.
    client_protocols = frozenset({"fedsgd", "aggregate"})

    def __init__(
        self,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        epsilon: float | None = None,
        delta: float = 1e-5,
        sample_rate: float = 1.0,
        steps: int = 1,
    ) -> None:
        super().__init__(
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
        )
        if not (_is_real(max_grad_norm) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if (noise_multiplier is None) == (epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier and epsilon, got "
                f"noise_multiplier={noise_multiplier!r}, epsilon={epsilon!r}"
            )
        _check_accounting(
            1.0 if noise_multiplier is None else noise_multiplier, sample_rate, steps, delta
        )
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.target_epsilon = None if epsilon is None else float(epsilon)
        self.noise_multiplier = (
            float(noise_multiplier)
            if noise_multiplier is not None
            else noise_multiplier_for(epsilon, delta, sample_rate, steps)  # type: ignore[arg-type]
        )
        self.epsilon = epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.delta)
        self.round_epsilon = epsilon_spent(self.noise_multiplier, 1.0, 1, self.delta)

    @classmethod
    def options_for_training(
        cls, options: Mapping[str, Any], *, batch_size: int, dataset_size: int, epochs: int
    ) -> dict[str, Any]:
        """``options`` accounted over training: q = B/N and T = epochs · ⌈N/B⌉. Options that
        state another q or T are refused: the card would state an ε the training did not have."""
        positive_int("batch_size", batch_size)
        positive_int("dataset_size", dataset_size)
        positive_int("epochs", epochs)
        training = {
            "sample_rate": min(1.0, batch_size / dataset_size),
            "steps": epochs * math.ceil(dataset_size / batch_size),
        }
        for key, value in training.items():
            if key in options and options[key] != value:
                raise ValueError(
                    f"dp-sgd {key}={options[key]!r} disagrees with the training it accounts for "
                    f"({epochs} epochs of batches of {batch_size} out of {dataset_size} samples: "
                    f"{key}={value!r}); expected it left out or equal"
                )
        return {**dict(options), **training}

    def accounting(self) -> dict[str, Any]:
        """ε over the accounted steps, the round's own ε, and what they are computed from."""
        return {
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
            "round_epsilon": self.round_epsilon if math.isfinite(self.round_epsilon) else None,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": "rdp (opacus)",
            "target_epsilon": self.target_epsilon,
        }

    def adaptive_attacks(self) -> dict[str, dict[str, Any]]:
        return {
            "noise-aware": {
                "mechanism": "dp-sgd",
                "max_grad_norm": self.max_grad_norm,
                "noise_multiplier": self.noise_multiplier,
            }
        }

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError naming the layers that have no per-sample gradient."""
        bad = dp_incompatible_layers(model)
        if bad:
            raise ValueError(
                f"dp-sgd cannot train this model: layers {', '.join(bad)} are not DP-compatible "
                "(Opacus ModuleValidator rejects them; BatchNorm mixes the samples of a batch); "
                "expected a model without them, e.g. GroupNorm instead of BatchNorm"
            )

    def apply(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        compute_update: UpdateFn,
    ) -> ClientShare:
        # 1. Refuse layers without per-sample gradients.
        self.check_model(model)
        batch = images.shape[0]
        # 2. Per-sample gradients.
        per_sample = per_sample_gradients(model, images, labels)
        # 3. Per-sample norms over all parameters (float64) and clipping factors.
        squared = sum(g.double().flatten(1).pow(2).sum(dim=1) for g in per_sample.values())
        norms = torch.sqrt(squared)
        factors = torch.clamp(self.max_grad_norm / norms.clamp_min(1e-300), max=1.0)
        update: dict[str, Tensor] = {}
        for name, g in per_sample.items():
            # 4. Sum of the clipped gradients.
            shape = (batch,) + (1,) * (g.dim() - 1)
            total = (g * factors.to(g.dtype).view(shape)).sum(dim=0)
            # 5. Gaussian noise of std σC per entry.
            if self.noise_multiplier > 0:
                noise = torch.randn(
                    total.shape, generator=generator, dtype=total.dtype, device=generator.device
                )
                total = total + self.noise_multiplier * self.max_grad_norm * noise.to(total.device)
            # 6. The mean over the batch.
            update[name] = total / batch
        # 7. The report.
        info: dict[str, Any] = {
            **self.accounting(),
            "clipped_fraction": float((norms > self.max_grad_norm).double().mean()),
            "noise_std_in_update": self.noise_multiplier * self.max_grad_norm / batch,
        }
        return ClientShare(images=images, labels=labels, update=update, info=info)


def _check_accounting(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> None:
    if not (
        _is_real(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not (_is_real(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    positive_int("steps", steps)
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
