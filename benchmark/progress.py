"""The one progress bar of leakbench: ``leakbench run`` and every study show what runs now.

A bar is written to stderr (never to stdout, which holds the results a user may pipe on), names
the cell and the trial it is at, and is switched off by ``progress=False`` (``--no-progress`` on
the command line). It is tqdm's bar; nothing here measures anything.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


class Progress:
    """A bar over ``total`` steps; :meth:`step` names the step just done and advances one.

    With ``enabled=False`` every method does nothing and nothing is written.
    """

    def __init__(
        self, total: int | None, label: str, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.label = label
        # Minimal intervals of 0: a trial can take minutes, and each must show when it ends.
        self._bar = tqdm(
            total=total,
            desc=label,
            file=stream if stream is not None else sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            leave=True,
            mininterval=0,
            miniters=1,
        )

    def now(self, where: str) -> None:
        """Name what starts now (a cell, a trial) without advancing the count."""
        self._bar.set_description_str(f"{self.label} {where}".strip(), refresh=True)

    def step(self, where: str) -> None:
        """One step done: name it and advance the bar."""
        self._bar.set_description_str(f"{self.label} {where}".strip(), refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    items: Iterable[Item],
    label: str,
    enabled: bool = True,
    total: int | None = None,
    name: Any = None,
) -> Iterator[Item]:
    """Iterate ``items`` behind a bar labelled ``label``; each step shows ``name(item)`` (or
    its position, ``trial i``) while that item runs."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(count, label, enabled) as bar:
        for position, item in enumerate(items):
            bar.now(name(item) if name is not None else f"trial {position}")
            yield item
            bar.step(name(item) if name is not None else f"trial {position}")
