"""A full ``leakbench run`` on a fixture of every dataset, in its real on-disk format.

The fast test leaves the privacy metrics out; the slow one (nightly) scores them too, which
trains each dataset's reference classifier on its fixture.
"""

import json

import pytest

from leakbench.cli import main
from leakbench.datamodules.fixtures import FIXTURE_WRITERS


def run_on_fixture(name, tmp_path, capsys, privacy_metrics):
    config = tmp_path / "run.yaml"
    root = FIXTURE_WRITERS[name](tmp_path / "data")
    config.write_text(
        f"dataset: {name}\n"
        f"dataset_options: {{root: '{root}'}}\n"
        "attacks: [bias]\n"
        "batch_sizes: [1, 4]\n"
        "trials: 2\n"
        f"privacy_metrics: {str(privacy_metrics).lower()}\n"
        f"output_dir: '{tmp_path / 'runs'}'\n"
        "run_name: e2e\n"
        "logger: csv\n"
    )
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "runs" / "e2e" / "summary.json").read_text())
    single = summary["cells"]["bias__none__b1"]
    assert single["failed"] == 0 and single["trials"] == 2
    assert single["psnr"]["worst"] > 60  # the bias attack is exact on one sample
    records = (tmp_path / "runs" / "e2e" / "trials.jsonl").read_text().splitlines()
    assert all(json.loads(r)["sample_ids"] for r in records)
    assert "bias" in capsys.readouterr().out
    return single


@pytest.mark.parametrize("name", sorted(FIXTURE_WRITERS))
def test_quickstart_attack_runs_on_every_fixture_dataset(name, tmp_path, capsys):
    single = run_on_fixture(name, tmp_path, capsys, privacy_metrics=False)
    assert "iip_pixel" not in single and "task_leakage" not in single


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIXTURE_WRITERS))
def test_privacy_metrics_on_every_fixture_dataset(name, tmp_path, capsys):
    single = run_on_fixture(name, tmp_path, capsys, privacy_metrics=True)
    assert single["iip_pixel"]["rate"] == 1.0  # an exact reconstruction is its own nearest
    assert "task_leakage" in single
