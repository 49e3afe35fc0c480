"""Verification: the board re-measures an entry on data no submitter holds, and signs it.

Every track fixes a public dataset and a public seed, so a submitted run proves little: an
attack can memorise which samples each trial draws, or enumerate the public dataset and keep
the image whose gradient matches best. ``leakbench leaderboard verify ENTRY --key KEY`` (a
maintainer's command) therefore re-runs the entry's attack, exactly as it ran (its recorded
hyperparameters and the code whose hash the entry holds), in the attack sandbox, on the track
with

* a secret sample seed (``secrets.randbits(128)``: too many to enumerate), so the trial plan is
  one nobody has seen; where the maintainers hold private data of the track's distribution
  (``$LEAKBENCH_PRIVATE_DATA``), the samples come from there;
* the track's *private transform* with a second secret seed (``verification.private_transform``:
  continuous changes of every sample), so the batch the client trains on is in no list an attack
  could search; the track's ``lookup_bound`` says how far the best lookup gets.

While the run goes, both seeds exist only in this process: ``config.yaml`` holds a SHA-256
commitment to each (``runner.run(secret_keys=...)``). They are revealed in the verification block
afterwards, so anyone can check them against the commitments and re-run the verification.

**The figures** come from the records this process made, in memory (never from a file an
attack could have reached). Per-sample values are capped at the track's ``ceiling`` (beyond
~60 dB PSNR a reconstruction is exact and the rest is float noise). A bootstrap over the trials
(``resamples`` draws with replacement, seeded from the revealed seed, so the figures can be
recomputed) gives a ``confidence`` interval of the ranking statistic and of the success rate.
The check is one-sided, in the direction that would lift the entry's rank: an attack entry fails
when its claim (capped) lies above the statistic's upper end plus ``margin``, or its claimed
success rate above the success rate's upper end plus ``success_margin``; a defense entry in the
mirrored way, on its per-sample worst case taken over the null reconstruction on both sides
(:func:`leakbench.leaderboard.defense_entry.defense_figures`: the transform lifts the PSNR of
uninformative reconstructions, which a raw comparison read as leakage). Claiming less than one
achieves only costs the submitter. The board ranks a verified entry by the verification's own
figure, never by the claim. ``--restate`` recomputes a verified defense entry's figures from its
shipped verification records under these rules and signs them again, re-running nothing.

**The block** (date, versions, the seeds and their commitments, the data and transform, the
sandbox, the figures, the verdict, the hashes of the entry and of the verification's records,
and the hash of the attack's code) is signed with the board's key
(:mod:`leakbench.leaderboard.signing`). An entry edited after verification, a block that was
not signed by a key the board trusts, or one whose figures do not follow from its shipped
records, is refused whenever the entry is loaded.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import leakbench
from leakbench.leaderboard.entry import (
    TRACKS,
    EntryError,
    atomic_write_text,
    cell_of,
    content_sha256,
    load_entry,
    load_track,
    read_records,
    records_text,
    sha256_file,
    shipped_records,
    sibling,
    validate_entry,
)
from leakbench.metrics import bootstrap_medians
from leakbench.results import atomic_write_bytes

VERIFICATION_RECORDS = ".verification.jsonl"
VERIFICATION_GRID = ".verification.png"
# Keeps the bootstrap's random stream apart from every stream the run draws from its seed.
BOOTSTRAP_STREAM = 0xB007_57A9
# Per-sample metrics where a larger value means more leakage.
LEAKIER_WHEN_HIGHER = {"psnr": True, "psnr_scale_aligned": True, "ssim": True, "mse": False}
SECRET_KEYS = ("seed", "private_transform")
MIN_TRIALS = 10  # fewer, and one exact trial in three passes a claim of exactness
DEFAULT_SUCCESS_MARGIN = 0.1


class AttackNotInstalled(EntryError):
    """The entry's attack (or a defense entry's defense) is not installed here as it ran; the
    message names what to install."""


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


def _statistic(values: np.ndarray, stat: str, metric: str) -> float:
    if stat == "median":
        return float(np.median(values))
    if stat == "mean":
        return float(np.mean(values))
    if stat == "worst":
        return float(np.min(values) if LEAKIER_WHEN_HIGHER[metric] else np.max(values))
    raise EntryError(f"unknown statistic {stat!r}; use median, mean or worst")


def _row_statistics(values: np.ndarray, stat: str, metric: str) -> list[float]:
    """:func:`_statistic` of every row of a matrix, in one call."""
    if stat == "median":
        rows = np.median(values, axis=1)
    elif stat == "mean":
        rows = np.mean(values, axis=1)
    elif stat == "worst":
        rows = np.min(values, axis=1) if LEAKIER_WHEN_HIGHER[metric] else np.max(values, axis=1)
    else:
        raise EntryError(f"unknown statistic {stat!r}; use median, mean or worst")
    return rows.tolist()


def capped(value: float, ceiling: float | None, metric: str) -> float:
    """``value`` capped at the track's ceiling (beyond it, reconstructions are exact)."""
    if ceiling is None:
        return value
    return min(value, ceiling) if LEAKIER_WHEN_HIGHER[metric] else max(value, ceiling)


def _interval(draws: Sequence[float], confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def figures(
    records: Sequence[Mapping[str, Any]],
    claimed: float,
    claimed_success: float | None,
    statistic: str,
    tolerance: Mapping[str, Any],
    kind: str,
    seed: int,
    label: str | None = None,
) -> dict[str, Any]:
    """The verified statistic, success rate and worst case, their bootstrap intervals, and
    whether the claim passes (see the module docstring); ``label`` names the statistic in the
    reason (default: ``statistic``)."""
    metric, stat = statistic.split(".")
    ceiling = tolerance.get("ceiling")
    per_trial = [
        np.array(
            [
                capped(float(s[metric]), ceiling, metric)
                for s in r["metrics"]["samples"]
                if s.get(metric) is not None
            ]
        )
        for r in records
    ]
    hits = [np.array([bool(s.get("success")) for s in r["metrics"]["samples"]]) for r in records]
    everything = np.concatenate(per_trial)
    point = _statistic(everything, stat, metric)
    rng = np.random.default_rng(np.random.SeedSequence([seed, BOOTSTRAP_STREAM]))
    # Every resample's trials at once: the same draws as one resample after the other.
    picks = rng.integers(0, len(per_trial), (int(tolerance["resamples"]), len(per_trial)))
    if len({len(v) for v in per_trial}) == 1 and len({len(h) for h in hits}) == 1:
        trials = np.stack(per_trial)
        if stat == "median" and np.isfinite(trials).all():
            draws = bootstrap_medians(trials, picks).tolist()
        else:
            draws = _row_statistics(trials[picks].reshape(len(picks), -1), stat, metric)
        success_draws = np.stack(hits)[picks].reshape(len(picks), -1).mean(axis=1).tolist()
    else:  # trials of different sizes
        draws = [
            _statistic(np.concatenate([per_trial[i] for i in row]), stat, metric) for row in picks
        ]
        success_draws = [float(np.mean(np.concatenate([hits[i] for i in row]))) for row in picks]
    confidence = float(tolerance["confidence"])
    low, high = _interval(draws, confidence)
    success_low, success_high = _interval(success_draws, confidence)
    success = float(np.mean(np.concatenate(hits)))
    claim = capped(claimed, ceiling, metric)
    margin = float(tolerance["margin"])
    success_margin = float(tolerance.get("success_margin", DEFAULT_SUCCESS_MARGIN))
    if higher_ranks_first(kind, statistic):
        passed = claim <= high + margin
        bound = f"the upper end {high:.2f} + margin {margin:g}"
        relation = "at most" if passed else "above"
        success_ok = claimed_success is None or claimed_success <= success_high + success_margin
    else:
        passed = claim >= low - margin
        bound = f"the lower end {low:.2f} - margin {margin:g}"
        relation = "at least" if passed else "below"
        success_ok = claimed_success is None or claimed_success >= success_low - success_margin
    note = "" if claim == claimed else f" (capped at {ceiling:g})"
    reason = (
        f"claimed {label or statistic} {claimed:.2f}{note} is {relation} {bound} of the "
        f"{confidence:.0%} bootstrap interval [{low:.2f}, {high:.2f}] of {len(records)} "
        f"unseen trials (verified {point:.2f})"
    )
    if not success_ok:
        reason += (
            f"; and the claimed success rate {claimed_success:.2f} is outside the verified "
            f"interval [{success_low:.2f}, {success_high:.2f}] give or take {success_margin:g}"
        )
    return {
        "statistic": statistic,
        "claimed": claimed,
        "verified": point,
        "interval": [low, high],
        "success_rate": success,
        "success_interval": [success_low, success_high],
        "worst": _statistic(everything, "worst", metric),
        "passed": bool(passed and success_ok),
        "reason": reason,
    }


def commitment(value: Any) -> str:
    """The commitment the run writes for a secret value (``runner.public_config``)."""
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _claims(entry: Mapping[str, Any], statistic: str) -> tuple[float, float | None]:
    metric, stat = statistic.split(".")
    value = entry["results"][metric][stat]
    if value is None:
        raise EntryError(f"the entry claims no {statistic}")
    success = entry["results"].get("success_rate")
    return float(value), None if success is None else float(success)


def check_block(
    entry: Mapping[str, Any], path: Path, keys_dir: Path | None = None, *, figures_too: bool = True
) -> None:
    """Refuse a verification block that the board did not sign, that does not belong to this
    entry, or (``figures_too``) whose figures do not follow from its shipped records (an attack
    entry's; a defense entry's per-sample worst case and the claim's from the entry's records)."""
    from leakbench.leaderboard.defense_entry import (
        defense_claims,
        defense_figures,
        is_defense_entry,
    )
    from leakbench.leaderboard.signing import KEYS, check_signature

    block = entry["verification"]
    check_signature(block, keys_dir or KEYS)
    if content_sha256(entry) != block["entry_sha256"]:
        raise EntryError("it was edited after verification (entry_sha256 differs)")
    defense = is_defense_entry(entry)
    if defense and block["defense_code"] != entry["defense"]["code"]:
        raise EntryError("its verification ran other defense code than the entry names")
    if not defense and block["attack_code"] != entry["attack"]["code"]:
        raise EntryError("its verification ran other attack code than the entry names")
    transform = {"seed": block["seeds"]["private_transform"], **block["private_transform"]}
    if block["commitments"] != {
        "seed": commitment(block["seeds"]["seed"]),
        "private_transform": commitment(transform),
    }:
        raise EntryError("its verification seeds do not match the commitments of that run")
    records_path = sibling(path, VERIFICATION_RECORDS)
    if not records_path.is_file() or sha256_file(records_path) != block["records_sha256"]:
        raise EntryError(f"its verification records ({records_path.name}) are missing or changed")
    if not figures_too:
        return
    records = read_records(records_path)
    if defense:
        if "null_psnr" not in block:
            raise EntryError(
                "its verification predates the verdict over the null reconstruction: restate "
                "it (leakbench leaderboard verify --restate)"
            )
        claimed, claimed_success = defense_claims(entry, block["statistic"])
        recomputed = defense_figures(
            records,
            shipped_records(entry, path)[1],
            block["null_psnr"],
            claimed,
            claimed_success,
            block["statistic"],
            block["tolerance"],
            block["seeds"]["seed"],
        )
    else:
        claimed, claimed_success = _claims(entry, block["statistic"])
        recomputed = figures(
            records,
            claimed,
            claimed_success,
            block["statistic"],
            block["tolerance"],
            entry["kind"],
            block["seeds"]["seed"],
        )
    stored = {key: block[key] for key in recomputed}
    if json.loads(json.dumps(recomputed)) != stored:
        raise EntryError("its verification figures do not follow from its verification records")


def require_attack(entry: Mapping[str, Any]) -> None:
    """Refuse, in one line naming what to install, an attack that is not installed here as the
    entry ran it (other files than those whose hash the entry holds), and a plug-in whose
    distribution runs code in every Python process or writes into other packages."""
    from leakbench.registry import ATTACKS

    require_code(ATTACKS, "attack", entry["attack"]["name"], entry["attack"]["code"])


def require_defense(entry: Mapping[str, Any]) -> None:
    """:func:`require_attack` for the defense of a defense entry."""
    from leakbench.registry import DEFENSES

    require_code(DEFENSES, "defense", entry["defense"]["name"], entry["defense"]["code"])


def require_code(registry: Any, noun: str, name: str, recorded: Mapping[str, Any]) -> None:
    """Refuse a registered ``noun`` that is not installed as ``recorded`` (see
    :func:`require_attack`)."""
    from leakbench.protocol.attack import attack_code
    from leakbench.registry import Plugin

    install = (
        f"install the distribution {recorded['distribution']} {recorded['version']} "
        f"(pip install '{recorded['distribution']}=={recorded['version']}')"
        if recorded.get("distribution") and recorded["distribution"] != "leakbench"
        else f"use leakbench {recorded.get('version')} with the {noun} as it ran"
    )
    if name not in registry:
        raise AttackNotInstalled(f"{noun} {name!r} is not installed: {install}")
    installed = registry.get(name)
    code = attack_code(installed if isinstance(installed, Plugin) else installed)
    if code != recorded:
        raise AttackNotInstalled(
            f"the installed {noun} {name!r} is not the code the entry ran (files "
            f"{code['files_sha256'][:12]} from {code['distribution']} {code['version']}; the "
            f"entry ran {recorded['files_sha256'][:12]}): {install}"
        )
    if isinstance(installed, Plugin) and installed.distribution:
        _refuse_intrusive_distribution(installed.distribution)


def _refuse_intrusive_distribution(name: str) -> None:
    """A ``.pth`` file runs its code in every Python process of the environment, the harness's
    included; files outside the distribution's own top-level packages (those of its attack
    entry points, and its ``top_level.txt``) can replace another distribution's."""
    dist = metadata.distribution(name)
    tops = set((dist.read_text("top_level.txt") or "").split()) | {
        ep.value.split(":")[0].split(".")[0].strip()
        for ep in dist.entry_points
        if ep.group in ("leakbench.attacks", "leakbench.defenses")
    }
    for f in dist.files or []:
        if f.name.endswith(".pth"):
            raise EntryError(
                f"distribution {name} installs {f}, which runs code in every Python process "
                "(the harness's too): it cannot be verified; install it without .pth files"
            )
        top = f.parts[0]
        script = f.parts[:-1] == ("..", "..", "..", "bin")  # a console script
        if not (top.endswith(".dist-info") or top.split(".")[0] in tops or script):
            raise EntryError(
                f"distribution {name} installs {f} outside its own packages "
                f"({', '.join(sorted(tops)) or 'none declared'}): it cannot be verified"
            )


def board_key(key: str | Path | None, keys_dir: Path | None) -> Any:
    """The board's private key (``key``, default ``$LEAKBENCH_BOARD_KEY_FILE``), refused unless
    the board trusts its public half."""
    from leakbench.leaderboard.signing import KEYS, key_id, load_private_key, trusted_keys

    private_key = load_private_key(key)
    if key_id(private_key.public_key()) not in trusted_keys(keys_dir or KEYS):
        raise EntryError(
            f"key {key_id(private_key.public_key())} is not one the board trusts: add its public "
            f"half to {keys_dir or KEYS} (leakbench leaderboard keygen writes it there)"
        )
    return private_key


def verification_config(
    entry: Mapping[str, Any],
    track: Mapping[str, Any],
    seeds: Mapping[str, int],
    output_dir: Path,
    run_name: str,
    threads: int | None,
) -> Any:
    """The run of a verification: the track (on the maintainers' private data where they hold
    it), the entry's attack exactly as it ran (its full hyperparameters), the secret seeds, the
    verification's trials and transform, the sandbox, one process."""
    from leakbench.config import RunConfig
    from leakbench.leaderboard.private_data import verification_data

    settings = verification_settings(track)
    values = {**track, **verification_data(track).keys}
    attack = entry["attack"]["name"]
    values.update(
        attacks=[attack],
        attack_options={attack: dict(entry["attack"]["hparams"])},
        batch_sizes=[entry["protocol"]["batch_size"]],
        trials=int(settings["trials"]),
        seed=seeds["seed"],
        private_transform={"seed": seeds["private_transform"], **settings["private_transform"]},
        output_dir=str(output_dir),
        run_name=run_name,
        logger="none",
        threads=threads,
        devices=1,
        isolation="sandbox",
        covariates=[],  # analyses of the batch do not enter the verdict; they only cost time
    )
    if entry["kind"] == "defense":
        values.update(defense=entry["defense"]["name"], defense_options=entry["defense"]["options"])
    return RunConfig.from_mapping(values, source="verification")


def _document(path: Path) -> dict[str, Any]:
    """The JSON of the entry at ``path``, unchecked; refused in one line when unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EntryError(f"{path}: not a readable entry: {exc}") from None


def verify_entry(
    path: str | Path,
    *,
    key: str | Path | None = None,
    tracks_dir: Path = TRACKS,
    defense_tracks_dir: Path | None = None,
    keys_dir: Path | None = None,
    runs_dir: Path | None = None,
    threads: int | None = None,
    check_only: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Verify the entry at ``path`` (an attack entry, or a defense entry of a defense track in
    ``defense_tracks_dir``) and write the signed block into it (``check_only``: report the
    verdict, sign and write nothing, no key needed); returns the block."""
    from leakbench.leaderboard.defense_entry import (
        DEFENSE_TRACKS,
        defense_claims,
        defense_figures,
        is_defense_entry,
        load_defense_entry,
        validate_defense_entry,
    )
    from leakbench.leaderboard.private_data import verification_data
    from leakbench.leaderboard.signing import sign
    from leakbench.protocol.sandbox import close_sandboxes, sandbox_unavailable
    from leakbench.runner import environment

    path = Path(path)
    defense = is_defense_entry(_document(path))
    if defense:
        tracks_dir = Path(defense_tracks_dir or DEFENSE_TRACKS)
        entry = load_defense_entry(path, tracks_dir, keys_dir)  # tampered: refused before running
    else:
        entry = load_entry(path, tracks_dir, keys_dir)
    private_key = None if check_only else board_key(key, keys_dir)
    (require_defense if defense else require_attack)(entry)
    reason = sandbox_unavailable()
    if reason is not None:
        raise EntryError(
            f"verification runs attacks in the sandbox, which this machine lacks: {reason}"
        )
    track = load_track(entry["track"], tracks_dir)
    settings = verification_settings(track)
    tolerance = dict(settings["tolerance"])
    statistic = track["track"].get("ranking", "psnr.median")
    claimed, claimed_success = (
        defense_claims(entry, statistic) if defense else _claims(entry, statistic)
    )
    seeds = {"seed": secrets.randbits(128), "private_transform": secrets.randbits(128)}
    base = Path(runs_dir) if runs_dir is not None else Path(tempfile.mkdtemp(prefix="lb-verify-"))
    run_name = f"verify-{entry['track']}-{path.stem}-{secrets.token_hex(4)}"
    records: list[dict[str, Any]] = []
    try:
        measure = _measure_defense if defense else _measure_attack
        trials, grid_bytes, specific = measure(
            entry, track, tracks_dir, seeds, base, run_name, threads, echo, records
        )
        close_sandboxes()  # every process that ran attack code has ended before anything is written
    finally:
        if runs_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    text = records_text(records)
    if defense:
        result = defense_figures(
            records,
            shipped_records(entry, path)[1],
            specific["null_psnr"],
            claimed,
            claimed_success,
            statistic,
            tolerance,
            seeds["seed"],
        )
    else:
        result = figures(
            records, claimed, claimed_success, statistic, tolerance, entry["kind"], seeds["seed"]
        )
    transform = {"seed": seeds["private_transform"], **settings["private_transform"]}
    sandbox = {r["isolation"] for r in records}
    if sandbox != {"sandbox"}:
        raise EntryError(f"the verification's attack ran outside the sandbox ({sandbox})")
    block = {
        "date": date.today().isoformat(),
        "leakbench": leakbench.__version__,
        "git_commit": environment(1, 1).get("git_commit"),
        "seeds": seeds,
        "commitments": {
            "seed": commitment(seeds["seed"]),
            "private_transform": commitment(transform),
        },
        "private_transform": dict(settings["private_transform"]),
        "data": verification_data(track).description,
        "sandbox": "bubblewrap sandbox (leakbench.protocol.sandbox)",
        "lookup_bound": settings.get("lookup_bound"),
        "trials": trials,
        "failed": sum(r["status"] != "ok" for r in records),
        "records_sha256": hashlib.sha256(text.encode()).hexdigest(),
        **result,
        "tolerance": tolerance,
        "entry_sha256": content_sha256(entry),
        **specific,
    }
    verdict = ("PASSED: " if block["passed"] else "FAILED: ") + block["reason"]
    if check_only:
        echo(verdict + " (checked only: nothing signed or written)")
        return block
    assert private_key is not None
    block["signature"] = sign(block, private_key)
    verified = {**entry, "verification": block}
    (validate_defense_entry if defense else validate_entry)(verified)
    atomic_write_text(sibling(path, VERIFICATION_RECORDS), text)
    if grid_bytes is not None:
        atomic_write_bytes(sibling(path, VERIFICATION_GRID), grid_bytes)
    atomic_write_text(path, json.dumps(verified, indent=2) + "\n")
    # The block passes the check every later load makes.
    (load_defense_entry if defense else load_entry)(path, tracks_dir, keys_dir)
    echo(verdict)
    return block


def _measure_attack(
    entry: Mapping[str, Any],
    track: Mapping[str, Any],
    tracks_dir: Path,
    seeds: Mapping[str, int],
    base: Path,
    run_name: str,
    threads: int | None,
    echo: Callable[[str], None],
    records: list[dict[str, Any]],
) -> tuple[int, bytes | None, dict[str, Any]]:
    """An attack entry's verification run: its attack as it ran, on the track's unseen trials;
    fills ``records``; returns the trials, the grid and the block's attack-specific fields."""
    from leakbench.runner import run

    config = verification_config(entry, track, seeds, base, run_name, threads)
    echo(
        f"verifying {entry['name']} on {config.trials} unseen trials (secret seeds, in the sandbox)"
    )
    run(config, progress=False, echo=lambda _: None, secret_keys=SECRET_KEYS, collect=records)
    records.sort(key=lambda r: r["trial"])
    if [r["trial"] for r in records] != list(range(config.trials)) or any(
        r["cell"] != cell_of(entry) for r in records
    ):
        raise EntryError("the verification run did not make one record per trial")
    grid = base / run_name / "figures" / f"{cell_of(entry)}.png"
    grid_bytes = grid.read_bytes() if grid.is_file() else None
    return config.trials, grid_bytes, {"attack_code": dict(entry["attack"]["code"])}


def _measure_defense(
    entry: Mapping[str, Any],
    track: Mapping[str, Any],
    tracks_dir: Path,
    seeds: Mapping[str, int],
    base: Path,
    run_name: str,
    threads: int | None,
    echo: Callable[[str], None],
    records: list[dict[str, Any]],
) -> tuple[int, None, dict[str, Any]]:
    """A defense entry's verification run: the setting's victim re-trained from the track's
    recipe (it must be the one the entry attacked), then the board's attacks on it (the track's
    generic ones and the defense's adaptive ones, at the track's budgets), on unseen trials."""
    from leakbench.analysis.defense_track import (
        DefenseSetting,
        DefenseTrack,
        prepare_setting,
        track_context,
    )
    from leakbench.config import RunConfig
    from leakbench.leaderboard.entry import track_file
    from leakbench.leaderboard.private_data import verification_data
    from leakbench.protocol.attack import attack_code
    from leakbench.registry import ATTACKS
    from leakbench.runner import run

    settings = verification_settings(track)
    loaded = DefenseTrack.load(track_file(entry["track"], tracks_dir))
    declared = entry["setting"]
    setting = DefenseSetting(
        declared["label"],
        declared["defense"],
        dict(declared["options"]),
        declared["client_protocol"],
        declared["model"],
        declared["model_options"],
    )
    context = track_context(loaded, base / run_name)
    prepared = prepare_setting(context, setting, loaded.utility.seeds[:1], echo=lambda _: None)
    if prepared.reason is not None:
        raise EntryError(f"the setting cannot run on its track: {prepared.reason}")
    victim = prepared.victims[0].checkpoint.sha256
    if victim != entry["victim"]["checkpoint"]:
        raise EntryError(
            f"the victim trained from the track's recipe with this defense is {victim[:16]}, "
            f"not the {entry['victim']['checkpoint'][:16]} the entry attacked"
        )
    values = {**prepared.values, **verification_data(track).keys}
    values.update(
        trials=int(settings["trials"]),
        seed=seeds["seed"],
        private_transform={"seed": seeds["private_transform"], **settings["private_transform"]},
        output_dir=str(base),
        run_name=run_name,
        logger="none",
        threads=threads,
        devices=1,
        isolation="sandbox",
        covariates=[],
    )
    config = RunConfig.from_mapping(values, source="verification")
    attacks = list(config.attacks)
    echo(
        f"verifying {entry['name']}: the board's attacks {', '.join(attacks)} on "
        f"{config.trials} unseen trials (secret seeds, in the sandbox)"
    )
    run(config, progress=False, echo=lambda _: None, secret_keys=SECRET_KEYS, collect=records)
    records.sort(key=lambda r: (r["trial"], r["attack"]))
    plan = sorted((t, a) for t in range(config.trials) for a in attacks)
    if [(r["trial"], r["attack"]) for r in records] != plan:
        raise EntryError("the verification run did not make one record per attack and trial")
    ran = {
        name: {"adaptive": name in prepared.adaptive, "code": attack_code(ATTACKS.get(name))}
        for name in attacks
    }
    return (
        config.trials,
        None,
        {
            "defense_code": dict(entry["defense"]["code"]),
            "attacks": ran,
            "victim_checkpoint": victim,
            "null_psnr": defense_baselines(entry, track, seeds, config.trials),
        },
    )


def defense_baselines(
    entry: Mapping[str, Any], track: Mapping[str, Any], seeds: Mapping[str, int], trials: int
) -> dict[str, dict[str, dict[str, float]]]:
    """The null reconstruction's PSNR per sample of the entry's public trials (``claimed``) and
    of the verification's (``verified``: its data, secret seeds and transform)."""
    from leakbench.leaderboard.defense_entry import null_baselines
    from leakbench.leaderboard.private_data import verification_data

    protocol = entry["protocol"]
    transform = verification_settings(track)["private_transform"]
    return {
        "claimed": null_baselines(protocol, seed=protocol["seed"], trials=protocol["trials"]),
        "verified": null_baselines(
            protocol,
            seed=seeds["seed"],
            trials=trials,
            data=verification_data(track).keys,
            transform={"seed": seeds["private_transform"], **transform},
        ),
    }


def restate_entry(
    path: str | Path,
    *,
    key: str | Path | None = None,
    defense_tracks_dir: Path | None = None,
    keys_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Recompute a verified defense entry's figures and verdict from the verification records
    it ships, under the current rules (the verdict over the null reconstruction), and sign the
    block again; nothing is re-run. The block must be one the board signed for this entry, its
    records the ones it names, and its data this machine's; its seeds, revealed, give the
    verification's ground truth again. Returns the new block (``restated`` says when and why)."""
    from leakbench.leaderboard import defense_entry as defense
    from leakbench.leaderboard.private_data import verification_data
    from leakbench.leaderboard.signing import sign
    from leakbench.runner import environment

    path = Path(path)
    document = _document(path)
    if not defense.is_defense_entry(document):
        raise EntryError(f"{path}: only defense entries are restated (attack entries' rule holds)")
    if "verification" not in document:
        raise EntryError(f"{path}: it has no verification to restate; verify it instead")
    tracks_dir = Path(defense_tracks_dir or defense.DEFENSE_TRACKS)
    entry = defense.load_defense_entry(path, tracks_dir, keys_dir, figures_too=False)
    private_key = board_key(key, keys_dir)
    block = entry["verification"]
    track = load_track(entry["track"], tracks_dir)
    data = verification_data(track)
    if data.description != block["data"]:
        raise EntryError(
            f"{path}: its verification ran on {block['data']!r}, this machine has "
            f"{data.description!r}: restate it where that data is"
        )
    baselines = defense_baselines(entry, track, block["seeds"], block["trials"])
    claimed, claimed_success = defense.defense_claims(entry, block["statistic"])
    result = defense.defense_figures(
        read_records(sibling(path, VERIFICATION_RECORDS)),
        shipped_records(entry, path)[1],
        baselines,
        claimed,
        claimed_success,
        block["statistic"],
        block["tolerance"],
        block["seeds"]["seed"],
    )
    restated = {k: v for k, v in block.items() if k != "signature"}
    restated.update(
        result,
        null_psnr=baselines,
        restated={
            "date": date.today().isoformat(),
            "leakbench": leakbench.__version__,
            "git_commit": environment(1, 1).get("git_commit"),
            "why": "verdict over the null reconstruction, from the verification's own records",
        },
    )
    restated["signature"] = sign(restated, private_key)
    verified = {**entry, "verification": restated}
    defense.validate_defense_entry(verified)
    atomic_write_text(path, json.dumps(verified, indent=2) + "\n")
    defense.load_defense_entry(path, tracks_dir, keys_dir)  # the new block passes every later load
    verdict = "PASSED: " if restated["passed"] else "FAILED: "
    echo(f"{entry['track']} / {entry['name']}: {verdict}{restated['reason']} (restated)")
    return restated
