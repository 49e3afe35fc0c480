"""Leaderboards: fixed protocols (tracks), verified entries, tables and a static web site.

A *track* is a run configuration with a ``track`` block, shipped with the package
(``leakbench/leaderboard/tracks/<name>.yaml``; ``leaderboards/tracks`` in the repository)::

    track:
      name: lfw-subset-lenet-zhu-b1
      kind: attack              # attack: submitters choose the attack; defense: the defense
      ranking: psnr.median      # the statistic the tables are sorted by
      free: [attacks, attack_options]   # the only protocol keys a submission may change
      intended_for: LFW (...)   # the dataset the track is meant for on a cluster
      verification:             # how `leaderboard verify` re-checks a claim
        trials: 4
        private_transform: {rotation: 8.0, noise: 0.04, ...}  # leakbench.protocol.private_transform
        private_dataset: {dataset: lfw, dataset_options: {root: "{private}/lfw", ...}}  # optional
        lookup_bound: {psnr_max: 28.79, psnr_median: 27.97, measured_with: "leakbench ..."}
        tolerance: {confidence: 0.95, resamples: 2000, margin: 3.0, ceiling: 60.0}

The path of a result::

    leakbench run --config leaderboards/tracks/<track>.yaml --attack <yours>
    leakbench submit runs/<run>                  # one entry per cell (entry.py)
    leakbench defenses --config <defense track>  # privacy against utility per defense setting
    leakbench submit runs/<defense track>        # one entry per setting (defense_entry.py)
    leakbench leaderboard verify <entry.json>    # unseen, secretly transformed trials (verify.py)
    leakbench leaderboard lookup-bound <track>   # what a lookup scores against them (lookup.py)
    leakbench leaderboard render                 # Markdown and CSV tables (board.py)
    leakbench leaderboard build                  # the static site (site.py)

``leakbench leaderboard entry RUN --cell CELL`` is ``submit`` for one cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leakbench.lazy import lazy_exports

# Public name -> the module that defines it; loaded on first use (PEP 562), so that the command
# line can import ``leakbench.leaderboard.commands`` without loading the leaderboard.
_EXPORTS = {
    **dict.fromkeys(
        (
            "BOOKKEEPING_KEYS",
            "LEADERBOARDS",
            "PROTOCOL_KEYS",
            "SCHEMA_VERSION",
            "TRACKS",
            "EntryError",
            "check_protocol",
            "entry_path",
            "load_entry",
            "load_schema",
            "make_entry",
            "run_cells",
            "validate_entry",
            "write_entry",
        ),
        "leakbench.leaderboard.entry",
    ),
    "load_board": "leakbench.leaderboard.board",
    "render": "leakbench.leaderboard.board",
    "build_site": "leakbench.leaderboard.site",
    "AttackNotInstalled": "leakbench.leaderboard.verify",
    **dict.fromkeys(
        ("load_defense_entry", "make_defense_entry", "write_defense_entries"),
        "leakbench.leaderboard.defense_entry",
    ),
    "verify_entry": "leakbench.leaderboard.verify",
}

__all__ = sorted([*_EXPORTS, "submit"])


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


def submit(
    run_dir: str | Path,
    cells: list[str] | None = None,
    entries_dir: Path | None = None,
    *,
    defense_tracks_dir: Path | None = None,
    **details: Any,
) -> list[Path]:
    """Write one entry per cell of a finished track run (every cell unless ``cells``); entries
    go to ``entries_dir`` (default: the leaderboard's ``entries`` folder). A defense track's run
    (``leakbench defenses``) gives one entry per setting (``cells``: setting slugs), checked
    against ``defense_tracks_dir``, by default into ``defense-entries``."""
    from leakbench.leaderboard.defense_entry import (
        DEFENSE_ENTRIES,
        DEFENSE_TRACKS,
        is_defense_run,
        write_defense_entries,
    )
    from leakbench.leaderboard.entry import LEADERBOARDS, run_cells, write_entry

    if is_defense_run(run_dir):
        details.pop("tracks_dir", None)
        return write_defense_entries(
            run_dir,
            cells,
            Path(entries_dir) if entries_dir is not None else DEFENSE_ENTRIES,
            tracks_dir=Path(defense_tracks_dir or DEFENSE_TRACKS),
            **details,
        )
    folder = Path(entries_dir) if entries_dir is not None else LEADERBOARDS / "entries"
    return [
        write_entry(run_dir, cell, folder, **details)
        for cell in (cells or run_cells(Path(run_dir)))
    ]
