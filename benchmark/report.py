"""``leakbench report RUN_DIR``: one HTML page for a finished run (``RUN_DIR/report.html``).

The page holds the summary table of every cell (the numbers of ``summary.json``), each cell's
figure (``figures/<cell>.png``, linked relatively, so the folder can be moved or opened from
``file://``), the configuration the run was started with and its environment. It is rendered
from ``templates/report.html.j2`` with the leaderboard site's macros and stylesheet (inlined,
so the page is one file next to its figures). The output is a pure function of the run folder:
rendering twice gives the same bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from leakbench.leaderboard.entry import slug
from leakbench.leaderboard.site import _environment
from leakbench.results import RunDirectory, atomic_write_text

# What the configuration section leaves out: the environment has a section of its own.
NOT_CONFIGURATION = ("environment",)


def _figure(run_dir: RunDirectory, cell: str, page_folder: Path) -> dict[str, Any] | None:
    path = run_dir.figure_path(cell)
    if not path.is_file():
        return None
    with Image.open(path) as image:
        width, height = image.size
    src = Path(os.path.relpath(path.resolve(), page_folder.resolve())).as_posix()
    return {"src": src, "width": width, "height": height}


def render_report(run_path: Path, page_folder: Path) -> str:
    """The report page of the run in ``run_path``, its links relative to ``page_folder``."""
    run_dir = RunDirectory(run_path)
    summary = json.loads((run_path / "summary.json").read_text())
    config = run_dir.read_config() or {}
    cells = [
        {
            "key": key,
            "anchor": "cell-" + slug(key),
            "aggregates": aggregates,
            "figure": _figure(run_dir, key, page_folder),
        }
        for key, aggregates in summary["cells"].items()
    ]
    shown = {k: v for k, v in config.items() if k not in NOT_CONFIGURATION}
    environment = config.get("environment") or {}
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            name=run_path.resolve().name,
            summary=summary,
            cells=cells,
            configuration=yaml.safe_dump(shown, sort_keys=False) if shown else "(no config.yaml)",
            environment=sorted(environment.items()),
        )
    )


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of the run in ``run_dir`` to ``output`` (default
    ``RUN_DIR/report.html``); returns its path. Refuses a folder that is not a finished run."""
    run_path = Path(run_dir)
    if not (run_path / "summary.json").is_file():
        raise ValueError(
            f"run_dir: {str(run_path)!r} holds no summary.json, expected the folder of a "
            "finished leakbench run"
        )
    target = Path(output) if output is not None else run_path / "report.html"
    if target.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"output: {str(target)!r}, expected a file name ending in .html")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, render_report(run_path, target.parent))
    return target


def report_command(run_dir: str, output: str | None = None) -> int:
    """``leakbench report RUN_DIR [--output FILE]``: write the run's HTML page, print its path.

    Returns the exit status (0); bad input raises ValueError with one line.
    """
    path = write_report(run_dir, output)
    print(f"report: {path}", file=sys.stdout)
    return 0
