"""W&B as its users expect, checked in the files of an offline run: the images hold the very
pixels of the cell figures, the run summary holds the cell aggregates of summary.json, one table
per cell holds every sample, the records are one artifact, and the config holds the environment.

wandb 0.31 writes no ``wandb-summary.json`` offline and has no Python reader of its ``.wandb``
transaction log: :func:`transaction_log` reads it (a LevelDB-style log of ``Record`` protobufs
behind a 7-byte header, in 32 KiB blocks) with wandb's own protobuf classes.
"""

import base64
import contextlib
import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import wandb
from PIL import Image

from leakbench.evaluator import artifact_name
from leakbench.leaderboard.entry import wandb_run as entry_wandb_run
from leakbench.runner import run, wandb_configured
from tests.components import small_bias_run

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("wandb")

BLOCK = 32 * 1024
HEADER = b":W&B"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def transaction_log(path: Path) -> list:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == HEADER, f"{path} is not a W&B transaction log"
    records, chunk, position = [], b"", 7
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            position += left
            continue
        chunk += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
        else:
            assert kind in (FIRST, MIDDLE), f"unknown record kind {kind}"
    return records


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One tiny offline W&B run (two cells), shared by the checks of this module, with what it
    printed (W&B's own output is not silenced here by WANDB_SILENT: the run silences it)."""
    root = tmp_path_factory.mktemp("wandb")
    printed, lines = io.StringIO(), []
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_SILENT"):
            patch.delenv(variable, raising=False)
        patch.setenv("WANDB_MODE", "offline")
        for variable in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR", "ARTIFACT_DIR"):
            patch.setenv(f"WANDB_{variable}", str(root / variable.lower()))
        # W&B reads its settings (the mode among them) once per process, at its first run: an
        # earlier test's run under WANDB_MODE=disabled would make this one disabled too.
        wandb.teardown()
        config = small_bias_run(root / "out", run_name="wb", logger="wandb")
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            summary = run(config, progress=False, echo=lines.append)
            # finish() may return before wandb-core has written the log; teardown waits.
            wandb.teardown()
    run_dir = root / "out" / "wb"
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    return summary, run_dir, folder, transaction_log(log), (lines, printed.getvalue())


def summary_values(records: list) -> dict:
    """The run summary as W&B holds it at the end: later updates win, nested keys joined."""
    values: dict = {}
    for summary in of_type(records, "summary"):
        for item in summary.update:
            key = item.key or "/".join(item.nested_key)
            values[key] = json.loads(item.value_json)
    return values


def test_logged_figures_hold_exactly_the_pixels_of_the_cell_figures(wandb_run):
    summary, run_dir, folder, _, _ = wandb_run
    for cell in summary["cells"]:
        (logged,) = (folder / "files" / "media" / "images" / cell).glob("figure_*.png")
        with Image.open(logged) as image:
            pixels = np.asarray(image.convert("RGB"))
        with Image.open(run_dir / "figures" / f"{cell}.png") as image:
            expected = np.asarray(image.convert("RGB"))
        assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
        assert np.array_equal(pixels, expected)
        assert pixels.max() == 255 and pixels.min() < 64  # a white figure with dark text


def test_summary_holds_the_cell_aggregates_of_summary_json(wandb_run):
    summary, run_dir, _, records, _ = wandb_run
    values = summary_values(records)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert values["cells"] == on_disk["cells"] == summary["cells"]
    assert values["dataset"] == "synthetic-uniform" and values["skipped"] == {}
    # no per-trial value is left in the summary (it used to hold the last trial's)
    assert not [k for k in values if k.endswith("psnr_median")]


def test_one_table_per_cell_holds_every_sample(wandb_run):
    summary, run_dir, folder, _, _ = wandb_run
    for cell, aggregates in summary["cells"].items():
        (table,) = (folder / "files" / "media" / "table" / cell).glob("samples_*.table.json")
        content = json.loads(table.read_text())
        assert content["columns"][:4] == ["trial", "status", "sample_id", "matched_reconstruction"]
        assert len(content["data"]) == aggregates["images"]
        psnr = content["columns"].index("psnr")
        assert np.median([row[psnr] for row in content["data"]]) == pytest.approx(
            aggregates["psnr"]["median"], abs=1e-12
        )


def test_records_summary_and_config_are_one_versioned_artifact(wandb_run):
    _, run_dir, _, records, _ = wandb_run
    # (W&B stores each logged table as an artifact of its own, type "run_table")
    (artifact,) = [a for a in of_type(records, "artifact") if a.type == "run-records"]
    assert artifact.name == artifact_name("wb") == "run-records-wb"
    manifest = {entry.path: entry.digest for entry in artifact.manifest.contents}
    assert sorted(manifest) == ["config.yaml", "summary.json", "trials.jsonl"]
    for name, digest in manifest.items():
        md5 = base64.b64encode(hashlib.md5((run_dir / name).read_bytes()).digest()).decode()
        assert digest == md5, name


def test_config_holds_the_resolved_configuration_and_environment(wandb_run):
    _, _, _, records, _ = wandb_run
    (start,) = of_type(records, "run")
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["dataset"] == "synthetic-uniform" and config["attacks"] == ["bias"]
    assert config["environment"]["python"] and "threads_per_process" in config["environment"]
    assert config["datamodule"]


def test_wandb_says_one_line_unless_verbose(wandb_run):
    _, run_dir, folder, _, (lines, printed) = wandb_run
    assert printed == ""  # nothing of W&B's own (it printed about 20 lines per run)
    (line,) = [line for line in lines if line.startswith(("W&B", "wandb"))]
    run_id = folder.name.rsplit("-", 1)[-1]
    assert line == f"W&B: offline run {run_id} in {folder} (upload: wandb sync {folder})"


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_lets_wandb_speak(tmp_path, verbose):
    from leakbench.runner import make_loggers

    config = small_bias_run(tmp_path, logger="wandb")
    (logger,) = [lg for lg in make_loggers(config, {}, tmp_path, verbose) if "Wandb" in repr(lg)]
    assert logger._wandb_init["settings"] == {"silent": not verbose}
    assert "anonymous" not in logger._wandb_init  # W&B warns of it before silence applies


def test_an_entry_records_only_an_online_wandb_run(wandb_run, tmp_path):
    _, run_dir, _, _, _ = wandb_run
    assert entry_wandb_run(run_dir, "leakbench") is None  # an offline id opens nothing
    (tmp_path / "wandb" / "run-20260101_000000-abc123").mkdir(parents=True)
    assert entry_wandb_run(tmp_path, "p") == {"id": "abc123", "project": "p", "mode": "online"}


def test_wandb_counts_as_configured_only_by_local_state(tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_configured()  # no netrc file at all
    (tmp_path / "netrc").write_text("machine example.org login u password p\n")
    assert not wandb_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k\n")
    assert wandb_configured()
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_configured()
