"""The submission path end to end, as a submitter walks it, in fresh processes:

pip-install the template attack package (``leaderboards/template-attack``, its own pyproject with
a ``leakbench.attacks`` entry point), run a track with it, submit, verify, build the site; then,
without the package, verification names the distribution to install. The package goes into a
private ``--target`` folder put on ``PYTHONPATH`` (the fork server of isolated attacks inherits
it), so the shared environment is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.test_leaderboard import TRACK

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEMPLATE = ROOT / "leaderboards" / "template-attack"
NAME = "template-gradient-matching"


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        cwd=ROOT,
    )


def leakbench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "leakbench"), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


# Slow: four leakbench processes; tests/test_readme.py walks the same path in the fast suite, as
# the README prints it (install, track run, submit, verify, build).
@pytest.mark.slow
def test_a_template_attack_package_goes_from_pip_install_to_the_site(tmp_path):
    target, source = tmp_path / "site-packages", tmp_path / "template-attack"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    # From a copy: pip builds in the source tree, which is shared.
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), str(source))
    with_plugin = {**os.environ, "PYTHONPATH": str(target)}
    without = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    tracks = tmp_path / "tracks"
    tracks.mkdir()
    (tracks / "tiny-test.yaml").write_text(yaml.safe_dump(TRACK))
    config = {
        **TRACK,
        "attacks": [NAME],
        "attack_options": {NAME: {"iterations": 30}},
        "threads": 1,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    entries, site = tmp_path / "entries", tmp_path / "site"
    dirs = ["--tracks-dir", str(tracks)]
    # The board's maintainers verify and sign with their key; the tests' board trusts theirs.
    keys = ["--keys-dir", str(tmp_path / "keys")]
    assert leakbench("leaderboard", "keygen", str(tmp_path / "board.pem"), "--name", "tests",
                     *keys, env=with_plugin).returncode == 0  # fmt: skip
    steps = [
        ["run", "--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "runs"),
         "--run-name", "mine", "--logger", "none", "--no-progress"],
        ["submit", str(tmp_path / "runs" / "mine"), "--submitter", "me", "--entries-dir",
         str(entries), *dirs],
        ["leaderboard", "verify", str(entries / "tiny-test" / f"{NAME}-b1.json"), "--threads",
         "1", "--key", str(tmp_path / "board.pem"), *keys, *dirs],
        ["leaderboard", "build", "--entries-dir", str(entries), "--out-dir", str(site), *keys,
         *dirs],
    ]  # fmt: skip
    for step in steps:
        done = leakbench(*step, env=with_plugin)
        assert done.returncode == 0, f"{step}: {done.stdout}\n{done.stderr}"

    entry = json.loads((entries / "tiny-test" / f"{NAME}-b1.json").read_text())
    assert entry["attack"]["distribution"] == {
        "name": "leakbench-template-attack",
        "version": "0.1.0",
    }
    assert entry["attack"]["options"] == {"iterations": 30}
    assert entry["attack"]["hparams"]["iterations"] == 30  # every hyperparameter, as rebuilt
    assert entry["attack"]["code"]["distribution"] == "leakbench-template-attack"
    assert entry["verification"]["passed"], entry["verification"]["reason"]
    assert f"{NAME}-b1.html" in "".join(p.name for p in (site / "tiny-test").iterdir())

    refused = leakbench(*steps[2], env=without)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert (
        f"attack '{NAME}' is not installed: install the distribution leakbench-template-attack "
        "0.1.0 (pip install 'leakbench-template-attack==0.1.0')" in refused.stderr
    )


def test_a_built_leakbench_wheel_carries_the_schema_tracks_and_templates(tmp_path):
    """What a pip-installed leakbench needs to make, verify and publish entries, and to score
    task leakage without training: the ``leakbench.leaderboard`` package and the package data
    (pyproject.toml's ``packages`` and ``[tool.setuptools.package-data]``)."""
    source = tmp_path / "source"  # a copy: building in the shared tree would write build/
    for folder in ("benchmark", "datamodules", "models", "attacks", "defenses"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source))
    (wheel,) = tmp_path.glob("leakbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = (ROOT / "leaderboards" / "tracks").glob("*.yaml")
    tracks = {f"leakbench/leaderboard/tracks/{p.name}" for p in shipped}
    references = {
        f"leakbench/models/reference/{p.name}" for p in (ROOT / "models" / "reference").iterdir()
    }
    needed = {
        "leakbench/leaderboard/__init__.py",
        "leakbench/leaderboard/entry.schema.json",
        "leakbench/templates/index.html.j2",
        "leakbench/templates/entry.html.j2",
        "leakbench/templates/_macros.html.j2",
        "leakbench/templates/site.css",
        "leakbench/templates/sort.js",
        *tracks,
        *references,  # the embedded datasets' reference classifiers: a first run trains nothing
    }
    assert tracks and len(references) == 4 and not needed - names, sorted(needed - names)
