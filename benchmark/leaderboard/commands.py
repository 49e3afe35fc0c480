"""``leakbench submit`` and ``leakbench leaderboard entry|verify|render|build``.

A light module: the leaderboard loads only when one of these commands runs. The folders
default to the leaderboard's own (``leaderboards/`` in a checkout, else ``./leaderboards``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from leakbench.commands import command


def _folders(entries_dir: str | None, tracks_dir: str | None) -> tuple[Path, Path]:
    from leakbench.leaderboard.entry import LEADERBOARDS, TRACKS

    return (
        Path(entries_dir) if entries_dir else LEADERBOARDS / "entries",
        Path(tracks_dir) if tracks_dir else TRACKS,
    )


@command("submit", repeated={"--cell": "cells"})
def submit_command(
    run_dir: str,
    *,
    cells: list[str] | None = None,
    name: str | None = None,
    submitter: str | None = None,
    paper: str | None = None,
    replace: bool = False,
    entries_dir: str | None = None,
    tracks_dir: str | None = None,
    defense_tracks_dir: str | None = None,
) -> int:
    """Turn a finished track run into leaderboard entries, one per cell; a defense track's run
    (the folder `leakbench defenses` wrote) into defense entries, one per setting.

    Args:
        run_dir: The finished run folder.
        cells: Only these cells (e.g. [dlg__none__b1]; see summary.json), or for a defense run
            these settings (e.g. [noise-s=0.01]; see settings/); default: every one.
        name: Display name (default: the attack, defense or setting label).
        submitter: Who submits the entry.
        paper: Link to the paper or code.
        replace: Overwrite an entry of the same name.
        entries_dir: Folder of the entries (default: the leaderboard's entries, or
            defense-entries for a defense run).
        tracks_dir: Folder of the track files (default: the package's).
        defense_tracks_dir: Folder of the defense track files (default: the package's).
    """
    from leakbench.leaderboard import submit

    _, tracks = _folders(entries_dir, tracks_dir)
    details = {"name": name, "submitter": submitter, "paper": paper, "replace": replace}
    entries = Path(entries_dir) if entries_dir else None
    defense_tracks = Path(defense_tracks_dir) if defense_tracks_dir else None
    for path in submit(
        run_dir, cells, entries, tracks_dir=tracks, defense_tracks_dir=defense_tracks, **details
    ):
        print(f"wrote {path}")
    return 0


@command("leaderboard entry")
def entry_command(
    run_dir: str,
    *,
    cell: str,
    name: str | None = None,
    submitter: str | None = None,
    paper: str | None = None,
    replace: bool = False,
    entries_dir: str | None = None,
    tracks_dir: str | None = None,
) -> int:
    """Turn one cell of a track run into an entry JSON.

    Args:
        run_dir: The finished run folder.
        cell: The cell, e.g. dlg__none__b1 (see summary.json).
        name: Display name (default: the attack or defense).
        submitter: Who submits the entry.
        paper: Link to the paper or code.
        replace: Overwrite an entry of the same name.
        entries_dir: Folder of the entries (default: the leaderboard's).
        tracks_dir: Folder of the track files (default: the package's).
    """
    from leakbench.leaderboard.entry import write_entry

    entries, tracks = _folders(entries_dir, tracks_dir)
    details = {"name": name, "submitter": submitter, "paper": paper}
    path = write_entry(run_dir, cell, entries, tracks_dir=tracks, replace=replace, **details)
    print(f"wrote {path}")
    return 0


@command("leaderboard verify")
def verify_command(
    entries: list[str],
    *,
    key: str | None = None,
    check_only: bool = False,
    tracks_dir: str | None = None,
    defense_tracks_dir: str | None = None,
    keys_dir: str | None = None,
    runs_dir: str | None = None,
    threads: int | None = None,
    restate: bool = False,
) -> int:
    """Re-run entries in the sandbox on unseen, secretly transformed trials and sign the result
    with the board's key (a maintainer's command). An attack entry's attack runs as it ran; a
    defense entry's setting is attacked by the board's attacks on its re-trained victim.
    ``--restate`` re-runs nothing: it recomputes verified defense entries' figures and verdicts
    from their verification records under the current rules and signs them again.

    Exit 0 when every entry passed, 1 when one failed, 2 when one was refused.

    Args:
        entries: Entry JSON file(s).
        key: The board's private key (PEM); default: $LEAKBENCH_BOARD_KEY_FILE.
        check_only: Report the verdict only: no key, nothing signed or written.
        tracks_dir: Folder of the track files (default: the package's).
        defense_tracks_dir: Folder of the defense track files (default: the package's).
        keys_dir: Folder of the public keys the board trusts (default: the package's).
        runs_dir: Keep the verification runs here (default: discarded).
        threads: Intra-op threads per process.
        restate: Recompute verified defense entries from their verification records and sign
            them again (no run).
    """
    from leakbench.leaderboard.entry import EntryError
    from leakbench.leaderboard.verify import restate_entry, verify_entry

    _, tracks = _folders(None, tracks_dir)
    failed = refused = 0
    for path in entries:
        try:
            if restate:
                block = restate_entry(
                    path,
                    key=key,
                    defense_tracks_dir=Path(defense_tracks_dir) if defense_tracks_dir else None,
                    keys_dir=Path(keys_dir) if keys_dir else None,
                )
                failed += not block["passed"]
                continue
            block = verify_entry(
                path,
                key=key,
                check_only=check_only,
                tracks_dir=tracks,
                defense_tracks_dir=Path(defense_tracks_dir) if defense_tracks_dir else None,
                keys_dir=Path(keys_dir) if keys_dir else None,
                runs_dir=Path(runs_dir) if runs_dir else None,
                threads=threads,
            )
        except EntryError as exc:
            if len(entries) == 1:
                raise  # the CLI prints it as its one error line
            print(f"leakbench: error: {exc}", file=sys.stderr)
            refused += 1
            continue
        failed += not block["passed"]
    return 2 if refused else (1 if failed else 0)


@command("leaderboard keygen")
def keygen_command(private_key: str, *, name: str, keys_dir: str | None = None) -> int:
    """Make a board key pair: the private key (outside the repository, mode 0600) and its public
    half in the folder of keys the board trusts.

    Args:
        private_key: Where to write the private key (PEM); never inside the repository.
        name: The key's name, e.g. board-2026 (its file is <keys_dir>/<name>.pub).
        keys_dir: Folder of the public keys the board trusts (default: the package's).
    """
    from leakbench.leaderboard.signing import KEYS, generate_key

    identity, public = generate_key(private_key, name, Path(keys_dir) if keys_dir else KEYS)
    print(f"key {identity}: private {private_key}, public {public}")
    return 0


@command("leaderboard render")
def render_command(
    *,
    entries_dir: str | None = None,
    tracks_dir: str | None = None,
    keys_dir: str | None = None,
    out_dir: str | None = None,
) -> int:
    """Write Markdown and CSV tables per track.

    Args:
        entries_dir: Folder of the entries (default: the leaderboard's).
        tracks_dir: Folder of the track files (default: the package's).
        keys_dir: Folder of the public keys the board trusts (default: the package's).
        out_dir: Folder of the tables (default: the leaderboard's ``tables``).
    """
    from leakbench.leaderboard.board import render
    from leakbench.leaderboard.entry import LEADERBOARDS
    from leakbench.results import atomic_write_text

    entries, tracks = _folders(entries_dir, tracks_dir)
    out = Path(out_dir) if out_dir else LEADERBOARDS / "tables"
    keys = Path(keys_dir) if keys_dir else None
    for filename, text in render(entries, tracks, keys).items():
        atomic_write_text(out / filename, text)
        print(f"wrote {out / filename}")
    return 0


@command("leaderboard build")
def build_command(
    *,
    entries_dir: str | None = None,
    tracks_dir: str | None = None,
    keys_dir: str | None = None,
    out_dir: str | None = None,
    defense_entries_dir: str | None = None,
    defense_tracks_dir: str | None = None,
) -> int:
    """Render the static web leaderboard.

    Args:
        entries_dir: Folder of the entries (default: the leaderboard's).
        tracks_dir: Folder of the track files (default: the package's).
        keys_dir: Folder of the public keys the board trusts (default: the package's).
        out_dir: Folder of the site (default: the leaderboard's ``site``).
        defense_entries_dir: Folder of the defense entries (default: defense-entries beside
            the entries folder).
        defense_tracks_dir: Folder of the defense track files (default: the package's).
    """
    from leakbench.leaderboard.entry import LEADERBOARDS
    from leakbench.leaderboard.site import build_site

    entries, tracks = _folders(entries_dir, tracks_dir)
    out = Path(out_dir) if out_dir else LEADERBOARDS / "site"
    from leakbench.leaderboard.defense_entry import DEFENSE_TRACKS

    files = build_site(
        entries,
        out,
        tracks,
        Path(keys_dir) if keys_dir else None,
        Path(defense_entries_dir) if defense_entries_dir else None,
        Path(defense_tracks_dir) if defense_tracks_dir else DEFENSE_TRACKS,
    )
    print(f"wrote {len(files)} files; open {out / 'index.html'}")
    return 0


@command("leaderboard lookup-bound")
def lookup_bound_command(
    tracks: list[str], *, trials: int = 200, seed: int = 0, tracks_dir: str | None = None
) -> int:
    """Measure what the best lookup of the public dataset scores against a track's secretly
    transformed samples: the nearest public image (flips, shifts, least-squares gain, chosen
    with the truth) and the transform's noise floor; prints the figures, writes nothing.

    Args:
        tracks: Track name(s).
        trials: Transformed samples per track.
        seed: Seed of the sample draw and of the transform.
        tracks_dir: Folder of the track files (default: the package's).
    """
    from leakbench.leaderboard.entry import load_track
    from leakbench.leaderboard.lookup import measure, report

    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    _, folder = _folders(None, tracks_dir)
    loaded = [load_track(name, folder) for name in tracks]  # an unknown name fails before work
    for track in loaded:
        figures = measure(track, trials, seed)
        print("\n".join(report(figures, seed)))
        bound = figures.bound(trials, seed)
        print(f"  verification.lookup_bound: {json.dumps(bound)}", flush=True)
    return 0


@command("leaderboard figures")
def figures_command(
    tracks: list[str] | None = None,
    *,
    exact_psnr: float = 100.0,
    entries_dir: str | None = None,
    tracks_dir: str | None = None,
    keys_dir: str | None = None,
) -> int:
    """Print each committed entry's figures from its records, the run's next to the
    verification's, with the figure its method expects and the figures its paper reports.

    Exit 0 when every entry was read, 2 when one was refused (it is named; the others are
    still shown).

    Args:
        tracks: Track name(s) (default: every track that has entries).
        exact_psnr: The PSNR (dB) at which an image counts as exactly recovered.
        entries_dir: Folder of the entries (default: the leaderboard's).
        tracks_dir: Folder of the track files (default: the package's).
        keys_dir: Folder of the public keys the board trusts (default: the package's).
    """
    from leakbench.leaderboard.entry import load_track
    from leakbench.leaderboard.entry_figures import track_report

    entries, folder = _folders(entries_dir, tracks_dir)
    if not tracks:
        tracks = sorted(p.name for p in entries.iterdir() if p.is_dir()) if entries.is_dir() else []
    for name in tracks:
        load_track(name, folder)  # an unknown name fails before any work
    keys = Path(keys_dir) if keys_dir else None
    refused = 0
    for name in tracks:
        lines, refusals = track_report(name, entries, folder, keys, exact_psnr=exact_psnr)
        print("\n".join(lines), flush=True)
        for refusal in refusals:
            print(f"leakbench: error: {refusal}", file=sys.stderr)
        refused += len(refusals)
    return 2 if refused else 0
