"""The static web leaderboard: ``leakbench leaderboard build`` renders the board as HTML.

``index.html`` has one section per track (its protocol, threat model and budget in words, and a
sortable table per batch size, ranked by the track's statistic, failures counted, verification
marked, each entry's SoK threat-model letter shown); a filter above the tracks keeps the entries
an adversary of a chosen threat model could have run (the letters it admits, Carletti et al.,
USENIX Security 2025); each entry gets a page with its protocol, settings, environment, ground
truth next to reconstruction, and the distribution of its per-sample metrics. Each defense
track gets a page (``defense/<track>.html``): the privacy–utility scatter as inline SVG, and the
table of its settings with the worst attack per setting, its budget and whether it adapts to the
defense, failures listed apart. The templates are Jinja2 files shipped with the package
(``leakbench/templates``); sorting and filtering are a few lines of plain JavaScript. Everything
is a relative link and there is no fetch, so the site works from ``file://``.

The output is a pure function of the entries and tracks: no build time, sorted iteration, the
images copied byte for byte. Building twice gives identical files.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from leakbench.leaderboard.board import (
    STATUSES,
    Row,
    TrackBoard,
    attack_letter,
    load_board,
    metric,
    verification_text,
)
from leakbench.leaderboard.defense_board import (
    DefenseTrackBoard,
    load_defense_board,
    scatter,
)
from leakbench.leaderboard.defense_entry import DEFENSE_TRACKS
from leakbench.leaderboard.entry import (
    GRID_SUFFIX,
    RECORDS_SUFFIX,
    TRACKS,
    read_records,
    sibling,
    slug,
)
from leakbench.leaderboard.verify import VERIFICATION_GRID, higher_ranks_first
from leakbench.results import atomic_write_bytes, atomic_write_text

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STATIC = ("site.css", "sort.js", "filter.js")
MARKER = ".leakbench-site"  # a folder holding it is a site this command may rebuild
THUMBNAIL_SCALE = 4  # old 25 px strips shown 4x; the wide cell figures fit MAX_WIDTH at 1x
MAX_WIDTH = 1000
PSNR_BINS = [*range(0, 65, 5)]  # dB; the last bin collects everything from 60 dB up
SSIM_BINS = [round(-0.2 + 0.1 * i, 1) for i in range(13)]  # -0.2 .. 1.0
GRANTS = {
    "batch_size": "the batch size",
    "labels": "the labels of the batch",
    "client_code": "running its own code on the client",
    "local_hyperparameters": "the client protocol's local hyperparameters",
    "surrogate_data": "surrogate data (samples of the dataset's other split)",
    "server_model": "sending a model of its own making, which the client trains",
    "batchnorm_statistics": "the BatchNorm statistics of the client's batch",
}
STATISTICS = {"median": "median", "mean": "mean", "worst": "worst-case"}
METRICS = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "mse": "MSE",
    "psnr_scale_aligned": "scale-aligned PSNR",
}


@functools.cache  # one environment: each template is compiled once per process
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def statistic_words(statistic: str) -> str:
    name, stat = statistic.split(".")
    return f"the {STATISTICS.get(stat, stat)} {METRICS.get(name, name)} over all images"


def budget_words(budget: dict[str, Any]) -> str:
    iterations = budget.get("max_iterations")
    seconds = budget.get("max_seconds")
    parts = [
        f"at most {iterations:,} iterations per trial"
        if iterations
        else "no iteration cap beyond the attack's own schedule"
    ]
    parts.append(
        f"a hard wall-clock limit of {seconds:g} s per trial (a trial past it fails)"
        if seconds
        else "no wall-clock limit"
    )
    return "; ".join(parts)


def threat_words(config: dict[str, Any]) -> str:
    granted = [GRANTS[g] for g in config.get("grants", [])]
    withheld = [words for g, words in GRANTS.items() if g not in config.get("grants", [])]
    text = (
        "An honest-but-curious server knows the victim's architecture and parameters and "
        "observes one shared FedSGD update of the client's private batch."
    )
    text += f" It is granted {', '.join(granted)}." if granted else " It is granted nothing else."
    if withheld:
        text += f" It is not granted {', '.join(withheld)}."
    letter = config.get("track", {}).get("threat_model")
    if letter is not None:
        from leakbench.capabilities import admitted_letters, threat_model_of

        admitted = ", ".join(admitted_letters(letter))
        model = threat_model_of(letter)
        text += (
            f" SoK threat model {letter}, {model.name} (Carletti et al., USENIX Security 2025):"
            f" attacks of threat models {admitted} are admitted."
        )
    return text


def victim_state_words(config: dict[str, Any]) -> str:
    """The attacked state: the seeded initialisation, or the checkpoint that names it."""
    state = str(config.get("model_state", "random"))
    if state == "random":
        return f"at its seeded random initialisation (model seed {config.get('model_seed', 0)})"
    if state.startswith("random("):
        return f"at its seeded random initialisation ({state})"
    return f"trained: checkpoint sha256 {state}"


def client_words(protocol: str | dict[str, Any], batch_sizes: str) -> str:
    """The client protocol in a sentence."""
    spec = {"name": protocol} if isinstance(protocol, str) else dict(protocol)
    name = spec.pop("name")
    if name == "fedsgd":
        return f"FedSGD: one gradient of a private batch of {batch_sizes} image(s)."
    details = ", ".join(f"{k} {json.dumps(v, sort_keys=True)}" for k, v in sorted(spec.items()))
    return f"{name} ({details}), client batches of {batch_sizes} image(s)."


def protocol_words(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The track's protocol as (heading, sentence) pairs."""
    from leakbench.config import RunConfig

    config = RunConfig.from_mapping(dict(config)).to_dict()  # the defaults a run would use
    meta = config["track"]
    options = config.get("dataset_options") or {}
    dataset = f"{config.get('dataset', 'lfw-subset')} ({config.get('split', 'test')} split)"
    if options:
        dataset += ", options " + json.dumps(options, sort_keys=True)
    if meta.get("intended_for"):
        dataset += f"; on a cluster this track is meant for {meta['intended_for']}"
    model = config.get("model", "fcn")
    if config.get("model_options"):
        model += " " + json.dumps(config["model_options"], sort_keys=True)
    batch_sizes = ", ".join(str(b) for b in config.get("batch_sizes", []))
    words = [
        ("Dataset", dataset + "."),
        (
            "Victim",
            f"{model} {victim_state_words(config)}, {config.get('client_mode', 'eval')} mode "
            f"on the client, {config.get('dtype', 'float32')}.",
        ),
        ("Client", client_words(config.get("client_protocol", "fedsgd"), batch_sizes)),
        ("Threat model", threat_words(config)),
        ("Budget", budget_words(config.get("budget", {})).capitalize() + "."),
        (
            "Trials",
            f"{config.get('trials')} trials per batch size drawn with the public seed "
            f"{config.get('seed', 0)}; the attack's code runs in a sandbox that sees nothing of "
            "the harness (its own user, processes, files and no network).",
        ),
        (
            "Ranking",
            f"By {statistic_words(meta.get('ranking', 'psnr.median'))}, "
            + (
                "more leakage first."
                if meta["kind"] == "attack"
                else "least leakage first (a defense track)."
            ),
        ),
    ]
    verification = meta.get("verification")
    if verification:
        tol = verification["tolerance"]
        transform = ", ".join(
            f"{k} {json.dumps(v)}" for k, v in sorted(verification["private_transform"].items())
        )
        ceiling = f", values capped at {tol['ceiling']:g}" if tol.get("ceiling") is not None else ""
        side = (
            "at most the upper end of"
            if higher_ranks_first(meta["kind"], meta.get("ranking", "psnr.median"))
            else "at least the lower end of"
        )
        bound = verification.get("lookup_bound") or {}
        lookup = (
            f" The best lookup of the public dataset scores at most {bound['psnr_max']:.1f} dB "
            "against such samples, so a figure above it is an inversion, not a lookup."
            if bound.get("psnr_max") is not None
            else ""
        )
        words.append(
            (
                "Verification",
                f"The board re-runs the attack, as it ran, in the sandbox on "
                f"{verification['trials']} unseen trials drawn with a secret seed; every private "
                f"sample is changed by a secret continuous transform ({transform}) with a second "
                f"secret seed.{lookup} An entry passes when its claim{ceiling} is {side} the "
                f"{tol['confidence']:.0%} bootstrap interval of the verification, give or take "
                f"{tol['margin']:g}, and so is its success rate. The block is signed with the "
                "board's key; verified entries are ranked by the verification's own figure.",
            )
        )
    return words


def threat_model_choices() -> list[dict[str, Any]]:
    """The filter's choices: every SoK threat model with its name and the letters it admits."""
    from leakbench.capabilities import THREAT_MODELS, admitted_letters

    return [
        {"letter": letter, "name": model.name, "admits": admitted_letters(letter)}
        for letter, model in THREAT_MODELS.items()
    ]


def _histogram(values: list[float], edges: list[float]) -> list[dict[str, Any]]:
    """Counts per bin ``[edges[i], edges[i+1])``; the first and last bins are open-ended."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        index = sum(value >= edge for edge in edges[1:-1])
        counts[index] += 1
    top = max(counts) if counts and max(counts) else 1
    bars = []
    for i, count in enumerate(counts):
        low = "" if i == 0 else f"{edges[i]:g}"
        high = "" if i == len(counts) - 1 else f"{edges[i + 1]:g}"
        label = f"< {high}" if not low else (f"≥ {low}" if not high else f"{low}–{high}")
        bars.append({"label": label, "count": count, "height": round(100 * count / top, 1)})
    return bars


def _image(source: Path, target: Path) -> dict[str, Any] | None:
    if not source.is_file():
        return None
    atomic_write_bytes(target, source.read_bytes())
    with Image.open(source) as image:
        width, height = image.size
    scale = max(1, min(THUMBNAIL_SCALE, MAX_WIDTH // max(width, 1)))
    return {"src": target.name, "width": width * scale, "height": height * scale}


def _samples(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    samples = []
    for record in records:
        for s in record["metrics"]["samples"]:
            samples.append(
                {
                    "trial": record["trial"],
                    "status": record["status"],
                    "id": s.get("sample_id", ""),
                    "psnr": s["psnr"],
                    "ssim": s["ssim"],
                    "success": s["success"],
                }
            )
    return samples


def transform_words(options: dict[str, Any]) -> str:
    """The verification's private transform in words (loads torch: only for verified entries)."""
    from leakbench.protocol.private_transform import describe

    return describe(options)


def column_words(board: TrackBoard) -> list[tuple[str, str]]:
    """What each column of a track's table means, with its unit."""
    ceiling = "" if board.ceiling is None else f", capped at {board.ceiling:g}"
    return [
        ("rank", "position among verified entries; =N marks a tie (equal verified figures)"),
        (
            "verified",
            f"{statistic_words(board.ranking)} on the board's unseen trials{ceiling} (dB for "
            "PSNR); what the ranking uses",
        ),
        ("verified success", "share of verification images at or above the success PSNR"),
        ("verified worst", f"the worst image of the verification{ceiling}"),
        ("claimed", "the same statistic on the submitter's public trials, uncapped"),
        (
            "threat model",
            "the SoK letter of the threat model the entry's attack assumes under the track's "
            "client protocol (Carletti et al., USENIX Security 2025)",
        ),
        ("PSNR, SSIM", "claimed, over the public trials: median and worst image (dB; SSIM 0–1)"),
        ("failed trials", "trials whose attack raised, died or timed out, of all trials"),
        ("time", "median attack time per trial on the submitter's machine (s)"),
        ("status", "verified (signed by the board), unverified, or failed verification"),
    ]


def _entry_page(row: Row, board: TrackBoard, out: Path) -> dict[str, Any]:
    """Write the entry's page and its images; return what the index needs to link it."""
    stem = row.path.stem
    folder = out / slug(board.name)
    records = read_records(sibling(row.path, RECORDS_SUFFIX))
    samples = _samples(records)
    grid = _image(sibling(row.path, GRID_SUFFIX), folder / f"{stem}.grid.png")
    verification_grid = _image(
        sibling(row.path, VERIFICATION_GRID), folder / f"{stem}.verification.png"
    )
    page = {
        "href": f"{slug(board.name)}/{stem}.html",
        "row": row,
        "verification_text": verification_text(row),
        "claimed": metric(row.entry, board.ranking),
        "letter": attack_letter(row.entry),
    }
    html = (
        _environment()
        .get_template("entry.html.j2")
        .render(
            entry=row.entry,
            row=row,
            status=row.status,
            verification_text=page["verification_text"],
            board=board,
            protocol=protocol_words(board.config),
            grid=grid,
            verification_grid=verification_grid,
            samples=samples,
            psnr_bars=_histogram([s["psnr"] for s in samples], PSNR_BINS),
            ssim_bars=_histogram([s["ssim"] for s in samples], SSIM_BINS),
            options=json.dumps(row.entry["attack"]["hparams"], indent=2, sort_keys=True),
            defense_options=json.dumps(row.entry["defense"]["options"], indent=2, sort_keys=True),
            statistic=metric(row.entry, board.ranking),
            transform_words=(
                transform_words(row.entry["verification"]["private_transform"])
                if "verification" in row.entry
                else ""
            ),
        )
    )
    atomic_write_text(folder / f"{stem}.html", html)
    return page


def defense_protocol_words(board: DefenseTrackBoard) -> list[tuple[str, str]]:
    """A defense track's protocol as (heading, sentence) pairs: the attack tracks' words for
    what both share, the defense track's own for its victims and its verification."""
    shared = ("Dataset", "Client", "Threat model", "Budget", "Trials")
    words = [
        (heading, sentence)
        for heading, sentence in protocol_words(
            {**board.config, "attacks": ["bias"], "attack_options": {}}
        )
        if heading in shared
    ]
    utility = board.meta.get("utility") or {}
    words.insert(
        1,
        (
            "Victims",
            f"{board.config.get('model', 'fcn')} trained with each setting's defense active at "
            f"every step, at the track's batch size, {utility.get('epochs', 5)} epoch(s), seeds "
            f"{', '.join(str(s) for s in utility.get('seeds', [0, 1, 2]))}; the first seed's "
            "victim is the one attacked, every seed's accuracy is the utility.",
        ),
    )
    verification = board.meta.get("verification")
    if verification:
        tol = verification["tolerance"]
        words.append(
            (
                "Verification",
                f"The board re-trains the setting's attacked victim from the track's recipe (it "
                "must be the checkpoint the entry attacked), runs its own attacks, generic and "
                f"adaptive at the track's budgets, in the sandbox on {verification['trials']} "
                "unseen trials drawn with a secret seed, every private sample changed by a "
                "secret continuous transform. An entry passes when its claimed worst case is at "
                f"least the lower end of the {tol['confidence']:.0%} bootstrap interval of the "
                f"verified one, give or take {tol['margin']:g} dB (values capped at "
                f"{tol.get('ceiling', 60.0):g}); the block is signed with the board's key.",
            )
        )
    return words


def _defense_page(board: DefenseTrackBoard, out: Path) -> dict[str, Any]:
    """Write a defense track's page (its settings' table and the privacy–utility scatter);
    return what the index needs to link it."""
    config = dict(board.config)
    batch_size = config.get("batch_sizes", [1])[0]
    ceiling = (board.meta.get("verification") or {}).get("tolerance", {}).get("ceiling") or 60.0
    budgets: dict[str, dict[str, Any]] = {}
    for row in board.rows:
        for name, attack in row.entry["attacks"].items():
            budgets[name] = {"adaptive": attack["adaptive"], "budget": attack["budget"]}
    reduced = [name for name, a in sorted(budgets.items()) if "(track; published" in a["budget"]]
    budget_note = (
        f"REDUCED budgets: {', '.join(reduced)} ran below their published budgets (the track's "
        "attack_options); the table gives each budget next to the published one."
        if reduced
        else "Every attack ran at its published budget."
    )
    href = f"defense/{slug(board.name)}.html"
    html = (
        _environment()
        .get_template("defense.html.j2")
        .render(
            board=board,
            batch_size=batch_size,
            description=" ".join(board.meta.get("description", "").split()),
            protocol=defense_protocol_words(board),
            counts=board.counts(),
            rows=board.rows,
            plot=scatter(board, float(ceiling)),
            undefended=board.undefended_accuracy,
            budgets=sorted(budgets.items()),
            budget_note=budget_note,
        )
    )
    atomic_write_text(out / href, html)
    return {"href": href, "board": board, "counts": board.counts(), "batch_size": batch_size}


def build_site(
    entries_dir: Path,
    out_dir: Path,
    tracks_dir: Path = TRACKS,
    keys_dir: Path | None = None,
    defense_entries_dir: Path | None = None,
    defense_tracks_dir: Path = DEFENSE_TRACKS,
) -> list[Path]:
    """Render the site into ``out_dir`` (replacing an earlier build there); returns its files.
    Defense entries come from ``defense_entries_dir`` (default: ``defense-entries`` beside
    ``entries_dir``), one page per defense track of ``defense_tracks_dir``."""
    out_dir = Path(out_dir)
    boards = load_board(entries_dir, tracks_dir, keys_dir)  # refuses tampered entries first
    defense_boards = load_defense_board(
        Path(defense_entries_dir or Path(entries_dir).parent / "defense-entries"),
        defense_tracks_dir,
        keys_dir,
    )
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            raise ValueError(f"{out_dir} is not empty and holds no leakbench site; use another")
        shutil.rmtree(out_dir)  # a rebuild leaves no page of a removed entry behind
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for board in boards:
        tables = []
        for b in sorted(board.tables):
            pages = [_entry_page(r, board, out_dir) for r in board.tables[b]]
            tables.append(
                {
                    "batch_size": b,
                    "parts": [
                        (status, [p for p in pages if p["row"].status == status])
                        for status in STATUSES
                    ],
                    "counts": board.counts(board.tables[b]),
                }
            )
        sections.append(
            {
                "board": board,
                "anchor": slug(board.name),
                "description": " ".join(board.meta.get("description", "").split()),
                "protocol": protocol_words(board.config),
                "ranking_words": statistic_words(board.ranking),
                "tables": tables,
                "columns": column_words(board),
                "ceiling": board.ceiling,
            }
        )
    defense_pages = [_defense_page(board, out_dir) for board in defense_boards]
    html = (
        _environment()
        .get_template("index.html.j2")
        .render(
            sections=sections,
            defense_pages=defense_pages,
            threat_models=threat_model_choices(),
        )
    )
    atomic_write_text(out_dir / "index.html", html)
    for name in STATIC:
        atomic_write_bytes(out_dir / name, (TEMPLATES / name).read_bytes())
    atomic_write_text(out_dir / MARKER, "built by leakbench leaderboard build\n")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
