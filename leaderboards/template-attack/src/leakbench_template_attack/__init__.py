"""``template-gradient-matching``: a third-party leakbench attack, as a template to copy.

Cosine gradient matching (as in Inverting Gradients) with soft labels learned jointly (as in DLG),
so that it needs only the batch size. Dummy images start from the attack's seed; Adam minimises
1 − cos(∇θ ℓ(x', softmax(z')), ∇θ) over images x' and label logits z' for ``iterations`` steps,
each drawn from the trial's budget. The answer is the final dummy with its argmax labels.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from leakbench import Attack, Capability, Observation, Reconstruction


class TemplateGradientMatching(Attack):
    requires = frozenset({Capability.BATCH_SIZE})
    threat_model = "honest-but-curious server observing one FedSGD update; knows the batch size"

    def __init__(self, iterations: int = 100, lr: float = 0.1) -> None:
        # Hyperparameters go to the base class: they are recorded with every entry.
        super().__init__(iterations=iterations, lr=lr)
        if iterations < 1 or lr <= 0:
            raise ValueError("iterations must be >= 1 and lr > 0")
        self.iterations, self.lr = iterations, lr

    def reconstruct(self, observation: Observation) -> Reconstruction:
        generator = torch.Generator().manual_seed(observation.seed)
        batch = observation.batch_size
        dtype = observation.dtype
        images = torch.randn(batch, *observation.input_shape, generator=generator, dtype=dtype)
        label_logits = torch.randn(batch, observation.num_classes, generator=generator, dtype=dtype)
        images.requires_grad_(True)
        label_logits.requires_grad_(True)
        model = observation.model
        parameters = list(model.parameters())
        target = torch.cat([g.flatten() for g in observation.gradients()])
        optimiser = torch.optim.Adam([images, label_logits], lr=self.lr)
        for _ in observation.budget.iterations(self.iterations):
            optimiser.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(model(images), label_logits.softmax(dim=1))
                grads = torch.autograd.grad(loss, parameters, create_graph=True)
                dummy = torch.cat([g.flatten() for g in grads])
                distance = 1 - F.cosine_similarity(dummy, target, dim=0)
                distance.backward()
            optimiser.step()
        return Reconstruction(
            images=images.detach(), labels=label_logits.argmax(dim=1).detach(), batch_size=batch
        )
