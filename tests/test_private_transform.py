"""Verification data that no list holds: the secret transform, the lookup bound it leaves on
each shipped track, and the maintainers' private verification source."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tests.components  # noqa: F401  (registers the test attacks)
from leakbench.cli import main
from leakbench.config import RunConfig
from leakbench.datamodules.fixtures import write_lfw_fixture
from leakbench.leaderboard.entry import TRACKS, EntryError, load_schema, load_track
from leakbench.leaderboard.lookup import measure, nearest_psnr, shifted_and_flipped
from leakbench.leaderboard.private_data import verification_data
from leakbench.metrics import DEFAULT_SUCCESS_PSNR
from leakbench.protocol.private_transform import DEFAULTS, PrivateTransform, describe
from leakbench.runner import PRIVATE_DATA_ENV, run

SHIPPED = sorted(p.stem for p in TRACKS.glob("*.yaml"))
# Only geometry: a crop box, a turn and a mirror, resampled once.
GEOMETRY = dict(brightness=0.0, contrast=0.0, colour=0.0, blur=(0.0, 0.0), noise=0.0)
IDENTITY = dict(GEOMETRY, crop_scale=(1, 1), crop_ratio=(1, 1), rotation=0.0, flip=False)
# The lookup bound's required distance below a claim at the ceiling, beyond the margin (dB).
LOOKUP_GAP_DB = 20.0


def normalised(images, mean, std):
    return (images - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def test_the_private_transform_is_seeded_and_changes_every_sample():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    inputs = normalised(images, mean, std)
    transform = PrivateTransform(seed=7)
    once = transform(inputs, trial=3, mean=mean, std=std)
    assert once.dtype == inputs.dtype and once.shape == inputs.shape
    assert torch.equal(once, transform(inputs, trial=3, mean=mean, std=std))
    assert not torch.allclose(once, transform(inputs, trial=4, mean=mean, std=std))
    assert not torch.allclose(once, PrivateTransform(seed=8)(inputs, 3, mean, std))
    assert all(not torch.allclose(a, b) for a, b in zip(once, inputs, strict=True))
    pixels = once * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # A 128-bit seed, as verification draws it, works and is a different stream.
    big = PrivateTransform(seed=2**127 + 7)(inputs, 3, mean, std)
    assert not torch.allclose(big, once)


def test_with_every_option_at_its_identity_the_transform_returns_its_input():
    pixels = torch.rand(
        3, 3, 9, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    out = PrivateTransform(seed=3, **IDENTITY).pixels(pixels, trial=0)
    assert torch.allclose(out, pixels, rtol=0, atol=1e-12)


def test_the_geometry_is_a_continuous_crop_box_turned_and_mirrored():
    """On a linear ramp, bilinear resampling is exact: each output pixel holds the ramp's value
    at the point the drawn crop box, angle and mirror send it to."""
    size = 32
    u = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1  # pixel centres in [-1, 1]
    ramp = (0.5 + 0.3 * u[None, :] - 0.15 * u[:, None])[None]  # (1, H, W): x along W
    options = dict(GEOMETRY, crop_scale=(0.3, 0.4), crop_ratio=(0.8, 1.25), rotation=25.0)
    transform = PrivateTransform(seed=11, **options, flip=True)
    changes = transform.draw(trial=2, count=16, shape=ramp.shape)
    out = transform.pixels(ramp[None].repeat(16, 1, 1, 1), trial=2)
    assert {c.flipped for c in changes} == {True, False}
    assert len({c.crop for c in changes}) == 16  # continuous: no two boxes alike
    for image, change in zip(out, changes, strict=True):
        width, height, cx, cy = change.crop
        assert 0.3 - 1e-12 <= width * height <= 0.4 + 1e-12
        assert 0.8 - 1e-12 <= width / height <= 1.25 + 1e-12
        assert abs(change.angle) <= math.radians(25)
        x = u[None, :] * width * (-1 if change.flipped else 1)
        y = u[:, None] * height
        cos, sin = math.cos(change.angle), math.sin(change.angle)
        source_x, source_y = cos * x - sin * y + cx, sin * x + cos * y + cy
        expected = 0.5 + 0.3 * source_x - 0.15 * source_y
        # Where the turned box leaves the span of pixel centres the image is reflected.
        inside = (source_x.abs() <= u[-1]) & (source_y.abs() <= u[-1])
        assert inside.float().mean() > 0.9
        assert torch.allclose(image[0][inside], expected[inside], atol=1e-12)


def test_colour_blur_and_noise_follow_their_draws():
    generator = torch.Generator().manual_seed(2)
    pixels = 0.2 + 0.6 * torch.rand(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    colour = PrivateTransform(seed=5, **dict(IDENTITY, brightness=0.2, contrast=0.3, colour=0.1))
    for image, change, out in zip(
        pixels, colour.draw(0, 2, pixels.shape[1:]), colour.pixels(pixels, 0), strict=True
    ):
        gains = torch.tensor(change.channel_gains, dtype=torch.float64).view(-1, 1, 1)
        mean = image.mean()
        expected = (((image - mean) * change.contrast + mean) * change.brightness * gains).clamp(
            0, 1
        )
        assert torch.allclose(out, expected, atol=1e-12)
        assert len(set(change.channel_gains)) == 3  # per-channel colour on RGB
    grey = colour.draw(0, 2, (1, 16, 16))
    assert all(c.channel_gains == (1.0,) for c in grey)  # grey: no second brightness

    # A centred point spreads into a Gaussian of the drawn width.
    point = torch.zeros(1, 1, 33, 33, dtype=torch.float64)
    point[..., 16, 16] = 0.5
    blur = PrivateTransform(seed=6, **dict(IDENTITY, blur=(1.5, 2.0)))
    (sigma,) = (c.blur_sigma for c in blur.draw(0, 1, point.shape[1:]))
    spread = blur.pixels(point, 0)[0, 0]
    offsets = torch.arange(33, dtype=torch.float64) - 16
    assert spread.sum() == pytest.approx(0.5, rel=1e-9)
    variance = float((spread.sum(0) * offsets**2).sum() / spread.sum())
    assert variance == pytest.approx(sigma**2, rel=0.05)  # sampled and cut at ⌈3σ⌉ taps

    # The noise has the drawn σ on every pixel, also on black and white images: the squeeze
    # into [2σ, 1 − 2σ] keeps the clamp from cutting it away.
    flat = torch.cat([torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 64, 64)]).double()
    noisy = PrivateTransform(seed=9, **dict(IDENTITY, noise=0.04))
    difference = noisy.pixels(flat, 0) - noisy.pixels(flat, 0, noise=False)
    for sample in difference:
        assert float(sample.std()) == pytest.approx(0.04, rel=0.05)
    assert torch.allclose(
        noisy.pixels(flat, 0, noise=False)[0], torch.full((64, 64), 0.08).double()
    )


def test_each_option_changes_only_its_own_step():
    shape = (1, 8, 8)
    plain = PrivateTransform(seed=4).draw(1, 3, shape)
    turned = PrivateTransform(seed=4, rotation=0.0, blur=(0.5, 0.5)).draw(1, 3, shape)
    for a, b in zip(plain, turned, strict=True):
        assert a.crop == b.crop and a.flipped == b.flipped and a.brightness == b.brightness
        assert torch.equal(a.noise, b.noise)
        assert b.angle == 0 and b.blur_sigma == 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_shift": 1}, "unknown key max_shift; it takes seed, crop_scale"),
        ({"seed": 1, "shift": 1, "flips": True}, "unknown keys flips, shift;"),
        ({"noise": 0.1}, "private_transform: no seed; it takes seed,"),
        ({"seed": 1, "crop_scale": [0.9, 0.5]}, "crop_scale must be [low, high], got [0.9, 0.5]"),
        ({"seed": 1, "crop_scale": [0.5, 1.5]}, "needs crop_scale within (0, 1]"),
        ({"seed": 1, "brightness": 1.5, "noise": -1}, "brightness in [0, 1) (got 1.5); noise"),
    ],
)
def test_bad_transform_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError) as info:
        PrivateTransform.from_options(options)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_track_uses_the_documented_transform(name):
    options = load_track(name)["track"]["verification"]["private_transform"]
    assert PrivateTransform.from_options({**options, "seed": 1}) == PrivateTransform(seed=1)
    assert set(options) == set(DEFAULTS)  # every parameter written out in the track


@pytest.mark.parametrize("name", SHIPPED)
def test_a_verification_block_can_record_every_shipped_transform(name):
    import jsonschema

    schema = load_schema()["properties"]["verification"]["properties"]["private_transform"]
    options = load_track(name)["track"]["verification"]["private_transform"]
    jsonschema.validate(options, schema)
    with pytest.raises(jsonschema.ValidationError, match="max_shift"):
        jsonschema.validate({**options, "max_shift": 2}, schema)


def test_the_transform_says_what_it_does():
    options = load_track("lfw-subset-cnn6-b1")["track"]["verification"]["private_transform"]
    assert describe(options) == (
        "cropped to a box of 70%–100% of its area (aspect ratio 0.85–1.18) anywhere inside it, "
        "turned by up to ±8°, mirrored with probability 1/2, its contrast and brightness scaled "
        "by up to ±15% and ±15% (each colour channel by up to ±10%), blurred (σ 0.2–0.6 px) and "
        "given Gaussian noise of σ 0.04 on every pixel"
    )
    assert "mirrored" not in describe({"flip": False})


def test_the_nearest_public_image_oracle_undoes_shifts_mirrors_and_gains():
    public = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(3)).double()
    candidates = shifted_and_flipped(public, 2)
    assert candidates.shape == (5 * 2 * 25, 1, 12, 12)
    assert any(torch.equal(c, public[3]) for c in candidates)
    # Image 3 mirrored, moved one pixel up and two right (edges replicated), times 0.8.
    padded = torch.nn.functional.pad(public[3:4].flip(-1), (2, 2, 2, 2), mode="replicate")[0]
    dy, dx = -1, 2
    moved = padded[:, 2 - dy : 2 - dy + 12, 2 - dx : 2 - dx + 12]
    assert nearest_psnr(candidates, 0.8 * moved) > 250
    assert nearest_psnr(shifted_and_flipped(public[:3]), 0.8 * moved) < 20
    assert nearest_psnr(candidates, torch.rand(1, 12, 12).double()) < 20


def test_the_noise_floor_is_the_noise():
    track = load_track("lfw-subset-lenet-zhu-b1")
    figures = measure(track, 3)
    assert figures.public_images == 200 and figures.source == "lfw-subset/test"
    sigma = track["track"]["verification"]["private_transform"]["noise"]
    for floor in figures.noise_floor:
        assert floor == pytest.approx(-20 * math.log10(sigma), abs=1.0)
    assert all(a < b for a, b in zip(figures.nearest, figures.noise_floor, strict=True))
    assert measure(track, 3) == figures  # same seed, same figures


def test_the_lookup_bound_command_prints_figures_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["leaderboard", "lookup-bound"]
    assert main([*command, "lfw-subset-fcn-exan-b4", "--trials", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lfw-subset-fcn-exan-b4: 2 samples of lfw-subset/test")
    assert "(a) nearest public image" in lines[1] and "(b) exact transform" in lines[2]
    bound = json.loads(lines[4].split("verification.lookup_bound: ")[1])
    assert bound["measured_with"] == (
        "leakbench leaderboard lookup-bound lfw-subset-fcn-exan-b4 --trials 2"
    )
    assert list(tmp_path.iterdir()) == []
    for bad, message in (
        (["no-such-track"], "unknown track 'no-such-track'"),
        (["lfw-subset-cnn6-b1", "--trials", "0"], "--trials must be at least 1, got 0"),
    ):
        assert main([*command, *bad]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_track_leaves_a_clear_gap_above_its_lookup_bound(name):
    """A lookup's verified figure must fail a claim at the ceiling by far more than the margin
    and the spread of unseen samples, and never count as a success (success_psnr): a claim
    at the ceiling passes only when the verification measures at least ceiling − margin (and
    the interval's upper end is at most the largest sample), so the bound must sit at least
    ``LOOKUP_GAP_DB`` below that (a factor 100 in MSE)."""
    track = load_track(name)
    verification = track["track"]["verification"]
    bound, tolerance = verification["lookup_bound"], verification["tolerance"]
    assert bound["measured_with"].startswith(f"leakbench leaderboard lookup-bound {name} --trials ")
    trials = int(bound["measured_with"].split("--trials ")[1].split()[0])
    assert trials >= 200
    assert bound["psnr_median"] <= bound["psnr_max"]
    assert tolerance["ceiling"] - tolerance["margin"] - bound["psnr_max"] >= LOOKUP_GAP_DB
    assert bound["psnr_max"] < track.get("success_psnr", DEFAULT_SUCCESS_PSNR)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_recorded_lookup_bound_is_what_the_command_measures(name):
    track = load_track(name)
    bound = track["track"]["verification"]["lookup_bound"]
    trials = int(bound["measured_with"].split("--trials ")[1].split()[0])
    assert measure(track, trials).bound(trials, 0) == bound


# The maintainers' private verification source.


def lfw_track(**options):
    """The LeNet track with a private LFW source; by default options that make two classes of
    the fixture (the identities with 21 and 22 images)."""
    track = load_track("lfw-subset-lenet-zhu-b1")
    spec = track["track"]["verification"]["private_dataset"]
    spec["dataset_options"].update({"min_images_per_identity": 21, **options})
    return track


def test_verification_runs_on_the_public_split_without_private_data(monkeypatch, tmp_path):
    monkeypatch.delenv(PRIVATE_DATA_ENV, raising=False)
    data = verification_data(lfw_track())
    assert not data.private
    assert data.keys == {"dataset": "lfw-subset", "dataset_options": {}, "split": "test"}
    assert data.description == "public split lfw-subset/test with the secret transform"
    monkeypatch.setenv(PRIVATE_DATA_ENV, str(tmp_path))  # set, but holding no lfw/
    data = verification_data(lfw_track())
    assert not data.private and data.keys["dataset"] == "lfw-subset"
    assert data.description.endswith(f"({PRIVATE_DATA_ENV} holds no lfw)")
    assert str(tmp_path) not in data.description


def test_verification_runs_on_private_data_where_the_maintainers_hold_it(monkeypatch, tmp_path):
    write_lfw_fixture(tmp_path / "lfw")
    monkeypatch.setenv(PRIVATE_DATA_ENV, str(tmp_path))
    track = lfw_track()
    data = verification_data(track)
    assert data.private
    assert data.keys["dataset"] == "lfw" and data.keys["split"] == "test"
    assert data.keys["dataset_options"]["root"] == f"{tmp_path}/lfw"
    # 25% of each of the two identities' images (21 and 22) are held out for test.
    assert data.description == "private: lfw/test, 11 images, with the secret transform"

    # A run on it, as verification makes one: the client trains on transformed private faces.
    values = {**track, **data.keys}
    values.update(
        attacks=["noisy-copy-test"],
        attack_options={},
        trials=2,
        seed=5,
        private_transform={"seed": 3, **track["track"]["verification"]["private_transform"]},
        isolation="process",
        output_dir=str(tmp_path / "runs"),
        run_name="run",
        logger="none",
        threads=1,
        covariates=[],
        privacy_metrics=False,
    )
    run(RunConfig.from_mapping(values), progress=False, echo=lambda _: None)
    rows = [
        json.loads(line)
        for path in (tmp_path / "runs" / "run").glob("trials*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert all(i.startswith("lfw/") for r in rows for i in r["sample_ids"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"min_images_per_identity": 20},
            "verification.private_dataset (lfw) gives inputs of shape [1, 25, 25] in 5 classes; "
            "the track's victim takes [1, 25, 25] in 2 classes",
        ),
        ({"min_images_per_identity": 200}, "no identity has at least 200 images"),
        ({"resolution": 32}, "gives inputs of shape [1, 32, 32] in 2 classes"),
        ({"root": "/srv/lfw"}, "its dataset_options must put the data under {private}"),
    ],
)
def test_a_private_source_that_changes_the_track_is_refused(monkeypatch, tmp_path, change, message):
    write_lfw_fixture(tmp_path / "lfw")
    monkeypatch.setenv(PRIVATE_DATA_ENV, str(tmp_path))
    with pytest.raises(EntryError) as info:
        verification_data(lfw_track(**change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_private_source_with_an_unknown_key_is_refused(monkeypatch):
    monkeypatch.delenv(PRIVATE_DATA_ENV, raising=False)
    track = lfw_track()
    track["track"]["verification"]["private_dataset"]["root"] = "{private}/lfw"
    with pytest.raises(EntryError, match="unknown key root; it takes dataset, dataset_options"):
        verification_data(track)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_private_source_is_well_formed(monkeypatch, name):
    """Without the private folder, each shipped track verifies on its own public split."""
    monkeypatch.delenv(PRIVATE_DATA_ENV, raising=False)
    track = load_track(name)
    data = verification_data(track)
    dataset, split = track["dataset"], track["split"]
    options = track.get("dataset_options", {})
    assert data.keys == {"dataset": dataset, "dataset_options": options, "split": split}
    assert data.description == f"public split {dataset}/{split} with the secret transform"
