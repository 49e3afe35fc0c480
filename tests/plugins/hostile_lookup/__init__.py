"""Hostile plug-ins that look their answer up in the public dataset instead of inverting.

lfw-subset, the public dataset of the shipped tracks, ships inside scikit-image, so attack code
can read it in any sandbox. Neither plug-in ever sees the ground truth: both choose among public
images by how well the gradients those images would give match the shared update, on the
victim's last layer (per-sample gradients of its parameters, through ``torch.func``, on the
features of each candidate from one forward pass).

* ``Enumerator``: every public image, mirrored or not, moved by every whole-pixel shift in
  [−2, 2]² with replicated edges (the list ``leakbench leaderboard lookup-bound`` measures,
  :func:`leakbench.leaderboard.lookup.shifted_and_flipped`), under every label. A batch of B is
  chosen by greedy matching pursuit over the candidates' per-sample gradients (the update is
  their mean), improved by swaps while one lowers the mismatch; then each chosen image's
  brightness gain is searched on a grid around 1 and refined. Against the list-like transform
  that verification used before, this found the exact private image.
* ``Memoriser``: the public images as they are; where a batch of them explains the update
  (relative mismatch below ``tolerance``) it answers with them, otherwise it guesses the mean
  public image for every sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from leakbench import Attack, Capability, Reconstruction

CHUNK = 1000  # candidates per forward pass
SWEEPS = 3  # rounds of swaps after the greedy pursuit
GAIN_STEPS = (0.01, 0.001, 0.0001)  # the gain grid's step, then two finer rounds around the best


def public_pixels() -> Tensor:
    """lfw-subset's 200 images, (200, 1, 25, 25) float32 pixels in [0, 1], as lfw-subset's
    datamodule reads them."""
    from skimage import data

    return torch.from_numpy(data.lfw_subset()).float().unsqueeze(1)


class LastLayer:
    """The victim's last linear layer: the features of an input batch and the per-sample
    gradients of the cross-entropy with respect to its parameters."""

    def __init__(self, observation: Any) -> None:
        self.observation = observation
        self.model = observation.model
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the lookup plug-ins need a victim that ends in a linear layer")
        self.linear = linears[-1]
        self.params = {n: p.detach() for n, p in self.linear.named_parameters()}
        full_name = {id(p): n for n, p in self.model.named_parameters()}
        update = observation.update
        observed = [update[full_name[id(p)]] for p in self.linear.parameters()]
        # The update is the mean over the batch; the pursuit matches the sum.
        count = observation.batch_size or 1
        self.target = torch.cat([g.flatten() for g in observed]).to(torch.float64) * count

    def features(self, pixels: Tensor) -> Tensor:
        """The last layer's input for every image of ``pixels`` (normalised on the way)."""
        captured: list[Tensor] = []
        hook = self.linear.register_forward_hook(lambda m, a, out: captured.append(a[0]))
        try:
            with torch.no_grad():
                for chunk in pixels.split(CHUNK):
                    inputs = self.observation.to_input_space(chunk).to(self.observation.dtype)
                    output = self.model(inputs)
                    head = F.linear(captured[-1], self.linear.weight, self.linear.bias)
                    if not torch.equal(output, head):
                        raise ValueError("the victim's last linear layer is not its output")
        finally:
            hook.remove()
        return torch.cat(captured)

    def gradients(self, features: Tensor, labels: Tensor) -> Tensor:
        """Per (features, label) pair, the flattened gradient of the cross-entropy with
        respect to the last layer's parameters, float64."""

        def loss(params: dict[str, Tensor], h: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(self.linear, params, (h[None],)), y[None])

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(self.params, features, labels)
        return torch.cat([per_sample[n].flatten(1) for n in self.params], 1).to(torch.float64)

    def of(self, pixels: Tensor, labels: Tensor) -> Tensor:
        return self.gradients(self.features(pixels), labels)


def with_every_label(features: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Each feature row once per label: rows (image 0, label 0), (image 0, label 1), ..."""
    labels = torch.arange(classes).repeat(len(features))
    return features.repeat_interleave(classes, 0), labels


def ranked(gradients: Tensor, rest: Tensor, taken: list[int], count: int = 1) -> list[int]:
    """The ``count`` rows of ``gradients`` nearest to ``rest``, nearest first, except ``taken``."""
    score = (gradients * gradients).sum(1) - 2 * (gradients @ rest)  # ||rest − g||² − ||rest||²
    score[taken] = float("inf")
    return score.topk(count, largest=False).indices.tolist()


def pursue(gradients: Tensor, target: Tensor, count: int) -> list[int]:
    """Rows of ``gradients`` whose sum best matches ``target``: greedy, then swaps."""
    chosen: list[int] = []
    for _ in range(count):
        chosen += ranked(gradients, target - gradients[chosen].sum(0), chosen)
    for _ in range(SWEEPS):
        changed = False
        for slot in range(count):
            others = chosen[:slot] + chosen[slot + 1 :]
            rest = target - gradients[others].sum(0)
            (best,) = ranked(gradients, rest, others)
            if mismatch(rest, gradients[best]) < mismatch(rest, gradients[chosen[slot]]):
                chosen[slot], changed = best, True
        if not changed:
            break
    return chosen


def mismatch(target: Tensor, total: Tensor) -> float:
    return float((target - total).norm() / target.norm().clamp_min(1e-30))


class Enumerator(Attack):
    """Every public image × mirror × shifts × label, chosen by gradient match, then a gain."""

    requires = frozenset({Capability.BATCH_SIZE})

    def __init__(
        self, max_shift: int = 2, max_gain_change: float = 0.25, shortlist: int = 8
    ) -> None:
        super().__init__(max_shift=max_shift, max_gain_change=max_gain_change, shortlist=shortlist)
        self.max_shift, self.max_gain_change = max_shift, max_gain_change
        self.shortlist = shortlist

    def reconstruct(self, observation: Any) -> Reconstruction:
        from leakbench.leaderboard.lookup import shifted_and_flipped

        classes = observation.num_classes
        layer = LastLayer(observation)
        candidates = shifted_and_flipped(public_pixels(), self.max_shift)
        features, labels = with_every_label(layer.features(candidates), classes)
        gradients = layer.gradients(features, labels)
        chosen = pursue(gradients, layer.target, observation.batch_size)
        # The gain: each image in turn, the others fixed, among the shortlist of candidates
        # that best match what the others leave (the chosen one first).
        current = gradients[chosen].clone()
        images, gains = candidates[[c // classes for c in chosen]], [1.0] * len(chosen)
        for slot in range(len(chosen)):
            others = chosen[:slot] + chosen[slot + 1 :]
            rest = layer.target - current.sum(0) + current[slot]
            shortlist = ranked(gradients, rest, others, self.shortlist)
            rows = torch.tensor([chosen[slot], *(r for r in shortlist if r != chosen[slot])])
            gain, fits, errors = self._gains(layer, candidates[rows // classes], labels[rows], rest)
            best = int(errors.argmin())
            chosen[slot], gains[slot] = int(rows[best]), float(gain[best])
            current[slot] = fits[best]
            images[slot] = (gains[slot] * candidates[rows[best] // classes]).clamp(0, 1)
        return Reconstruction(
            images=observation.to_input_space(images),
            labels=labels[chosen],
            info={
                "candidates": len(gradients),
                "gains": gains,
                "mismatch": mismatch(layer.target, current.sum(0)),
            },
        )

    def _gains(
        self, layer: LastLayer, pixels: Tensor, labels: Tensor, rest: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per image of ``pixels``, the brightness gain that best explains ``rest``: a grid of
        step 0.01 within ±``max_gain_change`` (1 exactly among its points), then finer grids
        around the best point; with the gradient it gives and its squared mismatch."""
        count = len(pixels)
        centres, reach = torch.ones(count, dtype=torch.float64), self.max_gain_change
        for step in GAIN_STEPS:
            steps = round(reach / step)
            offsets = torch.arange(-steps, steps + 1, dtype=torch.float64) * step
            grid = centres[:, None] + offsets[None, :]  # (images, points)
            scaled = (grid.view(count, -1, 1, 1, 1).float() * pixels[:, None]).clamp(0, 1)
            fits = layer.of(scaled.flatten(0, 1), labels.repeat_interleave(len(offsets)))
            errors = ((rest - fits) ** 2).sum(1).view(count, -1)
            best = errors.argmin(1)
            centres, reach = grid[torch.arange(count), best], step
        picked = torch.arange(count) * len(offsets) + best
        return centres, fits[picked], errors[torch.arange(count), best]


class Memoriser(Attack):
    """The public images that explain the update exactly, or else the mean public image."""

    requires = frozenset({Capability.BATCH_SIZE})

    def __init__(self, tolerance: float = 1e-3) -> None:
        super().__init__(tolerance=tolerance)
        self.tolerance = tolerance

    def reconstruct(self, observation: Any) -> Reconstruction:
        layer = LastLayer(observation)
        public = public_pixels()
        features, labels = with_every_label(layer.features(public), observation.num_classes)
        gradients = layer.gradients(features, labels)
        chosen = pursue(gradients, layer.target, observation.batch_size)
        found = mismatch(layer.target, gradients[chosen].sum(0))
        if found < self.tolerance:
            images, labels = public[[c // observation.num_classes for c in chosen]], labels[chosen]
        else:
            images = public.mean(0, keepdim=True).repeat(observation.batch_size, 1, 1, 1)
            labels = None
        return Reconstruction(
            images=observation.to_input_space(images),
            labels=labels,
            info={"remembered": found < self.tolerance, "mismatch": found},
        )
