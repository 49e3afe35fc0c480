"""``leakbench data check NAME``: a light module; the datasets load only when it runs."""

from __future__ import annotations

from typing import Any

from leakbench.commands import command


@command("data check", repeated={"--option": "option"})
def data_check(
    name: str,
    *,
    root: str | None = None,
    dataset_options: dict[str, Any] | None = None,
    option: list[str] | None = None,
    decode: bool = False,
) -> int:
    """Verify a dataset's layout on disk; count images per split and class.

    Exit 0 when the dataset is usable, 1 when a problem was found.

    Args:
        name: Registered dataset name, e.g. lfw, celeba, retinamnist.
        root: Dataset folder (default: $LEAKBENCH_DATA/NAME).
        dataset_options: Datamodule options, e.g. {edition: 2017}.
        option: One datamodule option as KEY=VALUE (older spelling); repeatable.
        decode: Also decode every image (slow on full datasets).
    """
    from leakbench.registry import DATAMODULES, check_name

    check_name(DATAMODULES, name)
    from leakbench.datamodules.check import check_dataset, parse_options

    options = {**(dataset_options or {}), **parse_options(option)}
    report = check_dataset(name, root, options, decode)
    print(report.text())
    return 0 if report.ok else 1
