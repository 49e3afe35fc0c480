"""Leaderboards: fixed protocols (tracks), one JSON file per entry, rendered tables.

A *track* is a run configuration with a ``track`` block (``leaderboards/tracks/<name>.yaml``)::

    track:
      name: lfw-subset-lenet-zhu-b1
      kind: attack              # attack: submitters choose the attack; defense: the defense
      ranking: psnr.median      # the metric the table is sorted by
      free: [attacks, attack_options]   # the only protocol keys a submission may change

Run it with ``leakbench run --config leaderboards/tracks/<name>.yaml --attack <yours>``, then
``leakbench leaderboard entry <run folder> --cell <cell>`` turns one cell of that run into an
entry (validated against ``leaderboards/entry.schema.json``; a run that changed the protocol is
refused), and ``leakbench leaderboard render`` writes one Markdown and one CSV table per track.
Attack tracks rank higher leakage first; defense tracks rank lower leakage first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from leakbench.results import atomic_write_text

SCHEMA_VERSION = 1
LEADERBOARDS = Path(__file__).resolve().parent.parent / "leaderboards"
# Keys that change where and how results are written, never what is measured.
BOOKKEEPING_KEYS = {
    "output_dir",
    "run_name",
    "logger",
    "wandb_project",
    "accelerator",
    "devices",
    "covariates",
}
PROTOCOL_KEYS = (
    "dataset",
    "dataset_options",
    "split",
    "model",
    "model_options",
    "model_seed",
    "client_mode",
    "trials",
    "seed",
    "grants",
    "budget",
    "dtype",
    "success_psnr",
)


def load_schema() -> dict[str, Any]:
    return json.loads((LEADERBOARDS / "entry.schema.json").read_text())


def validate_entry(entry: dict[str, Any]) -> None:
    try:
        jsonschema.validate(entry, load_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(top level)"
        raise ValueError(f"invalid leaderboard entry at {where}: {exc.message}") from None


def _track_file(name: str, tracks_dir: Path) -> Path:
    path = tracks_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in tracks_dir.glob("*.yaml"))
        raise ValueError(f"no track file {path}; known tracks: {', '.join(known) or 'none'}")
    return path


def check_protocol(run_config: dict[str, Any], track_config: dict[str, Any]) -> None:
    """Refuse a run whose configuration differs from its track outside the free keys."""
    from leakbench.config import RunConfig

    free = set(track_config["track"].get("free", [])) | BOOKKEEPING_KEYS | {"batch_sizes"}
    expected = RunConfig.from_mapping(dict(track_config)).to_dict()
    changed = sorted(
        key for key, value in expected.items() if key not in free and run_config.get(key) != value
    )
    if changed:
        raise ValueError(
            f"the run changed the protocol of track {track_config['track']['name']!r} "
            f"in: {', '.join(changed)}"
        )


def make_entry(
    run_dir: str | Path,
    cell: str,
    *,
    name: str | None = None,
    submitter: str | None = None,
    paper: str | None = None,
    tracks_dir: Path = LEADERBOARDS / "tracks",
) -> dict[str, Any]:
    """Build a leaderboard entry from one cell of a finished run."""
    run_dir = Path(run_dir)
    for required in ("config.yaml", "summary.json"):
        if not (run_dir / required).is_file():
            raise ValueError(f"{run_dir} is not a finished run: {required} is missing")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    if cell not in summary["cells"]:
        raise ValueError(f"no cell {cell!r} in {run_dir}; cells: {', '.join(summary['cells'])}")
    if not config.get("track"):
        raise ValueError(f"{run_dir} was not run from a track file; leaderboard entries need one")
    track_path = _track_file(config["track"]["name"], tracks_dir)
    track_config = yaml.safe_load(track_path.read_text())
    check_protocol(config, track_config)

    result = summary["cells"][cell]
    if result["batch_size"] not in track_config.get("batch_sizes", [result["batch_size"]]):
        raise ValueError(f"batch size {result['batch_size']} is not part of this track")
    attack = result["attack"]
    entry = {
        "schema_version": SCHEMA_VERSION,
        "track": config["track"]["name"],
        "track_sha256": hashlib.sha256(track_path.read_bytes()).hexdigest(),
        "kind": config["track"]["kind"],
        "name": name or (attack if config["track"]["kind"] == "attack" else result["defense"]),
        "attack": {"name": attack, "options": config["attack_options"].get(attack, {})},
        "defense": {"name": result["defense"], "options": config["defense_options"]},
        "protocol": {
            **{key: config[key] for key in PROTOCOL_KEYS},
            "batch_size": result["batch_size"],
        },
        "results": {
            key: result[key]
            for key in (
                "trials",
                "failed",
                "failure_rate",
                "images",
                "mse",
                "psnr",
                "ssim",
                "psnr_scale_aligned",
                "success_rate",
                "label_accuracy",
                "batch_size_accuracy",
                "time_s",
                "iterations",
            )
        },
        "environment": config["environment"],
        "submitter": submitter,
        "paper": paper,
        "date": date.today().isoformat(),
    }
    validate_entry(entry)
    return entry


def entry_path(entry: dict[str, Any], entries_dir: Path) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", entry["name"].lower()).strip("-")
    return entries_dir / entry["track"] / f"{slug}-b{entry['protocol']['batch_size']}.json"


def _metric(entry: dict[str, Any], dotted: str) -> float | None:
    value: Any = entry["results"]
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def render(entries_dir: Path, tracks_dir: Path = LEADERBOARDS / "tracks") -> dict[str, str]:
    """Markdown and CSV text per track: {"<track>.md": ..., "<track>.csv": ...}."""
    by_track: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(entries_dir.glob("*/*.json")):
        entry = json.loads(path.read_text())
        validate_entry(entry)
        by_track.setdefault(entry["track"], []).append(entry)
    tables: dict[str, str] = {}
    columns = [
        "rank",
        "name",
        "attack",
        "defense",
        "B",
        "PSNR median",
        "PSNR mean",
        "PSNR worst",
        "SSIM median",
        "success",
        "failed",
        "time median (s)",
    ]
    for track, entries in by_track.items():
        meta = yaml.safe_load(_track_file(track, tracks_dir).read_text())["track"]
        ranking = meta.get("ranking", "psnr.median")
        sign = -1.0 if meta["kind"] == "attack" else 1.0
        entries.sort(key=lambda e: sign * (_metric(e, ranking) or 0.0))
        rows = []
        for rank, e in enumerate(entries, start=1):
            r = e["results"]
            rows.append(
                [
                    rank,
                    e["name"],
                    e["attack"]["name"],
                    e["defense"]["name"],
                    e["protocol"]["batch_size"],
                    _round(r["psnr"]["median"]),
                    _round(r["psnr"]["mean"]),
                    _round(r["psnr"]["worst"]),
                    _round(r["ssim"]["median"], 3),
                    _round(r["success_rate"], 2),
                    f"{r['failed']}/{r['trials']}",
                    _round(r["time_s"]["median"], 3),
                ]
            )
        title = f"# {track}\n\n{meta.get('description', '').strip()}\n\nRanked by {ranking}.\n\n"
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        tables[f"{track}.md"] = title + "\n".join(lines) + "\n"
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        tables[f"{track}.csv"] = buffer.getvalue()
    return tables


def _round(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("leaderboard", help="build leaderboard entries and tables")
    sub = p.add_subparsers(dest="leaderboard_command", required=True)
    e = sub.add_parser("entry", help="turn one cell of a track run into an entry JSON")
    e.add_argument("run_dir")
    e.add_argument("--cell", required=True, help="e.g. dlg__none__b1 (see summary.json)")
    e.add_argument("--name", help="display name (default: the attack or defense)")
    e.add_argument("--submitter")
    e.add_argument("--paper", help="link to the paper or code")
    e.add_argument("--entries-dir", default=str(LEADERBOARDS / "entries"))
    e.add_argument("--tracks-dir", default=str(LEADERBOARDS / "tracks"))
    e.set_defaults(func=entry_command)
    r = sub.add_parser("render", help="write Markdown and CSV tables per track")
    r.add_argument("--entries-dir", default=str(LEADERBOARDS / "entries"))
    r.add_argument("--tracks-dir", default=str(LEADERBOARDS / "tracks"))
    r.add_argument("--out-dir", default=str(LEADERBOARDS / "tables"))
    r.set_defaults(func=render_command)


def entry_command(args: Any) -> int:
    entry = make_entry(
        args.run_dir,
        args.cell,
        name=args.name,
        submitter=args.submitter,
        paper=args.paper,
        tracks_dir=Path(args.tracks_dir),
    )
    path = entry_path(entry, Path(args.entries_dir))
    atomic_write_text(path, json.dumps(entry, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def render_command(args: Any) -> int:
    tables = render(Path(args.entries_dir), Path(args.tracks_dir))
    for filename, text in tables.items():
        atomic_write_text(Path(args.out_dir) / filename, text)
        print(f"wrote {Path(args.out_dir) / filename}")
    return 0
