"""The baseline defenses: none, noise (clipping + Gaussian/Laplace noise) and pruning."""

from __future__ import annotations

import math

import pytest
import torch

from leakbench.defenses.noise import NoiseDefense
from leakbench.defenses.none import NoDefense
from leakbench.defenses.pruning import PruningDefense
from leakbench.registry import DEFENSES


def random_update(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (13, 7), "0.bias": (13,), "2.weight": (4, 13), "2.bias": (4,)}
    return {n: torch.randn(s, generator=g, dtype=dtype) for n, s in shapes.items()}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def total_norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in update.values()))


def test_registered_names() -> None:
    assert {"none", "noise", "pruning"} <= set(DEFENSES.names())


def test_none_is_the_identity() -> None:
    update = random_update()
    shared = NoDefense().defend_update(None, None, None, update, generator())
    assert shared.keys() == update.keys()
    assert all(shared[n] is update[n] for n in update)


# --- pruning ------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_fraction", [0.05, 0.3, 0.5, 1.0])
def test_layer_pruning_keeps_the_largest_fraction_of_each_tensor(keep_fraction: float) -> None:
    update = random_update()
    pruned = PruningDefense(keep_fraction=keep_fraction).defend_update(
        None, None, None, update, generator()
    )
    for name, original in update.items():
        kept = pruned[name] != 0
        assert int(kept.sum()) == math.ceil(keep_fraction * original.numel())
        assert torch.equal(pruned[name][kept], original[kept])  # kept entries are untouched
        if not kept.all():
            assert original[kept].abs().min() > original[~kept].abs().max()


def test_global_pruning_keeps_the_largest_fraction_of_the_whole_update() -> None:
    update = random_update()
    update["2.bias"] = update["2.bias"] * 100  # dominates globally, so is kept entirely
    pruned = PruningDefense(keep_fraction=0.2, scope="global").defend_update(
        None, None, None, update, generator()
    )
    total = sum(g.numel() for g in update.values())
    kept = {n: pruned[n] != 0 for n in update}
    assert sum(int(k.sum()) for k in kept.values()) == math.ceil(0.2 * total)
    assert kept["2.bias"].all()
    smallest_kept = min(update[n][kept[n]].abs().min() for n in update if kept[n].any())
    largest_dropped = max(update[n][~kept[n]].abs().max() for n in update if (~kept[n]).any())
    assert smallest_kept > largest_dropped
    assert all(pruned[n].shape == update[n].shape for n in update)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_fraction": 0.0}, r"keep_fraction must be in \(0, 1\], got 0.0"),
        ({"keep_fraction": 1.5}, r"keep_fraction must be in \(0, 1\], got 1.5"),
        ({"keep_fraction": "half"}, r"keep_fraction must be in \(0, 1\], got 'half'"),
        ({"keep_fraction": 0.5, "scope": "row"}, r"unknown pruning scope 'row'; valid: layer"),
    ],
)
def test_pruning_rejects_bad_hyperparameters(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruningDefense(**options)


# --- noise and clipping -------------------------------------------------------------------


def test_clipping_brings_the_norm_down_to_the_bound_and_no_further() -> None:
    update = random_update()
    norm = total_norm(update)
    clipped = NoiseDefense(scale=0.0, clip_norm=norm / 3).defend_update(
        None, None, None, update, generator()
    )
    assert total_norm(clipped) == pytest.approx(norm / 3, rel=1e-12)
    for name, g in update.items():  # one common factor: directions are kept
        assert torch.allclose(clipped[name] * 3, g, rtol=1e-12, atol=0)
    loose = NoiseDefense(scale=0.0, clip_norm=2 * norm).defend_update(
        None, None, None, update, generator()
    )
    assert all(torch.equal(loose[n], update[n]) for n in update)


def test_noise_is_seeded_and_keeps_dtype_and_shape() -> None:
    update = random_update(torch.float32)
    defense = NoiseDefense(scale=0.1, distribution="laplace", clip_norm=1.0)
    first = defense.defend_update(None, None, None, update, generator(7))
    second = defense.defend_update(None, None, None, update, generator(7))
    other = defense.defend_update(None, None, None, update, generator(8))
    assert all(torch.equal(first[n], second[n]) for n in update)
    assert not any(torch.equal(first[n], other[n]) for n in update)
    assert all(
        first[n].dtype == torch.float32 and first[n].shape == update[n].shape for n in update
    )


@pytest.mark.parametrize(
    ("distribution", "std_per_scale", "mean_abs_per_scale"),
    [("gaussian", 1.0, math.sqrt(2 / math.pi)), ("laplace", math.sqrt(2), 1.0)],
)
def test_noise_has_the_stated_spread(
    distribution: str, std_per_scale: float, mean_abs_per_scale: float
) -> None:
    scale = 0.25
    update = {"w": torch.zeros(400_000, dtype=torch.float64)}
    noise = NoiseDefense(scale=scale, distribution=distribution).defend_update(
        None, None, None, update, generator()
    )["w"]
    assert abs(noise.mean().item()) < 0.01 * scale
    assert noise.std().item() == pytest.approx(std_per_scale * scale, rel=0.01)
    assert noise.abs().mean().item() == pytest.approx(mean_abs_per_scale * scale, rel=0.01)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": -1.0}, r"noise scale must be a finite number >= 0, got -1.0"),
        ({"scale": math.nan}, r"noise scale must be a finite number >= 0, got nan"),
        ({"scale": 0.1, "distribution": "uniform"}, r"unknown noise distribution 'uniform'"),
        ({"scale": 0.1, "clip_norm": 0}, r"clip_norm must be a finite number > 0 or None, got 0"),
    ],
)
def test_noise_rejects_bad_hyperparameters(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoiseDefense(**options)
