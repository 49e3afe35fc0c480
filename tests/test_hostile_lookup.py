"""Attacks that look their answer up in the public dataset, against the secret transform.

The enumerator and the memoriser (``tests/plugins/hostile_lookup``, installed as a real
distribution and run in the attack sandbox) never see the ground truth: they choose public
images by gradient match. On a track's public trials the private sample *is* a public image, so
both find it exactly; under the track's private transform both score no more than the track's
lookup bound (``verification.lookup_bound``, measured by ``leakbench leaderboard lookup-bound``).
"""

from __future__ import annotations

import json

import pytest

from leakbench.config import RunConfig
from leakbench.leaderboard.entry import TRACKS, load_track
from leakbench.protocol.sandbox import sandbox_unavailable
from leakbench.runner import run

LOOKUPS = ("hostile-enumerator", "hostile-memoriser")
EXACT_DB = 100.0

pytestmark = pytest.mark.skipif(
    sandbox_unavailable() is not None,
    reason=f"no attack sandbox on this machine: {sandbox_unavailable()}",
)


def run_track(tmp_path, name, transform=None, seed=None, trials=3, attacks=LOOKUPS):
    """The lookups on ``trials`` trials of track ``name``; per attack, every sample's PSNR.
    They are granted the batch size also where the track does not grant it (fishing's): an
    attacker told more that stays under the bound stays under it told less."""
    track = load_track(name)
    values = dict(track)
    values.update(
        grants=sorted({*track.get("grants", []), "batch_size"}),
        attacks=list(attacks),
        attack_options={attack: {} for attack in attacks},
        trials=trials,
        isolation="sandbox",
        threads=1,
        covariates=[],
        privacy_metrics=False,
        logger="none",
        output_dir=str(tmp_path),
        run_name="run",
    )
    if seed is not None:
        values["seed"] = seed
    if transform is not None:
        values["private_transform"] = transform
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    scores: dict[str, list[float]] = {attack: [] for attack in attacks}
    for path in sorted((tmp_path / "run").glob("trials*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert row["status"] == "ok", row["error"]
            scores[row["attack"]] += [s["psnr"] for s in row["metrics"]["samples"]]
    return track, scores


def secret_transform(track, seed):
    return {"seed": seed, **track["track"]["verification"]["private_transform"]}


def check_lookups(tmp_path, name):
    track, public = run_track(tmp_path / "public", name)
    for attack, psnrs in public.items():
        assert len(psnrs) == 3 * sum(track["batch_sizes"])
        assert min(psnrs) >= EXACT_DB, (attack, psnrs)  # the public trials: found exactly
    transform = secret_transform(track, seed=20240917)
    _, private = run_track(tmp_path / "private", name, transform, seed=7)
    bound = track["track"]["verification"]["lookup_bound"]["psnr_max"]
    for attack, psnrs in private.items():
        assert max(psnrs) <= bound, (attack, psnrs, bound)
    return public, private


def test_lookups_find_public_samples_and_not_transformed_ones(tmp_path, hostile_site):
    check_lookups(tmp_path, "lfw-subset-lenet-zhu-b1")  # nightly: every shipped track (below)


def test_the_enumerator_beats_a_transform_drawn_from_a_list(tmp_path, hostile_site):
    """The control: a mirror and a brightness gain (what the earlier transform offered, less
    its whole-pixel shifts) leave the image in the enumerator's list, up to one number it
    searches; it finds the image and the gain."""
    listed = {
        "seed": 20240917,
        **dict(crop_scale=[1, 1], crop_ratio=[1, 1], rotation=0.0, flip=True, brightness=0.1),
        **dict(contrast=0.0, colour=0.0, blur=[0, 0], noise=0.0),
    }
    _, scores = run_track(
        tmp_path, "lfw-subset-lenet-zhu-b1", listed, seed=7, attacks=["hostile-enumerator"]
    )
    assert min(scores["hostile-enumerator"]) > 60


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in TRACKS.glob("*.yaml")))
def test_lookups_stay_under_every_shipped_tracks_bound(tmp_path, hostile_site, name):
    check_lookups(tmp_path, name)
