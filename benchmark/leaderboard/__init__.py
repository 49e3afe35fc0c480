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
        private_transform: {max_shift: 2, flip: true, brightness: 0.1}
        tolerance: {confidence: 0.95, resamples: 2000, margin: 3.0, ceiling: 60.0}

The path of a result::

    leakbench run --config leaderboards/tracks/<track>.yaml --attack <yours>
    leakbench submit runs/<run>                  # one entry per cell (entry.py)
    leakbench leaderboard verify <entry.json>    # unseen, secretly transformed trials (verify.py)
    leakbench leaderboard render                 # Markdown and CSV tables (board.py)
    leakbench leaderboard build                  # the static site (site.py)

``leakbench leaderboard entry RUN --cell CELL`` is ``submit`` for one cell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from leakbench.leaderboard.board import load_board, render
from leakbench.leaderboard.entry import (
    BOOKKEEPING_KEYS,
    LEADERBOARDS,
    PROTOCOL_KEYS,
    SCHEMA_VERSION,
    TRACKS,
    EntryError,
    check_protocol,
    entry_path,
    load_entry,
    load_schema,
    make_entry,
    run_cells,
    validate_entry,
    write_entry,
)
from leakbench.leaderboard.site import build_site
from leakbench.leaderboard.verify import AttackNotInstalled, verify_entry
from leakbench.results import atomic_write_text

__all__ = [
    "BOOKKEEPING_KEYS",
    "LEADERBOARDS",
    "PROTOCOL_KEYS",
    "SCHEMA_VERSION",
    "TRACKS",
    "AttackNotInstalled",
    "EntryError",
    "add_command",
    "build_site",
    "check_protocol",
    "entry_path",
    "load_board",
    "load_entry",
    "load_schema",
    "make_entry",
    "render",
    "submit",
    "validate_entry",
    "verify_entry",
    "write_entry",
]


def submit(
    run_dir: str | Path,
    cells: list[str] | None = None,
    entries_dir: Path = LEADERBOARDS / "entries",
    **details: Any,
) -> list[Path]:
    """Write one entry per cell of a finished track run (every cell unless ``cells``)."""
    return [
        write_entry(run_dir, cell, Path(entries_dir), **details)
        for cell in (cells or run_cells(Path(run_dir)))
    ]


def _entry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="display name (default: the attack or defense)")
    p.add_argument("--submitter")
    p.add_argument("--paper", help="link to the paper or code")
    p.add_argument("--replace", action="store_true", help="overwrite an entry of the same name")
    _dirs(p, tables=False)


def _dirs(p: argparse.ArgumentParser, tables: bool) -> None:
    p.add_argument("--entries-dir", default=str(LEADERBOARDS / "entries"))
    p.add_argument("--tracks-dir", default=str(TRACKS))
    if tables:
        p.add_argument("--out-dir", default=str(LEADERBOARDS / "tables"))


def add_command(subparsers: Any) -> None:
    """``leakbench submit`` and ``leakbench leaderboard entry|render|verify|build``."""
    s = subparsers.add_parser("submit", help="turn a finished track run into leaderboard entries")
    s.add_argument("run_dir")
    s.add_argument("--cell", dest="cells", action="append", help="only this cell; repeatable")
    _entry_options(s)
    s.set_defaults(func=submit_command)

    p = subparsers.add_parser("leaderboard", help="verify entries, render tables, build the site")
    sub = p.add_subparsers(dest="leaderboard_command", required=True)
    e = sub.add_parser("entry", help="turn one cell of a track run into an entry JSON")
    e.add_argument("run_dir")
    e.add_argument("--cell", required=True, help="e.g. dlg__none__b1 (see summary.json)")
    _entry_options(e)
    e.set_defaults(func=entry_command)

    v = sub.add_parser("verify", help="re-run an entry on unseen, secretly transformed trials")
    v.add_argument("entries", nargs="+", metavar="ENTRY", help="entry JSON file(s)")
    v.add_argument("--tracks-dir", default=str(TRACKS))
    v.add_argument("--runs-dir", help="keep the verification runs here (default: discarded)")
    v.add_argument("--threads", type=int, help="intra-op threads per process")
    v.set_defaults(func=verify_command)

    r = sub.add_parser("render", help="write Markdown and CSV tables per track")
    _dirs(r, tables=True)
    r.set_defaults(func=render_command)

    b = sub.add_parser("build", help="render the static web leaderboard")
    _dirs(b, tables=False)
    b.add_argument("--out-dir", default=str(LEADERBOARDS / "site"))
    b.set_defaults(func=build_command)


def _details(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": args.name,
        "submitter": args.submitter,
        "paper": args.paper,
        "tracks_dir": Path(args.tracks_dir),
        "replace": args.replace,
    }


def submit_command(args: argparse.Namespace) -> int:
    paths = submit(args.run_dir, args.cells, Path(args.entries_dir), **_details(args))
    for path in paths:
        print(f"wrote {path}")
    return 0


def entry_command(args: argparse.Namespace) -> int:
    path = write_entry(args.run_dir, args.cell, Path(args.entries_dir), **_details(args))
    print(f"wrote {path}")
    return 0


def verify_command(args: argparse.Namespace) -> int:
    """Exit 0 when every entry passed, 1 when one failed, 2 when one was refused."""
    failed = refused = 0
    for path in args.entries:
        try:
            block = verify_entry(
                path,
                tracks_dir=Path(args.tracks_dir),
                runs_dir=Path(args.runs_dir) if args.runs_dir else None,
                threads=args.threads,
            )
        except EntryError as exc:
            if len(args.entries) == 1:
                raise  # the CLI prints it as its one error line
            print(f"leakbench: error: {exc}", file=sys.stderr)
            refused += 1
            continue
        failed += not block["passed"]
    return 2 if refused else (1 if failed else 0)


def render_command(args: argparse.Namespace) -> int:
    tables = render(Path(args.entries_dir), Path(args.tracks_dir))
    for filename, text in tables.items():
        atomic_write_text(Path(args.out_dir) / filename, text)
        print(f"wrote {Path(args.out_dir) / filename}")
    return 0


def build_command(args: argparse.Namespace) -> int:
    files = build_site(Path(args.entries_dir), Path(args.out_dir), Path(args.tracks_dir))
    print(f"wrote {len(files)} files; open {Path(args.out_dir) / 'index.html'}")
    return 0
