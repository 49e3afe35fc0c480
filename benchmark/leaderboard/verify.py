"""Re-verification of a leaderboard entry on trials its submitter never saw.

Every track fixes a public dataset and a public seed, so a submitted run proves little: an
attack can memorise which samples each trial draws, or enumerate the public dataset and keep
the image whose gradient matches best. ``leakbench leaderboard verify ENTRY`` therefore re-runs
the entry's attack, isolated in worker processes, on the same track with

* a secret sample seed (``secrets.randbits(128)``: too many to enumerate), so the trial plan is
  one nobody has seen, and
* the track's *private transform* with a second secret seed (``verification.private_transform``
  in the track: a small shift, a flip, a brightness gain per sample), so the batch the client
  trains on is in no list the attack could search.

While the run goes, both seeds exist only in this process: ``config.yaml`` holds a SHA-256
commitment to each (``runner.run(secret_keys=...)``). They are revealed in the verification block
after the run, so anyone can check them against the commitments and re-run the verification.

**The tolerance** (``verification.tolerance`` of the track) concerns the track's ranking statistic
(e.g. ``psnr.median``). Per-sample values are capped at ``ceiling`` first (beyond ~60 dB PSNR a
reconstruction is exact and the rest is float noise that differs from image to image). A
bootstrap over the verification trials (``resamples`` draws of trials with replacement, seeded
from the revealed seed, so the figures can be recomputed) gives a ``confidence`` interval of the
statistic. The check is one-sided, in the direction that would lift the entry's rank: an attack
entry fails when its claim lies above the interval's upper end plus ``margin``; a defense entry
fails when its claim lies below the lower end minus ``margin``. Claiming less than one achieves
only costs the submitter, so it is not a failure.

The block also records the hash of the entry as verified; an entry edited afterwards is refused
(:func:`check_block`), and so is a block whose figures do not follow from its shipped records.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import leakbench
from leakbench.leaderboard.entry import (
    TRACKS,
    EntryError,
    atomic_write_text,
    cell_of,
    cell_records,
    content_sha256,
    load_entry,
    load_track,
    read_records,
    records_text,
    sha256_file,
    sibling,
    validate_entry,
)
from leakbench.results import atomic_write_bytes

VERIFICATION_RECORDS = ".verification.jsonl"
VERIFICATION_GRID = ".verification.png"
# Keeps the bootstrap's random stream apart from every stream the run draws from its seed.
BOOTSTRAP_STREAM = 0xB007_57A9
# Per-sample metrics where a larger value means more leakage.
LEAKIER_WHEN_HIGHER = {"psnr": True, "psnr_scale_aligned": True, "ssim": True, "mse": False}
SECRET_KEYS = ("seed", "private_transform")


class AttackNotInstalled(EntryError):
    """The entry's attack is not registered here; the message names what to install."""


def verification_settings(track: Mapping[str, Any]) -> dict[str, Any]:
    """The track's ``verification`` block, checked; a track without one cannot verify."""
    block = track["track"].get("verification")
    if not block:
        raise EntryError(f"track {track['track']['name']!r} declares no verification")
    missing = {"trials", "private_transform", "tolerance"} - set(block)
    if missing:
        raise EntryError(f"the verification block of the track lacks {', '.join(sorted(missing))}")
    return block


def higher_ranks_first(kind: str, statistic: str) -> bool:
    """Whether a larger value of ``statistic`` ranks an entry higher on a track of ``kind``:
    attack tracks rank more leakage first, defense tracks less."""
    metric = statistic.split(".")[0]
    if metric not in LEAKIER_WHEN_HIGHER:
        raise EntryError(
            f"ranking statistic {statistic!r}: the metric must be one of "
            f"{', '.join(sorted(LEAKIER_WHEN_HIGHER))}"
        )
    return LEAKIER_WHEN_HIGHER[metric] == (kind == "attack")


def _statistic(values: np.ndarray, stat: str, metric: str) -> Any:
    """The statistic over the last axis: a number of a vector, one per row of a matrix."""
    if stat == "median":
        return np.median(values, axis=-1)
    if stat == "mean":
        return np.mean(values, axis=-1)
    if stat == "worst":
        return np.min(values, axis=-1) if LEAKIER_WHEN_HIGHER[metric] else np.max(values, axis=-1)
    raise EntryError(f"unknown statistic {stat!r}; use median, mean or worst")


def _capped(value: float, ceiling: float | None, metric: str) -> float:
    if ceiling is None:
        return value
    return min(value, ceiling) if LEAKIER_WHEN_HIGHER[metric] else max(value, ceiling)


def figures(
    records: Sequence[Mapping[str, Any]],
    claimed: float,
    statistic: str,
    tolerance: Mapping[str, Any],
    kind: str,
    seed: int,
) -> dict[str, Any]:
    """The verified statistic, its bootstrap interval, and whether ``claimed`` passes."""
    metric, stat = statistic.split(".")
    ceiling = tolerance.get("ceiling")
    per_trial = [
        np.array(
            [
                _capped(float(s[metric]), ceiling, metric)
                for s in r["metrics"]["samples"]
                if s.get(metric) is not None
            ]
        )
        for r in records
    ]
    point = float(_statistic(np.concatenate(per_trial), stat, metric))
    rng = np.random.default_rng(np.random.SeedSequence([seed, BOOTSTRAP_STREAM]))
    # Every resample's trials at once (the same draws as one resample after the other).
    picks = rng.integers(0, len(per_trial), (int(tolerance["resamples"]), len(per_trial)))
    if len({len(values) for values in per_trial}) == 1:  # as many samples in every trial
        draws = _statistic(np.stack(per_trial)[picks].reshape(len(picks), -1), stat, metric)
    else:
        draws = [
            _statistic(np.concatenate([per_trial[i] for i in row]), stat, metric) for row in picks
        ]
    alpha = 1 - float(tolerance["confidence"])
    low, high = (float(q) for q in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
    claim = _capped(claimed, ceiling, metric)
    margin = float(tolerance["margin"])
    if higher_ranks_first(kind, statistic):
        passed = claim <= high + margin
        bound = f"the upper end {high:.2f} + margin {margin:g}"
        relation = "at most" if passed else "above"
    else:
        passed = claim >= low - margin
        bound = f"the lower end {low:.2f} - margin {margin:g}"
        relation = "at least" if passed else "below"
    capped = "" if claim == claimed else f" (capped at {ceiling:g})"
    reason = (
        f"claimed {statistic} {claimed:.2f}{capped} is {relation} {bound} of the "
        f"{float(tolerance['confidence']):.0%} bootstrap interval [{low:.2f}, {high:.2f}] of "
        f"{len(records)} unseen trials (verified {point:.2f})"
    )
    return {
        "statistic": statistic,
        "claimed": claimed,
        "verified": point,
        "interval": [low, high],
        "passed": passed,
        "reason": reason,
    }


def _commitment(value: Any) -> str:
    # The commitment runner.public_config writes for a secret key.
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def check_block(entry: Mapping[str, Any], path: Path) -> None:
    """Refuse a verification block that does not follow from what the entry ships."""
    block = entry["verification"]
    if content_sha256(entry) != block["entry_sha256"]:
        raise EntryError("it was edited after verification (entry_sha256 differs)")
    transform = {"seed": block["seeds"]["private_transform"], **block["private_transform"]}
    if block["commitments"] != {
        "seed": _commitment(block["seeds"]["seed"]),
        "private_transform": _commitment(transform),
    }:
        raise EntryError("its verification seeds do not match the commitments of that run")
    records_path = sibling(path, VERIFICATION_RECORDS)
    if not records_path.is_file() or sha256_file(records_path) != block["records_sha256"]:
        raise EntryError(f"its verification records ({records_path.name}) are missing or changed")
    recomputed = figures(
        read_records(records_path),
        block["claimed"],
        block["statistic"],
        block["tolerance"],
        entry["kind"],
        block["seeds"]["seed"],
    )
    stored = {key: block[key] for key in recomputed}
    if json.loads(json.dumps(recomputed)) != stored or block["claimed"] != _claim(entry, block):
        raise EntryError("its verification figures do not follow from its verification records")


def _claim(entry: Mapping[str, Any], block: Mapping[str, Any]) -> float:
    metric, stat = block["statistic"].split(".")
    value = entry["results"][metric][stat]
    if value is None:
        raise EntryError(f"the entry claims no {block['statistic']}")
    return float(value)


def require_attack(entry: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the distribution, an attack that is not installed here."""
    from leakbench.registry import ATTACKS

    name = entry["attack"]["name"]
    if name in ATTACKS:
        return
    dist = entry["attack"].get("distribution")
    if dist:
        raise AttackNotInstalled(
            f"attack {name!r} is not installed: install the distribution {dist['name']} "
            f"{dist['version']} (pip install '{dist['name']}=={dist['version']}')"
        )
    raise AttackNotInstalled(
        f"attack {name!r} is not installed, and the entry names no distribution providing it"
    )


def verification_config(
    entry: Mapping[str, Any],
    track: Mapping[str, Any],
    seeds: Mapping[str, int],
    output_dir: Path,
    run_name: str,
    threads: int | None,
) -> Any:
    """The run configuration of a verification: the track, the entry's free choices, the
    secret seeds, the verification's trials and its private transform."""
    from leakbench.config import RunConfig

    settings = verification_settings(track)
    values = dict(track)
    attack = entry["attack"]["name"]
    values.update(
        attacks=[attack],
        attack_options={attack: dict(entry["attack"]["options"])},
        batch_sizes=[entry["protocol"]["batch_size"]],
        trials=int(settings["trials"]),
        seed=seeds["seed"],
        private_transform={"seed": seeds["private_transform"], **settings["private_transform"]},
        output_dir=str(output_dir),
        run_name=run_name,
        logger="none",
        threads=threads,
        covariates=[],  # analyses of the batch do not enter the verdict; they only cost time
    )
    if entry["kind"] == "defense":
        values.update(defense=entry["defense"]["name"], defense_options=entry["defense"]["options"])
    return RunConfig.from_mapping(values, source="verification")


def verify_entry(
    path: str | Path,
    *,
    tracks_dir: Path = TRACKS,
    runs_dir: Path | None = None,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Verify the entry at ``path``, write the block into it and return the block."""
    from leakbench.runner import run

    path = Path(path)
    entry = load_entry(path, tracks_dir)  # a tampered entry is refused before anything runs
    require_attack(entry)
    track = load_track(entry["track"], tracks_dir)
    settings = verification_settings(track)
    tolerance = dict(settings["tolerance"])
    statistic = track["track"].get("ranking", "psnr.median")
    claimed = _claim(entry, {"statistic": statistic})
    seeds = {"seed": secrets.randbits(128), "private_transform": secrets.randbits(128)}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    keep = runs_dir is not None
    base = Path(runs_dir) if keep else Path(tempfile.mkdtemp(prefix="leakbench-verify-"))
    run_name = f"verify-{entry['track']}-{path.stem}-{stamp}"
    try:
        config = verification_config(entry, track, seeds, base, run_name, threads)
        echo(f"verifying {path} on {config.trials} unseen trials (secret seeds)")
        run(config, progress=False, echo=lambda _: None, secret_keys=SECRET_KEYS)
        run_dir = base / run_name
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        records = cell_records(run_dir, cell_of(entry), config.trials)
        text = records_text(records)
        atomic_write_text(sibling(path, VERIFICATION_RECORDS), text)
        grid = run_dir / "figures" / f"{cell_of(entry)}.png"
        if grid.is_file():
            atomic_write_bytes(sibling(path, VERIFICATION_GRID), grid.read_bytes())
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    result = figures(records, claimed, statistic, tolerance, entry["kind"], seeds["seed"])
    environment = saved["environment"]
    block = {
        "date": date.today().isoformat(),
        "leakbench": leakbench.__version__,
        "git_commit": environment.get("git_commit"),
        "seeds": seeds,
        "commitments": {key: saved[key] for key in SECRET_KEYS},
        "private_transform": dict(settings["private_transform"]),
        "trials": config.trials,
        "failed": sum(r["status"] != "ok" for r in records),
        "records_sha256": hashlib.sha256(text.encode()).hexdigest(),
        **result,
        "tolerance": tolerance,
        "entry_sha256": content_sha256(entry),
    }
    verified = {**entry, "verification": block}
    validate_entry(verified)
    check_block(verified, path)  # the block must pass the same check every later load makes
    atomic_write_text(path, json.dumps(verified, indent=2) + "\n")
    echo(("PASSED: " if block["passed"] else "FAILED: ") + block["reason"])
    return block
