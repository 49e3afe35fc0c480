"""Leaderboard entries: a finished track run becomes one schema-checked JSON file per cell.

An entry lives at ``entries/<track>/<name>-b<B>.json`` next to what it is made from:

    <name>-b<B>.json                  the entry: protocol, results, environment, provenance
    <name>-b<B>.records.jsonl         the cell's trial records, canonical JSON, in trial order
    <name>-b<B>.grid.png              ground truth next to reconstruction (the run's grid)
    <name>-b<B>.verification.jsonl    after ``leakbench leaderboard verify``: its records
    <name>-b<B>.verification.png      and its grid

**The records hash.** Each shipped record is one line of canonical JSON (sorted keys, no
spaces), in trial order, so the hash over the bytes of the records file and the hash over the
canonical records are the same number. Canonical rather than the run's own files because those
depend on how the run went, not on what it measured: a run over two processes splits its
records over two files in completion order, and a resumed run appends in another order. The
entry keeps two hashes:

* ``records.sha256`` covers every field, the measured ones (``MEASURED_FIELDS``: times, memory)
  included. It binds every number of the entry to its records: the results are recomputed from
  the records when an entry is loaded, so a number changed by hand is refused.
* ``records.outcome_sha256`` leaves the measured fields out. It is what two runs of one
  configuration on the same software share (for deterministic attacks), so a reviewer who
  re-runs the track with the entry's seed can compare one hash instead of diffing records.

An entry is refused when it fails the schema, names a track this leakbench does not ship, was
made under another version of the track file, has records that do not match its hash or its
results, or was edited after verification (see :mod:`leakbench.leaderboard.verify`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema

from leakbench.results import (
    RunDirectory,
    atomic_write_bytes,
    atomic_write_text,
    cell_key,
    parse_yaml,
)

SCHEMA_VERSION = 3
PACKAGE_DIR = Path(__file__).resolve().parent
# Package data: a pip-installed leakbench makes and checks entries without the repository.
SCHEMA_FILE = PACKAGE_DIR / "entry.schema.json"
TRACKS = PACKAGE_DIR / "tracks"
_REPOSITORY_BOARD = PACKAGE_DIR.parents[1] / "leaderboards"
# Where entries, tables and the site go: the repository's folder in a checkout, else the
# ``leaderboards`` folder of the current directory.
LEADERBOARDS = _REPOSITORY_BOARD if _REPOSITORY_BOARD.is_dir() else Path("leaderboards")

# Keys that change where and how results are written or how fast, never what is measured.
BOOKKEEPING_KEYS = {
    "output_dir",
    "run_name",
    "logger",
    "wandb_project",
    "wandb_group",  # W&B grouping of a sweep's runs
    "wandb_job_type",
    "accelerator",
    "devices",
    "covariates",
    "threads",
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
    "isolation",
)
RESULT_KEYS = (
    "trials",
    "failed",
    "timeouts",
    "failure_rate",
    "failure_reasons",
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
RECORDS_SUFFIX = ".records.jsonl"
GRID_SUFFIX = ".grid.png"


class EntryError(ValueError):
    """An entry or a submission that is refused, with the reason."""


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@functools.cache
def entry_validator() -> Any:
    """The schema's validator, the schema itself checked once per process (``jsonschema.validate``
    checks it on every call, most of the time a board of entries took to load)."""
    schema = load_schema()
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def validate_entry(entry: dict[str, Any]) -> None:
    """Raise :class:`EntryError` naming the first place where ``entry`` breaks the schema."""
    error = jsonschema.exceptions.best_match(entry_validator().iter_errors(entry))
    if error is not None:  # the error jsonschema.validate raises
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise EntryError(f"invalid leaderboard entry at {where}: {error.message}") from None


def track_file(name: str, tracks_dir: Path = TRACKS) -> Path:
    """The track file of ``name``; an unknown track is refused with the known ones."""
    path = Path(tracks_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(tracks_dir).glob("*.yaml"))
        raise EntryError(f"unknown track {name!r} (no {path}); known: {', '.join(known) or '-'}")
    return path


def load_track(name: str, tracks_dir: Path = TRACKS) -> dict[str, Any]:
    """The track's run configuration, its ``track`` block included."""
    return parse_yaml(track_file(name, tracks_dir).read_text())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_protocol(run_config: Mapping[str, Any], track_config: Mapping[str, Any]) -> None:
    """Refuse a run whose configuration differs from its track outside the free keys."""
    from leakbench.config import RunConfig

    free = set(track_config["track"].get("free", [])) | BOOKKEEPING_KEYS | {"batch_sizes"}
    expected = RunConfig.from_mapping(dict(track_config)).to_dict()
    changed = sorted(
        key for key, value in expected.items() if key not in free and run_config.get(key) != value
    )
    if changed:
        raise EntryError(
            f"the run changed the protocol of track {track_config['track']['name']!r} "
            f"in: {', '.join(changed)}"
        )


def canonical(record: Mapping[str, Any]) -> str:
    """One record as canonical JSON: sorted keys, no whitespace."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def records_text(records: Iterable[Mapping[str, Any]]) -> str:
    """The records file an entry ships: one canonical line per record, in trial order."""
    return "".join(canonical(r) + "\n" for r in sorted(records, key=lambda r: r["trial"]))


def outcome_sha256(records: Iterable[Mapping[str, Any]]) -> str:
    """Hash of the records without the fields that measure the machine."""
    from leakbench.protocol.records import MEASURED_FIELDS

    stripped = [{k: v for k, v in r.items() if k not in MEASURED_FIELDS} for r in records]
    return hashlib.sha256(records_text(stripped).encode()).hexdigest()


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell_records(run_dir: Path, cell: str, trials: int) -> list[dict[str, Any]]:
    """The complete records of one cell of a run, in trial order; an incomplete cell is
    refused (an entry never stands on a subset of the track's trials)."""
    records = sorted(
        (r for r in RunDirectory(run_dir).records() if r["cell"] == cell), key=lambda r: r["trial"]
    )
    if [r["trial"] for r in records] != list(range(trials)):
        raise EntryError(
            f"{run_dir}: cell {cell} holds {len(records)} of its {trials} trials; finish it with "
            f"leakbench run --resume {run_dir}"
        )
    return records


def result_fields(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry's ``results``, computed from its records by the canonical aggregate."""
    from leakbench.metrics import aggregate

    summary = aggregate(records)
    return json.loads(json.dumps({key: summary[key] for key in RESULT_KEYS}))


def attack_fields(config: Mapping[str, Any], attack: str) -> dict[str, Any]:
    """The entry's ``attack``: the options given, the hyperparameters as the attack's jobs
    rebuilt it, and the code that ran (distribution, version, a hash of its files), from what
    the run recorded (``attacks_run`` in config.yaml)."""
    ran = (config.get("attacks_run") or {}).get(attack)
    if ran is None:
        raise EntryError(
            f"the run recorded no hyperparameters and code for attack {attack!r} "
            "(made by an older leakbench): run the track again"
        )
    code = dict(ran["code"])
    return {
        "name": attack,
        "options": config["attack_options"].get(attack, {}),
        "hparams": ran["hparams"],
        "code": code,
        "distribution": (
            {"name": code["distribution"], "version": code["version"]}
            if code.get("distribution")
            else None
        ),
    }


def wandb_run(run_dir: Path, project: str) -> dict[str, Any] | None:
    """The online W&B run the run logged to, from the folder W&B wrote: ``run-<stamp>-<id>``.
    An offline run (``offline-run-...``) gives None: its id names nothing anyone can open."""
    folders = sorted((run_dir / "wandb").glob("run-*-*")) if (run_dir / "wandb").is_dir() else []
    folders = [f for f in folders if f.is_dir() and not f.is_symlink()]
    if not folders:
        return None
    last = folders[-1].name
    return {
        "id": last.rsplit("-", 1)[-1],
        "project": project,
        "mode": "online",
    }


def make_entry(
    run_dir: str | Path,
    cell: str,
    *,
    name: str | None = None,
    submitter: str | None = None,
    paper: str | None = None,
    tracks_dir: Path = TRACKS,
) -> dict[str, Any]:
    """Build a leaderboard entry from one cell of a finished track run."""
    run_dir = Path(run_dir)
    for required in ("config.yaml", "summary.json"):
        if not (run_dir / required).is_file():
            raise EntryError(f"{run_dir} is not a finished run: {required} is missing")
    config = parse_yaml((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    if cell not in summary["cells"]:
        raise EntryError(f"no cell {cell!r} in {run_dir}; cells: {', '.join(summary['cells'])}")
    if not config.get("track"):
        raise EntryError(f"{run_dir} was not run from a track file; leaderboard entries need one")
    if config.get("private_transform") is not None:
        raise EntryError(f"{run_dir} is a verification run, not a submission")
    track_path = track_file(config["track"]["name"], tracks_dir)
    track_config = parse_yaml(track_path.read_text())
    check_protocol(config, track_config)

    result = summary["cells"][cell]
    if result["batch_size"] not in track_config.get("batch_sizes", [result["batch_size"]]):
        raise EntryError(f"batch size {result['batch_size']} is not part of this track")
    attack = result["attack"]
    records = cell_records(run_dir, cell, config["trials"])
    text = records_text(records)
    entry = {
        "schema_version": SCHEMA_VERSION,
        "track": config["track"]["name"],
        "track_sha256": sha256_file(track_path),
        "kind": config["track"]["kind"],
        "name": name or (attack if config["track"]["kind"] == "attack" else result["defense"]),
        "attack": attack_fields(config, attack),
        "defense": {"name": result["defense"], "options": config["defense_options"]},
        "protocol": {
            **{key: config[key] for key in PROTOCOL_KEYS},
            "batch_size": result["batch_size"],
        },
        "results": result_fields(records),
        "records": {
            "trials": len(records),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "outcome_sha256": outcome_sha256(records),
        },
        "environment": config["environment"],
        "datamodule": config.get("datamodule"),
        "wandb": wandb_run(run_dir, config.get("wandb_project", "leakbench")),
        "submitter": submitter,
        "paper": paper,
        "threat_model": {
            "attack": config["attacks_run"][attack].get("threat_letter"),
            "track": config["track"].get("threat_model"),
        },
        "date": date.today().isoformat(),
    }
    validate_entry(entry)
    return entry


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def entry_path(entry: Mapping[str, Any], entries_dir: Path) -> Path:
    stem = f"{slug(entry['name'])}-b{entry['protocol']['batch_size']}"
    return Path(entries_dir) / entry["track"] / f"{stem}.json"


def sibling(path: Path, suffix: str) -> Path:
    """A file next to entry ``path``: ``<stem><suffix>``."""
    return path.with_name(path.stem + suffix)


def write_entry(
    run_dir: str | Path,
    cell: str,
    entries_dir: Path,
    *,
    replace: bool = False,
    **details: Any,
) -> Path:
    """Make the entry of one cell and write it with its records and grid; returns its path."""
    entry = make_entry(run_dir, cell, **details)
    path = entry_path(entry, entries_dir)
    if path.exists() and not replace:
        raise EntryError(f"{path} exists; choose another --name, or pass --replace")
    records = cell_records(Path(run_dir), cell, entry["protocol"]["trials"])
    atomic_write_text(sibling(path, RECORDS_SUFFIX), records_text(records))
    grid = Path(run_dir) / "figures" / f"{cell}.png"
    for stale in (GRID_SUFFIX, ".verification.jsonl", ".verification.png"):
        sibling(path, stale).unlink(missing_ok=True)
    if grid.is_file():
        atomic_write_bytes(sibling(path, GRID_SUFFIX), grid.read_bytes())
    atomic_write_text(path, json.dumps(entry, indent=2) + "\n")
    return path


def run_cells(run_dir: Path) -> list[str]:
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        raise EntryError(f"{run_dir} is not a finished run: summary.json is missing")
    return list(json.loads(summary.read_text())["cells"])


def _differences(claimed: Any, actual: Any, where: str = "results") -> list[str]:
    """Dotted paths at which two JSON values differ (floats up to rounding)."""
    if isinstance(claimed, dict) and isinstance(actual, dict):
        keys = sorted(set(claimed) | set(actual))
        return [
            d for k in keys for d in _differences(claimed.get(k), actual.get(k), f"{where}.{k}")
        ]
    if isinstance(claimed, float | int) and isinstance(actual, float | int):
        both_nan = math.isnan(claimed) and math.isnan(actual)  # a stat of no values
        if not isinstance(claimed, bool) and (
            both_nan or math.isclose(claimed, actual, rel_tol=1e-9)
        ):
            return []
    return [] if claimed == actual else [where]


def without_verification(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "verification"}


def content_sha256(entry: Mapping[str, Any]) -> str:
    """Hash of the entry as verified: canonical JSON without its verification block."""
    return hashlib.sha256(canonical(without_verification(entry)).encode()).hexdigest()


def load_entry(
    path: str | Path, tracks_dir: Path = TRACKS, keys_dir: Path | None = None
) -> dict[str, Any]:
    """Read an entry and refuse it, with the reason, unless it is intact (see module doc); a
    verification must be signed by a key of ``keys_dir`` (default: the board's)."""
    path = Path(path)
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EntryError(f"{path}: not a readable entry: {exc}") from None
    try:
        _check_entry(entry, path, Path(tracks_dir), keys_dir)
    except EntryError as exc:
        raise EntryError(f"{path}: refused: {exc}") from None
    return entry


def _check_entry(
    entry: dict[str, Any], path: Path, tracks_dir: Path, keys_dir: Path | None
) -> None:
    validate_entry(entry)
    track = track_file(entry["track"], tracks_dir)
    track_sha256 = sha256_file(track)
    if track_sha256 != entry["track_sha256"]:
        raise EntryError(
            f"it was made under another version of track {entry['track']!r} "
            "(track_sha256 differs from the track file); run the track again"
        )
    expected = _track_protocol(str(track), track_sha256)
    differing = [k for k in PROTOCOL_KEYS if entry["protocol"][k] != expected[k]]
    if entry["protocol"]["batch_size"] not in expected["batch_sizes"]:
        differing.append("batch_size")
    if differing:
        raise EntryError(f"its protocol differs from the track in: {', '.join(differing)}")
    records_path, records = shipped_records(entry, path)
    if len(records) != entry["protocol"]["trials"] or records_text(records) != (
        records_path.read_text()
    ):
        raise EntryError(f"{records_path.name} is not the canonical records of every trial")
    cell = cell_of(entry)
    strays = sorted({r["cell"] for r in records} - {cell})
    if strays:
        raise EntryError(f"its records belong to {', '.join(strays)}, not to its cell {cell}")
    from leakbench.protocol.records import trial_seed

    if any(r["seed"] != trial_seed(entry["protocol"]["seed"], r["trial"]) for r in records):
        raise EntryError("its records were not drawn with the seed of its protocol")
    changed = _differences(entry["results"], result_fields(records))
    if changed:
        raise EntryError(f"its results differ from its records in: {', '.join(changed)}")
    if "verification" in entry:
        from leakbench.leaderboard.verify import check_block

        check_block(entry, path, keys_dir)


@functools.lru_cache(maxsize=64)
def _track_protocol(track: str, sha256: str) -> dict[str, Any]:
    """The run configuration of track file ``track`` with its defaults, once per version of the
    file (``sha256``): a board holds many entries of each track. Callers only read it."""
    from leakbench.config import RunConfig

    return RunConfig.from_mapping(parse_yaml(Path(track).read_text())).to_dict()


def shipped_records(entry: Mapping[str, Any], path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The records file next to entry ``path`` and its records; refused when it is missing or
    its bytes are not the ones ``records.sha256`` names."""
    records_path = sibling(path, RECORDS_SUFFIX)
    if not records_path.is_file():
        raise EntryError(f"its records file {records_path.name} is missing")
    if sha256_file(records_path) != entry["records"]["sha256"]:
        raise EntryError(f"its records hash does not match {records_path.name}")
    return records_path, read_records(records_path)


def cell_of(entry: Mapping[str, Any]) -> str:
    protocol = entry["protocol"]
    return cell_key(entry["attack"]["name"], entry["defense"]["name"], protocol["batch_size"])
