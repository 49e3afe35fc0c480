"""``leakbench data check NAME --root DIR``: is a dataset where and how its module expects it?

For every split it loads the index (split files, ground truth, folder listings), counts the
images per class, and says what is missing or malformed; ``--decode`` also decodes every
image, to find truncated or unreadable files. A missing root prints the expected layout and
where the data comes from. Exit status 0 when every split loads, 1 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from leakbench.datamodules.base import DatasetError, FileDataModule, TrialDataModule
from leakbench.registry import DATAMODULES, UnknownNameError

MAX_CLASS_ROWS = 30  # more classes than this are summarised instead of listed
MAX_DECODE_ERRORS = 10


@dataclass
class CheckReport:
    dataset: str
    lines: list[str] = field(default_factory=list)
    problems: int = 0

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def problem(self, text: str) -> None:
        self.problems += 1
        self.lines.append(f"PROBLEM: {text}")

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def text(self) -> str:
        verdict = "OK" if self.ok else f"{self.problems} problem(s)"
        return "\n".join([*self.lines, f"{self.dataset}: {verdict}"])


def check_dataset(
    name: str,
    root: str | None = None,
    options: Mapping[str, Any] | None = None,
    decode: bool = False,
) -> CheckReport:
    """Inspect dataset ``name`` (a registered datamodule) under ``root``."""
    from leakbench.runner import instantiate  # the run machinery, only needed here

    try:
        factory = DATAMODULES.get(name)
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None
    kwargs = dict(options or {})
    if root is not None:
        if not (isinstance(factory, type) and issubclass(factory, FileDataModule)):
            raise ValueError(f"dataset {name!r} is not read from disk and takes no --root")
        kwargs["root"] = root
    datamodule: TrialDataModule = instantiate("dataset", name, factory, kwargs)
    report = CheckReport(name)
    if isinstance(datamodule, FileDataModule):
        report.add(f"{name}: root {datamodule.root}")
        if not datamodule.root.is_dir():
            try:
                datamodule.require_root()
            except DatasetError as exc:
                report.problem(str(exc))
            return report
    for split in datamodule.splits:
        _check_split(report, datamodule, split, decode)
    if isinstance(datamodule, FileDataModule) and report.ok:
        for note in datamodule.check_notes():
            report.add(f"note: {note}")
    return report


def _check_split(
    report: CheckReport, datamodule: TrialDataModule, split: str, decode: bool
) -> None:
    try:
        samples = datamodule.samples(split)
    except DatasetError as exc:
        report.problem(f"split {split}: {exc}")
        return
    labels = np.asarray(samples.labels)  # type: ignore[attr-defined]
    counts = np.bincount(labels, minlength=datamodule.num_classes)
    names = list(getattr(datamodule, "class_names", range(datamodule.num_classes)))
    groups = getattr(samples, "groups", None)
    in_groups = f" of {len(set(groups))} groups" if groups is not None else ""
    report.add(
        f"split {split}: {len(labels)} images{in_groups}, "
        f"{np.count_nonzero(counts)} of {datamodule.num_classes} classes present"
    )
    if datamodule.num_classes <= MAX_CLASS_ROWS:
        width = max(len(str(n)) for n in names)
        for class_name, count in zip(names, counts, strict=True):
            report.add(f"  {str(class_name):<{width}}  {count}")
    else:
        present = counts[counts > 0]
        report.add(
            f"  images per present class: min {present.min()}, "
            f"median {int(np.median(present))}, max {present.max()}"
        )
    if decode:
        _decode_all(report, samples, split)


def _decode_all(report: CheckReport, samples: Any, split: str) -> None:
    failures = 0
    for i in range(len(samples)):
        try:
            samples[i]
        except DatasetError as exc:
            failures += 1
            if failures <= MAX_DECODE_ERRORS:
                report.problem(f"split {split}: {exc}")
    if failures > MAX_DECODE_ERRORS:
        report.problem(f"split {split}: {failures - MAX_DECODE_ERRORS} more undecodable images")
    elif not failures:
        report.add(f"  all {len(samples)} images decode")


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as YAML scalars (``size=64``, ``grayscale=true``)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options
