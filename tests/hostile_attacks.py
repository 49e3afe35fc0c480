"""Hostile test attacks: what a submitter who wants to top the board would try.

``grab-test`` registers through the public API and hunts for the private batch with every trick
the protocol must defeat: walking the stack frames of its caller, ``gc.get_objects()`` (batch
tensors, the live trial dataset), forward hooks planted on every model it can find (to catch
the next trial's client forward pass), and adding ``client_code`` to its own ``requires`` so
that its ``client_hook`` would receive the private images. It picks among what it found only
by gradient agreement with the shared update, never by the truth, and returns noise when it
found nothing.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from leakbench import Attack, Capability, Reconstruction, register_attack
from leakbench.registry import ATTACKS

# Module state that survives between trials only when attacks share a process.
CAPTURED: list[tuple[Tensor, Tensor | None]] = []
HOOK_CALLS: list[int] = []
_evaluating = False


def _batches_in(value: Any, shape: tuple[int, ...], out: list) -> None:
    if isinstance(value, Tensor):
        if value.dim() == 4 and tuple(value.shape[1:]) == shape:
            out.append((value.detach().clone(), None))
    elif type(value) is dict:
        images, labels = value.get("images"), value.get("labels")
        if isinstance(images, Tensor) and images.dim() == 4 and tuple(images.shape[1:]) == shape:
            out.append((images.detach().clone(), labels))
        for v in value.values():
            if isinstance(v, Tensor):
                _batches_in(v, shape, out)


def _capture(module: nn.Module, inputs: tuple) -> None:
    if not _evaluating and inputs and isinstance(inputs[0], Tensor):
        CAPTURED.append((inputs[0].detach().clone(), None))


class Grab(Attack):
    requires = frozenset({Capability.BATCH_SIZE})

    def client_hook(self, model: nn.Module, images: Tensor, context: Any) -> tuple[Tensor, Any]:
        HOOK_CALLS.append(1)
        CAPTURED.append((images.detach().clone(), None))
        return images, None

    def reconstruct(self, observation: Any) -> Reconstruction:
        global _evaluating
        shape = tuple(observation.input_shape)
        candidates: list[tuple[Tensor, Tensor | None]] = list(CAPTURED)
        # 1. Frames of every caller.
        frame = sys._getframe()
        while frame is not None:
            for value in list(frame.f_locals.values()):
                _batches_in(value, shape, candidates)
            frame = frame.f_back
        # 2. Everything the garbage collector tracks: tensors, trial dicts, trial datasets, models.
        for obj in gc.get_objects():
            if type(obj) is dict or isinstance(obj, Tensor):
                _batches_in(obj, shape, candidates)
            elif type(obj).__name__ == "TrialDataset":
                for trial in range(len(obj.plan)):
                    _batches_in(obj[trial], shape, candidates)
            elif isinstance(obj, nn.Module) and obj is not observation.model:
                obj.register_forward_pre_hook(_capture)  # 3. plant hooks for later trials
        observation.model.register_forward_pre_hook(_capture)
        # 4. Ask for client code after the harness checked the requirements.
        type(self).requires = frozenset(Capability)
        # Select by gradient agreement only.
        target = observation.gradients()
        best, best_distance = None, float("inf")
        _evaluating = True
        try:
            for images, labels in candidates:
                if observation.batch_size and images.shape[0] != observation.batch_size:
                    continue
                images = images.to(observation.dtype)
                with torch.enable_grad():
                    logits = observation.model(images)
                    guess = labels if labels is not None else logits.argmax(dim=1)
                    loss = F.cross_entropy(logits, guess.to(logits.device))
                    grads = torch.autograd.grad(loss, list(observation.model.parameters()))
                distance = sum(
                    float(((g - t) ** 2).sum()) for g, t in zip(grads, target, strict=True)
                )
                if distance < best_distance:
                    best, best_distance = images, distance
        finally:
            _evaluating = False
        if best is None:
            g = torch.Generator().manual_seed(observation.seed)
            best = torch.randn(observation.batch_size or 1, *shape, generator=g)
        return Reconstruction(images=best, info={"candidates": len(candidates)})


class Misbehaving(Attack):
    """Fails in the way its ``mode`` hyperparameter names."""

    def __init__(self, mode: str = "crash") -> None:
        super().__init__(mode=mode)
        self.mode = mode

    def reconstruct(self, observation: Any) -> Any:
        if self.mode == "crash":
            os._exit(3)
        if self.mode == "kill":
            os.kill(os.getpid(), 9)
        if self.mode == "hang":
            time.sleep(600)
        if self.mode == "not-a-reconstruction":
            return {"images": torch.zeros(1, *observation.input_shape)}
        if self.mode == "unserialisable-info":
            return Reconstruction(torch.zeros(1, *observation.input_shape), info={"f": print})
        raise ValueError(f"unknown mode {self.mode!r}")


class Slowed(Attack):
    """Seeded noise refined over its iterations, sleeping ``delay`` seconds in each: the result
    must not depend on how long an iteration takes."""

    requires = frozenset({Capability.BATCH_SIZE})

    def __init__(self, iterations: int = 20, delay: float = 0.0) -> None:
        super().__init__(iterations=iterations, delay=delay)
        self.iterations, self.delay = iterations, delay

    def reconstruct(self, observation: Any) -> Reconstruction:
        g = torch.Generator().manual_seed(observation.seed)
        images = torch.rand(observation.batch_size, *observation.input_shape, generator=g)
        for _ in observation.budget.iterations(self.iterations):
            time.sleep(self.delay)
            images = 0.9 * images + 0.1 * torch.rand(images.shape, generator=g)
        return Reconstruction(images=images, batch_size=observation.batch_size)


class Tamper(Attack):
    """Corrupts every model it can reach (weights zeroed, hooks that scramble outputs)."""

    def reconstruct(self, observation: Any) -> Reconstruction:
        for obj in gc.get_objects():
            if isinstance(obj, nn.Module):
                with torch.no_grad():
                    for p in obj.parameters():
                        p.mul_(0.5)
                obj.register_forward_hook(lambda m, i, o: o * 0 if isinstance(o, Tensor) else o)
        return Reconstruction(images=torch.zeros(1, *observation.input_shape))


for _name, _cls in (
    ("grab-test", Grab),
    ("misbehaving-test", Misbehaving),
    ("slowed-test", Slowed),
    ("tamper-test", Tamper),
):
    if _name not in ATTACKS:
        register_attack(_name)(_cls)
