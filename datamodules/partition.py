"""Federated client partitions and group-disjoint splits of a dataset's sample indices.

Client partitions (``partition_indices``) split the samples of one split among clients:

- ``iid``: a seeded permutation cut into ``num_clients`` nearly equal parts (sizes differ by at
  most one).
- ``dirichlet``: label skew after Hsu, Qi & Brown (2019), "Measuring the effects of non-identical
  data distribution for federated visual classification". For every class ``k`` draw client
  proportions ``p_k ~ Dir(alpha · 1)`` and give client ``c`` the share ``p_k[c]`` of the class's
  shuffled samples. Small ``alpha`` gives each client few classes; large ``alpha`` tends to IID.
  A client may end up with no samples; a trial only draws from clients that hold a full batch.
- ``group``: whole groups (an identity, a patient, a lesion) go to one client each. Groups are
  taken in a seeded order and each goes to the client holding the fewest samples so far, so no
  group is split across clients and client sizes stay balanced.

``group_split`` makes the identity-, patient- or lesion-disjoint train/val/test splits of
datasets without an official split. Every function returns sorted index arrays and draws all
randomness from the seed it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "group")


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    _check_clients(num_clients)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    _check_clients(num_clients)
    if not alpha > 0:
        raise ValueError(f"the Dirichlet concentration alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def group_partition(groups: Sequence[str], num_clients: int, seed: int) -> list[np.ndarray]:
    _check_clients(num_clients)
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    if num_clients > len(names):
        raise ValueError(
            f"cannot give {num_clients} clients whole groups: the split has only {len(names)}"
        )
    sizes = np.bincount(inverse, minlength=len(names))
    load = np.zeros(num_clients, dtype=np.int64)
    owner = np.empty(len(names), dtype=np.int64)
    for group in np.random.default_rng(seed).permutation(len(names)):
        client = int(np.argmin(load))  # the first of the least loaded clients
        owner[group] = client
        load[client] += sizes[group]
    return [np.flatnonzero(owner[inverse] == client) for client in range(num_clients)]


def partition_indices(
    scheme: str,
    *,
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | None,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Client index arrays of one split under ``scheme`` (one of :data:`PARTITIONS`)."""
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    if scheme == "group":
        if groups is None:
            raise ValueError(
                "partition 'group' needs a group id (identity, patient or lesion) per sample, "
                "and this dataset split has none"
            )
        return group_partition(groups, num_clients, seed)
    raise ValueError(f"unknown partition {scheme!r}; valid: {', '.join(PARTITIONS)}")


def group_split(
    groups: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Split samples into named parts that share no group, by fractions of the groups.

    Groups are permuted with ``seed``; every part after the first gets
    ``max(1, round(fraction · number of groups))`` groups and the first part the rest, so each
    part is non-empty whenever there are enough groups.
    """
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    parts = list(fractions)
    counts = [max(1, round(fractions[p] * len(names))) for p in parts[1:]]
    first = len(names) - sum(counts)
    if first < 1:
        raise ValueError(f"{len(names)} groups are too few for disjoint parts {', '.join(parts)}")
    order = np.random.default_rng(seed).permutation(len(names))
    bounds = np.cumsum([0, first, *counts])
    part_of_group = np.empty(len(names), dtype=np.int64)
    for i in range(len(parts)):
        part_of_group[order[bounds[i] : bounds[i + 1]]] = i
    return {p: np.flatnonzero(part_of_group[inverse] == i) for i, p in enumerate(parts)}


def _check_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"the number of clients must be at least 1, got {num_clients}")
