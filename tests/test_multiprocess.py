"""Runs sharded over several processes: one run folder, every trial exactly once, the same
summary as on one process, and resumes that merge records from another process count once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from leakbench.protocol import MEASURED_FIELDS

CONFIG = {
    "dataset": "lfw-subset",
    "model": "fcn",
    "model_options": {"widths": [32]},
    "attacks": ["bias", "dlg"],
    "attack_options": {"dlg": {"iterations": 3}},
    "batch_sizes": [1, 2],
    "trials": 5,  # odd: a padded shard would run a trial twice
    "accelerator": "cpu",
    "threads": 1,  # the same arithmetic on every process count
    "logger": "none",
}


def leakbench_run(tmp_path, name, devices, *extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {**CONFIG, "devices": devices, "output_dir": str(tmp_path), "run_name": name}
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "LEAKBENCH_RUN_DIR"}
    command = [sys.executable, "-m", "leakbench.cli", "run", "--no-progress"]
    command += ["--config", str(path)] if not extra else list(extra)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


def trial_lines(run_dir):
    return [
        json.loads(line)
        for path in sorted(run_dir.glob("trials*.jsonl"))
        for line in path.read_text().splitlines()
        if line
    ]


def comparable(summary):
    return {
        cell: {k: v for k, v in values.items() if k != "time_s"}
        for cell, values in summary["cells"].items()
    }


def strip(rows):
    keep = [{k: v for k, v in r.items() if k not in MEASURED_FIELDS} for r in rows]
    return sorted(keep, key=lambda r: (r["cell"], r["trial"]))


@pytest.mark.slow
def test_two_processes_run_every_trial_exactly_once_with_the_same_summary(tmp_path):
    one = leakbench_run(tmp_path, "one", 1)
    two = leakbench_run(tmp_path, "two", 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]
    assert {p.name for p in two.glob("trials*.jsonl")} == {"trials.jsonl", "trials-rank1.jsonl"}
    counts = Counter((r["cell"], r["trial"]) for r in trial_lines(two))
    assert len(counts) == 4 * 5 and set(counts.values()) == {1}
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert comparable(summary_one) == comparable(summary_two)
    assert all(cell["trials"] == 5 for cell in summary_two["cells"].values())
    assert strip(trial_lines(one)) == strip(trial_lines(two))

    # Interrupted on two processes (rank 1 lost its last record), resumed on one.
    rank1 = two / "trials-rank1.jsonl"
    lines = rank1.read_text().splitlines()
    rank1.write_text("\n".join(lines[:-1]) + "\n")
    leakbench_run(tmp_path, "two", 1, "--resume", str(two), "--devices", "1")
    counts = Counter((r["cell"], r["trial"]) for r in trial_lines(two))
    assert len(counts) == 20 and set(counts.values()) == {1}
    assert comparable(json.loads((two / "summary.json").read_text())) == comparable(summary_one)
