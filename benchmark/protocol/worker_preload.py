"""Imported once by what forks the attack jobs (the worker processes' fork server, and the
sandbox's zygote), so that each job starts warm: torch, the victim zoo and leakbench's own
attacks are loaded (never a plug-in: its module is imported only in the job that runs it), and
torch's lazily initialised machinery (autograd, the optimisers' first step) has run once on a
toy problem. That happens on one thread, so no thread pool exists yet when jobs are forked;
each job sets its own thread count."""

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


ATTACKS.names()  # imports the built-in attack modules; plug-ins are only named
MODELS.names()
import leakbench.protocol.jobs  # noqa: E402,F401  (what every job runs)

_warm_up()
