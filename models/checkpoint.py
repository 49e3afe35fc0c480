"""Content-addressed victim checkpoints: ``<dir>/<sha256>.pt`` and its card ``<sha256>.json``.

A checkpoint is a model's ``state_dict`` written with :func:`torch.save` into memory (so the
bytes do not depend on the file name) and stored under the SHA-256 of those bytes; the card is a
small JSON file that says how the weights were made (model, dataset, recipe, test accuracy,
versions). A checkpoint is named by its full hash or by a unique prefix of at least
:data:`MIN_PREFIX` hex digits.

Loading is refused, before anything is built, when

1. the name is not hex, is too short, or matches no file or more than one;
2. the file's SHA-256 is not its name (the file was changed);
3. the file is not a plain mapping of names to tensors (``torch.load(weights_only=True)``
   refuses any other pickled object, so nothing in it runs);
4. the card is missing, unreadable, or names another hash;

and :func:`check_state_matches` refuses a state whose keys or shapes differ from a model's.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MIN_PREFIX = 8
_HEX = re.compile(r"[0-9a-f]+")


class CheckpointError(ValueError):
    """A checkpoint cannot be found, was changed, holds no weights, or fits another model."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its hash, files, weights and card."""

    sha256: str
    path: Path
    card_path: Path
    state: dict[str, Tensor]
    card: dict[str, Any]


def state_bytes(state: Mapping[str, Tensor]) -> bytes:
    """The bytes :func:`torch.save` writes for ``state`` (detached, contiguous CPU copies)."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    buffer = io.BytesIO()  # a buffer, not a path: the archive's inner name is then fixed
    torch.save(plain, buffer)
    return buffer.getvalue()


def save_checkpoint(
    state: Mapping[str, Tensor], card: Mapping[str, Any], directory: str | Path
) -> Checkpoint:
    """Write ``state`` to ``<directory>/<sha256>.pt`` and ``card`` (plus its hash) beside it."""
    from leakbench.results import atomic_write_bytes, atomic_write_text

    data = state_bytes(state)
    sha256 = hashlib.sha256(data).hexdigest()
    folder = Path(directory).expanduser()
    path, card_path = folder / f"{sha256}.pt", folder / f"{sha256}.json"
    # The same weights always have the same bytes: an intact existing file is kept as it is.
    if not (path.is_file() and _file_sha256(path) == sha256):
        atomic_write_bytes(path, data)
    full_card = {"sha256": sha256, **{k: v for k, v in card.items() if k != "sha256"}}
    atomic_write_text(card_path, json.dumps(full_card, indent=2, sort_keys=True) + "\n")
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    return Checkpoint(sha256, path, card_path, loaded, full_card)


def find_checkpoint(name: str, directory: str | Path) -> Path:
    """The ``.pt`` file of ``directory`` whose hash is ``name`` or starts with it."""
    text = name.strip().lower()
    if len(text) < MIN_PREFIX or len(text) > 64 or not _HEX.fullmatch(text):
        raise CheckpointError(
            f"checkpoint name {name!r} is not a sha256: expected {MIN_PREFIX} to 64 hex digits"
        )
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint directory {folder} does not exist (looking for {name})")
    matches = sorted(folder.glob(f"{text}*.pt"))
    if not matches:
        raise CheckpointError(f"no checkpoint {text} in {folder}: expected a file {text}*.pt")
    if len(matches) > 1:
        shown = ", ".join(p.stem[:16] for p in matches[:4])
        raise CheckpointError(
            f"checkpoint prefix {text} is ambiguous in {folder}: it matches {shown}; "
            "give more hex digits"
        )
    return matches[0]


def load_checkpoint(name: str, directory: str | Path) -> Checkpoint:
    """The verified checkpoint ``name`` (full sha256 or a unique prefix) of ``directory``."""
    path = find_checkpoint(name, directory)
    expected = path.stem
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} has sha256 {actual}, expected {expected}: the file was changed"
        )
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not hold plain weights; weights-only loading refused it: "
            f"{_load_refusal(exc)}"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, "
            "expected a state_dict (a mapping of parameter names to tensors)"
        )
    card_path = path.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no card: expected {card_path} beside it"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint card {card_path} is not JSON: {exc}") from None
    if not isinstance(card, dict) or card.get("sha256") != expected:
        found = card.get("sha256") if isinstance(card, dict) else type(card).__name__
        raise CheckpointError(
            f"checkpoint card {card_path} has sha256 {found!r}, expected {expected!r}"
        )
    return Checkpoint(expected, path, card_path, dict(state), card)


def check_state_matches(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Refuse ``state`` (from ``source``) unless its keys and shapes are exactly ``model``'s."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if shapes:
        problems.append(f"shape (state vs model) of {_few(shapes)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model {type(model).__name__}: {'; '.join(problems)}"
        )


def _load_refusal(exc: Exception) -> str:
    """The one line of a ``torch.load`` error that says why (e.g. which global it refused)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for line in lines:
        if marker in line:
            return line.split(marker, 1)[1].split(" Please use", 1)[0].strip()
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(exc).__name__


def _few(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
