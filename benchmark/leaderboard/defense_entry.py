"""Defense entries: one schema-checked JSON file per setting of a finished defense track run.

``leakbench defenses --config <defense track>`` writes, per setting, ``settings/<slug>.json``
and the setting's canonical records; ``leakbench submit <that run's folder>`` turns each into an
entry beside the attack board's entries::

    defense-entries/<track>/<name>.json              the entry: setting, protocol, victim, the
                                                    attacks and their budgets, privacy, utility
    defense-entries/<track>/<name>.records.jsonl     every attack's trial records, canonical JSON
    defense-entries/<track>/<name>.verification.jsonl  after ``leakbench leaderboard verify``

A defense submission chooses only the track's list of settings (``track.free: [defenses]``): a
submitter copies the shipped track file, lists their defense under ``track.defenses``, runs it
and submits; everything else must be the shipped track's. The entry holds the records hash as an
attack entry does (``records.sha256`` over every field, ``records.outcome_sha256`` without the
fields that measure the machine; see :mod:`leakbench.leaderboard.entry`), and its ``privacy``
is recomputed from its records whenever it is loaded, so a number changed by hand is refused.

Verification (:mod:`leakbench.leaderboard.verify`, the same command and signature as attack
entries) re-trains the setting's attacked victim from the track's recipe (its checkpoint hash
must be the entry's), then runs *the board's* attacks on it, generic and adaptive at the track's
budgets, in the sandbox on unseen, secretly transformed trials. Its statistic is the track's
ranking over the per-sample worst case (the best attack on each private sample), and the check is
one-sided the defense's way: the entry fails when the board's attacks leak clearly more than it
claims.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import yaml

from leakbench.leaderboard.entry import (
    BOOKKEEPING_KEYS,
    LEADERBOARDS,
    PACKAGE_DIR,
    PROTOCOL_KEYS,
    RECORDS_SUFFIX,
    EntryError,
    _differences,
    atomic_write_text,
    outcome_sha256,
    read_records,
    records_text,
    sha256_file,
    shipped_records,
    sibling,
    slug,
    track_file,
)

KIND = "defense-setting"
DEFENSE_SCHEMA_VERSION = 1
DEFENSE_SCHEMA_FILE = PACKAGE_DIR / "defense-entry.schema.json"
DEFENSE_TRACKS = PACKAGE_DIR / "defense-tracks"
DEFENSE_ENTRIES = LEADERBOARDS / "defense-entries"
# A setting brings these itself (a secure-aggregation setting its protocol, PRECODE its model).
SETTING_PROTOCOL_KEYS = ("model", "model_options")
# Run keys of a defense track that change where and how results are written, never what.
TRACK_BOOKKEEPING = BOOKKEEPING_KEYS | {"checkpoint_dir"}


def is_defense_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is the folder ``leakbench defenses`` wrote for one track (each
    measured setting stands alone: an interrupted track's finished settings can be submitted)."""
    return (Path(run_dir) / "settings").is_dir() and not (Path(run_dir) / "summary.json").exists()


def is_defense_entry(entry: Mapping[str, Any]) -> bool:
    return entry.get("kind") == KIND


@functools.cache
def defense_entry_validator() -> Any:
    schema = json.loads(DEFENSE_SCHEMA_FILE.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def validate_defense_entry(entry: Mapping[str, Any]) -> None:
    """Raise :class:`EntryError` naming the first place where ``entry`` breaks the schema."""
    error = jsonschema.exceptions.best_match(defense_entry_validator().iter_errors(entry))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise EntryError(f"invalid defense entry at {where}: {error.message}") from None


def fixed_part(track_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a submission may not change: the track without its settings and bookkeeping."""
    fixed = {k: v for k, v in track_config.items() if k not in TRACK_BOOKKEEPING and k != "attacks"}
    fixed["track"] = {k: v for k, v in fixed.get("track", {}).items() if k != "defenses"}
    return fixed


def worst_case_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The client's worst case as records of one pseudo-attack: per trial and private sample
    (by id), the best completed attack's PSNR and SSIM, a success when any attack succeeded. A
    trial no attack completed has no private sample (it is counted as failed, never as
    privacy)."""
    best: dict[int, dict[str, dict[str, Any]]] = {}
    for record in records:
        if record["status"] != "ok":
            continue
        trial = best.setdefault(int(record["trial"]), {})
        for sample in record["metrics"]["samples"]:
            sample_id = str(sample["sample_id"])
            current = trial.setdefault(
                sample_id,
                {"sample_id": sample_id, "psnr": -float("inf"), "ssim": None, "success": False},
            )
            if sample["psnr"] > current["psnr"]:
                current.update(psnr=sample["psnr"], ssim=sample.get("ssim"))
            current["success"] = current["success"] or bool(sample.get("success"))
    return [
        {"trial": t, "metrics": {"samples": [best[t][k] for k in sorted(best[t])]}}
        for t in sorted(best)
    ]


def defense_claims(entry: Mapping[str, Any], statistic: str) -> tuple[float, float | None]:
    """The entry's claim on the per-sample worst case: the ranking statistic and success rate."""
    per_sample = entry["privacy"]["per_sample"]
    claims = {"psnr.median": per_sample["psnr_max_median"]}
    if statistic not in claims:
        raise EntryError(
            f"defense tracks rank by {', '.join(claims)} of the per-sample worst case, not by "
            f"{statistic!r}"
        )
    if claims[statistic] is None:
        raise EntryError("the entry claims no completed attack: it has nothing to verify")
    success = per_sample.get("success_rate")
    return float(claims[statistic]), None if success is None else float(success)


def null_baselines(
    protocol: Mapping[str, Any],
    *,
    seed: int,
    trials: int,
    data: Mapping[str, Any] | None = None,
    transform: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Per trial (as text) and sample id: the PSNR of the null reconstruction
    (:func:`leakbench.metrics.null_psnr`) against the ground truth exactly as the client held
    it, for the trials an entry's ``protocol`` draws with ``seed`` (``data``: other dataset keys,
    the verification's; ``transform``: the private transform's options with its seed)."""
    import torch

    from leakbench.client import protocol_from_spec
    from leakbench.config import RunConfig
    from leakbench.metrics import null_psnr, to_pixels
    from leakbench.protocol.private_transform import PrivateTransform
    from leakbench.protocol.trial import private_images
    from leakbench.runner import build_datamodule

    values = {key: protocol[key] for key in ("dataset", "dataset_options", "split", "dtype")}
    values.update(data or {})
    config = RunConfig.from_mapping(
        {**values, "model": protocol["model"], "attacks": ["bias"], "seed": seed, "trials": trials},
        source="null baselines",
    )
    per_trial = protocol_from_spec(protocol["client_protocol"]).samples_per_trial(
        protocol["batch_size"]
    )
    datamodule = build_datamodule(config, per_trial)
    change = None if transform is None else PrivateTransform.from_options(transform)
    dtype = getattr(torch, config.dtype)
    baselines: dict[str, dict[str, float]] = {}
    for trial, batch in enumerate(datamodule.trials()):
        images = private_images(
            batch["images"], trial, dtype, change, datamodule.mean, datamodule.std
        )
        pixels = to_pixels(images, datamodule.mean, datamodule.std)
        baselines[str(trial)] = dict(zip(batch["sample_ids"], null_psnr(pixels), strict=True))
    return baselines


def over_null(
    worst: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, Mapping[str, float]],
    ceiling: float | None,
) -> list[dict[str, Any]]:
    """:func:`worst_case_records` with each sample's PSNR (capped at ``ceiling``) taken relative
    to its null reconstruction's; refused when a sample is not one of the draw's."""
    corrected = []
    for record in worst:
        trial = baselines.get(str(record["trial"]), {})
        samples = []
        for sample in record["metrics"]["samples"]:
            if sample["sample_id"] not in trial:
                raise EntryError(
                    f"sample {sample['sample_id']} of trial {record['trial']} is not one the "
                    "track's draw puts there: the records are not of the trials they name"
                )
            psnr = sample["psnr"] if ceiling is None else min(sample["psnr"], ceiling)
            samples.append({**sample, "psnr": psnr - trial[sample["sample_id"]]})
        corrected.append({**record, "metrics": {"samples": samples}})
    return corrected


def defense_figures(
    records: Sequence[Mapping[str, Any]],
    public_records: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, Mapping[str, Mapping[str, float]]],
    claimed: float,
    claimed_success: float | None,
    statistic: str,
    tolerance: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:
    """A defense entry's verification figures: the per-sample worst case of the verification's
    ``records`` as measured (what the board shows), and the verdict on it *over the null
    reconstruction*, the claim's from the entry's ``public_records`` likewise; ``baselines``
    holds the null reconstruction's PSNR per sample of both draws (``claimed``, ``verified``:
    :func:`null_baselines`).

    Why over the null reconstruction: the private transform (range squeeze, blur, contrast)
    lifts the PSNR of any reconstruction that carries no information, the null one as much as
    the attacks' near-chance ones (3-4 dB on digits), so a raw comparison failed honest
    near-chance settings. Both sides are taken relative to their own ground truth's chance
    level; exact reconstructions, capped at the ceiling first, then count up to that lift less
    on the verification's side, which only makes a claim of *more* leakage easier to pass.
    """
    from leakbench.leaderboard.verify import _statistic, figures

    metric, stat = statistic.split(".")
    ceiling = tolerance.get("ceiling")
    worst = worst_case_records(records)
    raw = figures(worst, claimed, claimed_success, statistic, tolerance, "defense", seed)
    public = over_null(worst_case_records(public_records), baselines["claimed"], ceiling)
    values = np.array([s[metric] for r in public for s in r["metrics"]["samples"]])
    if not len(values):
        raise EntryError("the entry's records hold no completed attack: nothing to verify")
    verdict = figures(
        over_null(worst, baselines["verified"], ceiling),
        _statistic(values, stat, metric),
        claimed_success,
        statistic,
        tolerance,
        "defense",
        seed,
        label=f"{statistic} over the null reconstruction",
    )
    reason = (
        f"{verdict['reason']}; as measured (dB): claimed {claimed:.2f}, verified "
        f"{raw['verified']:.2f} [{raw['interval'][0]:.2f}, {raw['interval'][1]:.2f}]"
    )
    return {
        **raw,
        "passed": verdict["passed"],
        "reason": reason,
        "over_null": {key: verdict[key] for key in ("claimed", "verified", "interval")},
    }


def _declared_setting(document: Mapping[str, Any]) -> dict[str, Any]:
    """The setting as the run's track file declared it (options before training-time
    calibration, its own protocol and victim if any)."""
    label = document["setting"]["label"]
    for declared in document["track_config"]["track"].get("defenses") or []:
        if str(declared.get("label", declared["defense"])) == label:
            return {
                "label": label,
                "defense": declared["defense"],
                "options": dict(declared.get("options") or {}),
                "client_protocol": declared.get("client_protocol"),
                "model": declared.get("model"),
                "model_options": declared.get("model_options"),
            }
    raise EntryError(f"setting {label!r} is not declared in the run's track.defenses")


def run_settings(run_dir: Path) -> list[str]:
    """The slugs of the settings a defense track run measured (not-applicable ones have none)."""
    return sorted(p.stem for p in (Path(run_dir) / "settings").glob("*.json"))


def make_defense_entry(
    run_dir: str | Path,
    setting: str,
    *,
    name: str | None = None,
    submitter: str | None = None,
    paper: str | None = None,
    tracks_dir: Path = DEFENSE_TRACKS,
) -> dict[str, Any]:
    """Build the entry of one setting (its slug, e.g. ``noise-s=0.01``) of a defense track run."""
    from leakbench.protocol.attack import attack_code
    from leakbench.registry import DEFENSES

    run_dir = Path(run_dir)
    document_path = run_dir / "settings" / f"{setting}.json"
    if not document_path.is_file():
        known = ", ".join(run_settings(run_dir)) or "none"
        raise EntryError(f"{run_dir}: no setting {setting!r} (settings: {known})")
    document = json.loads(document_path.read_text())
    if document.get("kind") != KIND:
        raise EntryError(f"{document_path} is not a defense setting's result")
    shipped_path = track_file(document["track"], tracks_dir)
    shipped = yaml.safe_load(shipped_path.read_text())
    expected, ran = fixed_part(shipped), fixed_part(document["track_config"])
    changed = sorted(k for k in set(expected) | set(ran) if expected.get(k) != ran.get(k))
    if changed:
        raise EntryError(
            f"the run changed the protocol of defense track {document['track']!r} outside "
            f"track.defenses, in: {', '.join(changed)}"
        )
    config_path = run_dir / setting / "config.yaml"
    if not config_path.is_file():
        raise EntryError(f"{config_path} is missing: the setting's run folder is incomplete")
    config = yaml.safe_load(config_path.read_text())
    if config.get("private_transform") is not None:
        raise EntryError(f"{run_dir} is a verification run, not a submission")
    records_path = run_dir / "settings" / document["records"]["file"]
    records = read_records(records_path)
    text = records_text(records)
    if hashlib.sha256(text.encode()).hexdigest() != document["records"]["sha256"]:
        raise EntryError(f"{records_path} does not match the hash of {document_path.name}")
    attacks_run = config.get("attacks_run") or {}
    declared = _declared_setting(document)
    defense_cls = DEFENSES.get(declared["defense"])
    entry = {
        "schema_version": DEFENSE_SCHEMA_VERSION,
        "kind": KIND,
        "track": document["track"],
        "track_sha256": sha256_file(shipped_path),
        "name": name or declared["label"],
        "setting": declared,
        "defense": {
            "name": declared["defense"],
            "options": document["setting"]["options"],
            "code": attack_code(defense_cls),
        },
        "protocol": {
            **{key: config[key] for key in PROTOCOL_KEYS},
            "batch_size": document["batch_size"],
            "client_protocol": document["setting"]["client_protocol"],
        },
        "victim": document["victim"],
        "attacks": {
            attack: {
                **details,
                "hparams": attacks_run[attack]["hparams"],
                "code": attacks_run[attack]["code"],
            }
            for attack, details in sorted(document["attacks"].items())
        },
        "attacks_not_applicable": document["attacks_not_applicable"],
        "budget_note": _budget_note(document["attacks"]),
        "privacy": document["privacy"],
        "utility": document["utility"],
        "dp": document["dp"],
        "records": {
            "trials": config["trials"],
            "count": len(records),
            "sha256": document["records"]["sha256"],
            "outcome_sha256": outcome_sha256(records),
        },
        "environment": config["environment"],
        "submitter": submitter,
        "paper": paper,
        "date": date.today().isoformat(),
    }
    validate_defense_entry(entry)
    return entry


def _budget_note(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    """Whether every attack ran at its published budget, in one sentence."""
    reduced = sorted(name for name, a in attacks.items() if "(track; published" in a["budget"])
    if not reduced:
        return "every attack at its published budget"
    return f"REDUCED budgets (the track's attack_options) for {', '.join(reduced)}: " + "; ".join(
        f"{name} {attacks[name]['budget']}" for name in reduced
    )


def defense_entry_path(entry: Mapping[str, Any], entries_dir: Path) -> Path:
    return Path(entries_dir) / entry["track"] / f"{slug(entry['name'])}.json"


def write_defense_entries(
    run_dir: str | Path,
    settings: list[str] | None,
    entries_dir: Path,
    *,
    replace: bool = False,
    **details: Any,
) -> list[Path]:
    """Write the entry of every setting of a defense track run (or of ``settings``, by slug)
    with its records; returns their paths."""
    run_dir = Path(run_dir)
    chosen = settings or run_settings(run_dir)
    if not chosen:
        raise EntryError(f"{run_dir} holds no measured setting (settings/*.json)")
    if details.get("name") and len(chosen) > 1:
        raise EntryError("--name names one entry: choose its setting with --cell SLUG")
    entries = [make_defense_entry(run_dir, s, **details) for s in chosen]
    paths = [defense_entry_path(e, entries_dir) for e in entries]
    for path in paths:
        if path.exists() and not replace:
            raise EntryError(f"{path} exists; choose another --name, or pass --replace")
    for setting, entry, path in zip(chosen, entries, paths, strict=True):
        document = json.loads((run_dir / "settings" / f"{setting}.json").read_text())
        records = read_records(run_dir / "settings" / document["records"]["file"])
        atomic_write_text(sibling(path, RECORDS_SUFFIX), records_text(records))
        sibling(path, ".verification.jsonl").unlink(missing_ok=True)
        atomic_write_text(path, json.dumps(entry, indent=2) + "\n")
    return paths


def load_defense_entry(
    path: str | Path,
    tracks_dir: Path = DEFENSE_TRACKS,
    keys_dir: Path | None = None,
    *,
    figures_too: bool = True,
) -> dict[str, Any]:
    """Read a defense entry and refuse it, with the reason, unless it is intact: schema, the
    track file it was made under, its protocol and budgets, its records and the privacy they
    give, and a verification signed by a key of ``keys_dir`` (default: the board's) whose
    figures follow from its records (``figures_too=False``: only who signed what, for a block
    about to be restated)."""
    path = Path(path)
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EntryError(f"{path}: not a readable entry: {exc}") from None
    try:
        _check(entry, path, Path(tracks_dir), keys_dir, figures_too)
    except EntryError as exc:
        raise EntryError(f"{path}: refused: {exc}") from None
    return entry


def _check(
    entry: dict[str, Any], path: Path, tracks_dir: Path, keys_dir: Path | None, figures_too: bool
) -> None:
    from leakbench.analysis.defense_track import BUDGET_KEYS, PUBLISHED_BUDGETS, setting_privacy
    from leakbench.config import RunConfig
    from leakbench.protocol.records import trial_seed

    validate_defense_entry(entry)
    track = track_file(entry["track"], tracks_dir)
    if sha256_file(track) != entry["track_sha256"]:
        raise EntryError(
            f"it was made under another version of defense track {entry['track']!r} "
            "(track_sha256 differs from the track file); run the track again"
        )
    values = yaml.safe_load(track.read_text())
    expected = RunConfig.from_mapping(
        {**values, "attacks": ["bias"], "attack_options": {}}, source=str(track)
    ).to_dict()
    setting = entry["setting"]
    own = {k: setting[k] for k in SETTING_PROTOCOL_KEYS if setting.get("model") is not None}
    differing = [k for k in PROTOCOL_KEYS if entry["protocol"][k] != own.get(k, expected[k])]
    if entry["protocol"]["batch_size"] not in expected["batch_sizes"]:
        differing.append("batch_size")
    budgets = values.get("attack_options") or {}
    for name, attack in entry["attacks"].items():
        track_budget = {**PUBLISHED_BUDGETS.get(name, {}), **budgets.get(name, {})}
        if any(attack["options"].get(k) != track_budget.get(k) for k in BUDGET_KEYS):
            differing.append(f"the budget of {name}")
    if differing:
        raise EntryError(f"its protocol differs from the track in: {', '.join(differing)}")
    records_path, records = shipped_records(entry, path)
    ordered = sorted(records, key=lambda r: (r["trial"], r["attack"]))
    if (
        records_text(ordered) != records_path.read_text()
        or len(records) != entry["records"]["count"]
    ):
        raise EntryError(f"{records_path.name} is not the canonical records of the setting")
    trials = entry["protocol"]["trials"]
    plan = sorted((a, t) for a in entry["attacks"] for t in range(trials))
    if sorted((r["attack"], r["trial"]) for r in records) != plan:
        raise EntryError("its records are not one per attack and trial of the track")
    if any(r["seed"] != trial_seed(entry["protocol"]["seed"], r["trial"]) for r in records):
        raise EntryError("its records were not drawn with the seed of its protocol")
    adaptive = [name for name, a in entry["attacks"].items() if a["adaptive"]]
    recomputed = json.loads(
        json.dumps(setting_privacy(records, entry["protocol"]["success_psnr"], adaptive))
    )
    changed = _differences(entry["privacy"], recomputed, "privacy")
    if changed:
        raise EntryError(f"its privacy differs from its records in: {', '.join(changed)}")
    if "verification" in entry:
        from leakbench.leaderboard.verify import check_block

        check_block(entry, path, keys_dir, figures_too=figures_too)
