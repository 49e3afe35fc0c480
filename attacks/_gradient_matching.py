"""Shared pieces of the gradient-matching attacks (DLG, iDLG, Inverting Gradients).

These attacks optimise dummy inputs x' so that the gradient they induce,
``∇θ ℓ(f_θ(x'), y')``, matches the shared update ``∇θ`` (the mean cross-entropy gradient of the
private batch). The dummy gradient is built with ``create_graph=True`` so that a distance
between gradients can itself be differentiated with respect to x' (and y').

Speed (``leakbench timing attacks`` measures it): distances between gradients are taken on the
layers concatenated into one vector (:func:`flat`: a handful of kernels instead of a few per
layer), and :func:`tuned_convolutions` switches oneDNN's convolutions off for tiny victims,
where PyTorch's own are faster (the profile of Inverting Gradients on LeNet-Zhu at B = 1: 1.45×
less CPU time per step; on ResNet-18 oneDNN is 1.8× faster, so it stays on there). The rule is
the victim's size, never a timing, so that the same seed gives the same result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from leakbench.client import Aggregate, ClientProtocol, FedSGD, protocol_from_spec
from leakbench.threat_model import (
    Capability,
    Observation,
    RequirementsNotGranted,
    protocol_view,
)

# Victims with fewer parameters than this run their convolutions without oneDNN.
ONEDNN_MIN_PARAMETERS = 50_000


@contextlib.contextmanager
def tuned_convolutions(model: torch.nn.Module) -> Iterator[None]:
    """oneDNN convolutions off while the attack runs on a tiny victim (module docstring)."""
    if sum(p.numel() for p in model.parameters()) >= ONEDNN_MIN_PARAMETERS:
        yield
        return
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors (one per layer) as one vector, in order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def granted_batch_size(observation: Observation, attack: str) -> int:
    """The batch size the run grants; attacks that size their dummies by it cannot run without."""
    if observation.batch_size is None:
        raise RequirementsNotGranted(
            f"{attack} needs the batch size ({Capability.BATCH_SIZE.value}) to size its dummies"
        )
    return observation.batch_size


def seeded_generator(observation: Observation) -> torch.Generator:
    """The attack's only source of randomness, seeded by the trial."""
    return torch.Generator().manual_seed(observation.seed)


def gaussian_dummy(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Trainable N(0, 1) dummy with ``like``'s dtype and device, drawn on the CPU generator."""
    sample = torch.randn(shape, generator=generator, dtype=like.dtype)
    return sample.to(like.device).requires_grad_()


def dummy_gradients(observation: Observation, images: Tensor, targets: Tensor) -> list[Tensor]:
    """∇θ of the mean cross-entropy of ``images`` against ``targets``, differentiable in both.

    ``targets`` are class indices (B,) or class probabilities (B, K); with probabilities the loss
    is the mean over the batch of −Σ_c p_c log softmax(f(x))_c, as in DLG. The gradients come
    from ``torch.autograd.grad``, so no ``.grad`` is left on the model's parameters.
    """
    parameters = list(observation.model.parameters())
    loss = F.cross_entropy(observation.model(images), targets)
    return list(torch.autograd.grad(loss, parameters, create_graph=True))


def replayed_protocol(observation: Observation, attack: str) -> ClientProtocol | None:
    """The client protocol an attack replays on its dummies; None where the FedSGD gradient of
    all of them does: under FedSGD, and under an aggregate of FedSGD clients seen without its
    hyperparameters (the sum of K clients' means is K times the mean gradient of all K·B
    samples, a factor a cosine distance ignores)."""
    spec = observation.client_protocol
    if spec == protocol_view(spec, frozenset()):  # the names only
        names = {spec["name"], spec.get("inner", {}).get("name", FedSGD.name)}
        if names <= {FedSGD.name, Aggregate.name}:
            return None
        raise RequirementsNotGranted(
            f"{attack} needs the client protocol's local hyperparameters "
            f"({Capability.LOCAL_HYPERPARAMETERS.value}) to simulate {spec}"
        )
    protocol = protocol_from_spec(spec)
    return None if isinstance(protocol, FedSGD) else protocol


def simulated_update(
    observation: Observation, protocol: ClientProtocol | None, images: Tensor, targets: Tensor
) -> list[Tensor]:
    """The update ``images`` would produce under ``protocol`` (None: FedSGD), in
    ``model.parameters()`` order, differentiable w.r.t. ``images``."""
    if protocol is None:
        return dummy_gradients(observation, images, targets)
    update = protocol.simulate(observation.model, images, targets)
    return [update[name] for name, _ in observation.model.named_parameters()]
