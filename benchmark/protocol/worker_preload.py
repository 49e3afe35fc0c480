"""Imported once by the attack workers' fork server, so that each trial's worker starts warm:
torch, the victim zoo and every registered attack (built-in and entry-point plugins) are loaded,
and torch's lazily initialised machinery (autograd, the optimisers' first step) has run once
on a toy problem. That happens on one thread, so no thread pool exists yet when workers are
forked; each worker sets its own thread count."""

import torch
from torch import nn

from leakbench.registry import ATTACKS, MODELS


def _warm_up() -> None:
    torch.set_num_threads(1)
    toy = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2))
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    optimizer = torch.optim.LBFGS([x], max_iter=2)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(toy(x), torch.tensor([0]))
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        total = loss + grad.pow(2).sum()
        total.backward()
        return total

    optimizer.step(closure)
    torch.optim.Adam([x]).step()


ATTACKS.names()
MODELS.names()
_warm_up()
