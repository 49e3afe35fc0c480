"""``leakbench leaderboard figures``: each committed entry's figures, read from its records, the
run's next to the verification's, beside the figure its method expects and the figures its paper
reports.

Everything comes from what an entry ships: its ``<name>.json``, its ``<name>.records.jsonl``
(the submitter's run on the public draw) and, once verified, its
``<name>.verification.jsonl`` (the board's re-run on unseen, secretly transformed trials). An
entry is read through :func:`leakbench.leaderboard.entry.load_entry`, so a tampered entry, a
changed records file or an unsigned verification is refused with its reason, never shown. The
private data is never read: the records hold every figure (per-image scores, the batch's labels
and the labels the attack restored).

Figures per entry, each for the run and for the verification (the canonical aggregates of
:mod:`leakbench.metrics`, over every ground-truth image of every trial, failed trials included
through their null scores):

* trials and failed trials;
* PSNR median and scale-aligned PSNR median (dB);
* the fraction of images at PSNR ≥ ``exact_psnr`` (100 dB by default: an MSE of 1e-10, far
  below one 8-bit grey level and far above float32 rounding, so "exact") and at the track's
  success threshold τ (``success_psnr``);
* image identifiability (IIP, pixel distance), where the records score it;
* for attacks that restore labels: the trials whose restored label multiset equals the batch's,
  and the labels restored (the multisets' intersection), :func:`leakbench.metrics.label_multisets`.

**The method's expected figure.** Where the method itself predicts a figure (:data:`EXPECTED`),
it is printed next to the measured one: for Robbing the Fed, the chance that a sample is alone
in its bin, (1 − 1/k)^(B − 1) for k equally likely bins
(:func:`leakbench.attacks.robbing_the_fed.expected_recovered_fraction`; that module needs torch,
so only a track with such an entry loads it).

**The papers' figures** (:data:`PAPERS`): what each attack's paper reports, with the table or
figure and its setting, and what it compares with here. Where a paper's numbers could not be
read, the output says so; no number is filled in.

Steps, per track as the code runs them:

1. The track file (its threat-model letter, dataset, model, verification trials).
2. Per entry (``<entries>/<track>/*.json``, by name): the entry loaded and checked; a refused
   entry is reported in one line and the others are still shown.
3. The run's figures from the records, the verification's from the verification records.
4. The method's expected figure, where :data:`EXPECTED` has one for the attack.
5. The papers' figures of the attacks the entries ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakbench.leaderboard.entry import (
    RECORDS_SUFFIX,
    TRACKS,
    EntryError,
    load_entry,
    load_track,
    read_records,
    sibling,
)
from leakbench.leaderboard.verify import VERIFICATION_RECORDS

# An MSE of 1e-10 on [0, 1] pixels: far below one 8-bit grey level, far above float32 rounding.
EXACT_PSNR = 100.0


@dataclass(frozen=True)
class Side:
    """The figures of one set of records: the run's or the verification's."""

    trials: int
    failed: int
    psnr_median: float | None
    aligned_median: float | None
    exact_rate: float | None
    success_rate: float | None
    iip_rate: float | None
    label_multisets: dict[str, int]


@dataclass(frozen=True)
class Expected:
    """A figure the method predicts for the fraction of exactly recovered images."""

    value: float
    formula: str


@dataclass(frozen=True)
class EntryFigures:
    name: str
    attack: str
    batch_size: int
    client_protocol: str
    run: Side
    verification: Side | None
    verdict: str  # "passed", "failed" or "unverified"
    expected: Expected | None


@dataclass(frozen=True)
class PaperFigure:
    """One figure a paper reports, with where and under which setting."""

    where: str  # table or figure
    setting: str
    figure: str
    compare: str  # what it compares with here, and how far


@dataclass(frozen=True)
class Paper:
    citation: str
    figures: tuple[PaperFigure, ...]
    sources: str  # where the figures were read
    missing: str  # what could not be found


def side(records: Sequence[Mapping[str, Any]], success_psnr: float, exact_psnr: float) -> Side:
    """Step 3: one set of records' figures, by the canonical aggregates."""
    from leakbench.metrics import aggregate, label_multisets, psnr_rate

    records = [dict(r) for r in records]
    summary = aggregate(records)
    iip = summary.get("iip_pixel")
    return Side(
        trials=summary["trials"],
        failed=summary["failed"],
        psnr_median=summary["psnr"]["median"],
        aligned_median=summary["psnr_scale_aligned"]["median"],
        exact_rate=psnr_rate(records, exact_psnr),
        success_rate=psnr_rate(records, success_psnr),
        iip_rate=iip["rate"] if iip else None,
        label_multisets=label_multisets(records),
    )


def _imprint_expected(entry: Mapping[str, Any]) -> Expected:
    from leakbench.attacks.robbing_the_fed import expected_recovered_fraction

    bins, batch = entry["attack"]["hparams"]["bins"], entry["protocol"]["batch_size"]
    return Expected(
        expected_recovered_fraction(bins, batch),
        f"(1 - 1/k)^(B - 1), k = {bins} equally likely bins, B = {batch} (FedSGD)",
    )


# attack -> the fraction of exactly recovered images its method predicts for an entry.
EXPECTED: dict[str, Callable[[Mapping[str, Any]], Expected]] = {
    "robbing-the-fed": _imprint_expected,
}


def entry_figures(
    path: Path, tracks_dir: Path = TRACKS, keys_dir: Path | None = None, *, exact_psnr: float
) -> EntryFigures:
    """Steps 2-4 for one entry: load it (refused unless intact), its run's and its
    verification's figures, and the method's expected figure."""
    entry = load_entry(path, tracks_dir, keys_dir)
    success_psnr = entry["protocol"]["success_psnr"]
    records = read_records(sibling(path, RECORDS_SUFFIX))
    verification = None
    verdict = "unverified"
    if "verification" in entry:  # load_entry checked the signature and the records' hash
        verified = read_records(sibling(path, VERIFICATION_RECORDS))
        verification = side(verified, success_psnr, exact_psnr)
        verdict = "passed" if entry["verification"]["passed"] else "failed"
    expected = EXPECTED.get(entry["attack"]["name"])
    return EntryFigures(
        name=path.stem,
        attack=entry["attack"]["name"],
        batch_size=entry["protocol"]["batch_size"],
        client_protocol=records[0]["client_protocol"]["name"] if records else "?",
        run=side(records, success_psnr, exact_psnr),
        verification=verification,
        verdict=verdict,
        expected=expected(entry) if expected else None,
    )


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _labels(counts: dict[str, int], key: str, total: str) -> str:
    return f"{counts[key]}/{counts[total]}"


def entry_report(figures: EntryFigures, success_psnr: float, exact_psnr: float) -> list[str]:
    """The lines of one entry: a row per figure, the run's and the verification's side by
    side, the method's expectation beside the fraction of exactly recovered images."""
    run, verified = figures.run, figures.verification
    expected = figures.expected
    rows: list[tuple[str, Callable[[Side], str], str]] = [
        ("trials (failed)", lambda s: f"{s.trials} ({s.failed})", ""),
        ("PSNR median (dB)", lambda s: _number(s.psnr_median, 2), ""),
        ("scale-aligned PSNR median (dB)", lambda s: _number(s.aligned_median, 2), ""),
        (
            f"images at >= {exact_psnr:g} dB (exact)",
            lambda s: _number(s.exact_rate, 3),
            f"   expected {expected.value:.3f}: {expected.formula}" if expected else "",
        ),
        (
            f"images at >= {success_psnr:g} dB (success)",
            lambda s: _number(s.success_rate, 3),
            "",
        ),
    ]
    if run.iip_rate is not None:
        rows.append(("image identifiability (pixel)", lambda s: _number(s.iip_rate, 3), ""))
    # Label rows where the attack restored labels in a trial of either side.
    if any(s.label_multisets["reported"] for s in (run, verified) if s is not None):
        rows += [
            (
                "label multisets exact (trials)",
                lambda s: _labels(s.label_multisets, "exact", "trials"),
                "",
            ),
            (
                "labels restored (multiset)",
                lambda s: _labels(s.label_multisets, "restored", "labels"),
                "",
            ),
        ]
    lines = [
        f"  {figures.name}: {figures.attack}, B = {figures.batch_size}, "
        f"{figures.client_protocol}; verification {figures.verdict}",
        f"    {'':<38}{'run':>12}{'verified':>12}",
    ]
    for label, cell, note in rows:
        lines.append(
            f"    {label:<38}{cell(run):>12}{cell(verified) if verified else '-':>12}{note}"
        )
    return lines


# Each new attack's paper: the figures it reports that our tracks can be set against. Read with
# the search tools of this project's sessions; see ``sources`` for where.
PAPERS: dict[str, Paper] = {
    "robbing-the-fed": Paper(
        citation='Fowl et al., "Robbing the Fed", ICLR 2022',
        figures=(
            PaperFigure(
                where="the authors' repository (lhfowl/robbing_the_fed, README teaser)",
                setting="one batch of 64 ImageNet images, imprint block of 128 bins in front "
                "of a ResNet-18, FedSGD",
                figure="average PSNR 70.94 dB",
                compare="one batch, mean PSNR; at k = 128, B = 64 the bin formula expects "
                "(127/128)^63 = 0.61 of the images exact, here k = 2048 (0.970 at B = 64)",
            ),
        ),
        sources="the authors' repository README; the paper's tables were not readable here",
        missing="the paper's own tables and figures (recovered fraction against bins and batch "
        "size) could not be read with the available search tools; no number of them is given",
    ),
    "cocktail-party": Paper(
        citation='Kariyappa et al., "Cocktail Party Attack", ICML 2023',
        figures=(),
        sources="the authors' repository (facebookresearch/cocktail_party_attack) gives "
        "commands and hyperparameter ranges, no results",
        missing="no figure of the paper could be read (its abstract claims recovery at batch "
        "sizes up to 1024; the authors' README runs an FC-2 on Tiny-ImageNet and VGG-16 on "
        "ImageNet and picks hyperparameters by LPIPS); no number is given",
    ),
    "gradinversion": Paper(
        citation='Yin et al., "See through Gradients: GradInversion", CVPR 2021',
        figures=(
            PaperFigure(
                where="Table 1",
                setting="ImageNet, ResNet-50, B = 8, 10K random samples without repeated labels",
                figure="label restoration accuracy 99.56 % (the batch sum rule extended from "
                "iDLG: 95.89 %)",
                compare="labels restored (multiset) here, on lfw-subset's 2 classes, where labels "
                "repeat",
            ),
            PaperFigure(
                where="Table 2 (ablation)",
                setting="ImageNet, ResNet-50, B = 8",
                figure="PSNR 10.753 (gradient matching only), 12.058 (+ fidelity: TV, l2, "
                "BatchNorm statistics), 12.524 (+ group consistency, mean), 12.929 dB (+ group "
                "consistency, registered); LPIPS 0.919 to 0.484",
                compare="PSNR median here, at a budget of 4 steps of a group of 2",
            ),
            PaperFigure(
                where="Figure 8",
                setting="ImageNet validation, ResNet-50, B = 48",
                figure="image identifiability precision about 28 % (read off a curve; nearest "
                "neighbours in avgpool feature space)",
                compare="image identifiability (pixel) here, which searches pixel space",
            ),
        ),
        sources="a summary of the paper in a public repository (found by text search; the "
        "figures are quoted there with their table numbers), not the PDF itself",
        missing="the paper's Table 4 (GradInversion against Inverting Gradients on ImageNet) "
        "could not be read; confirm the figures above against the paper before quoting them",
    ),
}


def paper_report(attacks: Sequence[str]) -> list[str]:
    """The papers' figures of the attacks a track's entries ran."""
    lines: list[str] = []
    for attack in attacks:
        paper = PAPERS.get(attack)
        if paper is None:
            continue
        lines.append(f"  paper of {attack}: {paper.citation}")
        for f in paper.figures:
            lines.append(f"    {f.where} ({f.setting}): {f.figure}")
            lines.append(f"      compare: {f.compare}")
        lines.append(f"    read from: {paper.sources}")
        lines.append(f"    not found: {paper.missing}")
    return lines


def _by_name_and_batch_size(path: Path) -> tuple[str, int]:
    """``<name>-b<B>.json`` in order of name, then of B as a number."""
    name, _, batch = path.stem.rpartition("-b")
    return (name, int(batch)) if batch.isdigit() else (path.stem, 0)


def track_report(
    track: str,
    entries_dir: Path,
    tracks_dir: Path = TRACKS,
    keys_dir: Path | None = None,
    *,
    exact_psnr: float = EXACT_PSNR,
) -> tuple[list[str], list[str]]:
    """Steps 1-5 for one track: its lines, and the refusals of its entries (one line each)."""
    from leakbench.metrics import DEFAULT_SUCCESS_PSNR

    config = load_track(track, tracks_dir)
    block = config["track"]
    success_psnr = config.get("success_psnr", DEFAULT_SUCCESS_PSNR)
    lines = [
        f"{track} (SoK threat model {block.get('threat_model', '-')}; {config['dataset']}, "
        f"{config['model']}; success at {success_psnr:g} dB; verification: "
        f"{block.get('verification', {}).get('trials', '-')} unseen transformed trials)"
    ]
    refused: list[str] = []
    attacks: list[str] = []
    paths = sorted(Path(entries_dir, track).glob("*.json"), key=_by_name_and_batch_size)
    if not paths:
        lines.append("  no entries")
    for path in paths:
        try:
            figures = entry_figures(path, tracks_dir, keys_dir, exact_psnr=exact_psnr)
        except EntryError as exc:
            refused.append(str(exc))
            continue
        lines += entry_report(figures, success_psnr, exact_psnr)
        if figures.attack not in attacks:
            attacks.append(figures.attack)
    return lines + paper_report(attacks), refused
