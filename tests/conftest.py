"""Test-wide settings: no network, no W&B traffic, results in temporary folders; the hostile
plug-ins of ``tests/plugins/`` as an installed distribution.

The suite runs on pytest-xdist's workers (``-n auto --dist loadgroup`` in pyproject.toml): half
of its time is spent waiting on other processes (a sandbox, SLURM, a killed run). A module whose
tests share a module-scoped fixture (a board, a SLURM cluster, a killed grid) is one
``xdist_group``: one worker builds the fixture once, and xdist starts the groups with the most
tests first."""

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

# One intra-op thread in this process and in every process the suite starts (runs, SLURM jobs,
# attack jobs: leakbench.cores.default_threads), set before torch starts its thread pool. The
# test models are tiny; with the workers sharing the cores, more threads only spin waiting for
# each other (a DLG trial took ten times the CPU on two threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from leakbench.cores import usable_cores  # noqa: E402


def _checkpoint_folder() -> Path:
    """Where reference classifiers (task leakage) and trained victims are trained once per test
    session: never the working tree. pytest-xdist's workers share one folder (its writes are
    atomic and content-addressed), so a classifier is trained once, not once per worker; it is
    private to this user, like ``mkdtemp``'s, so nobody else can plant a checkpoint in it."""
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if session is None:
        return Path(tempfile.mkdtemp(prefix="leakbench-test-checkpoints-"))
    folder = Path(tempfile.gettempdir()) / f"leakbench-test-checkpoints-{session}"
    folder.mkdir(mode=0o700, exist_ok=True)
    status = folder.lstat()  # a link planted in its place is refused too
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise RuntimeError(f"{folder} is not private to this user: remove it and run again")
    return folder


if "LEAKBENCH_CHECKPOINTS" not in os.environ:
    os.environ["LEAKBENCH_CHECKPOINTS"] = str(_checkpoint_folder())


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core this process may use (its CPU affinity capped by its
    cgroup's CPU quota: a container's affinity often lists every core of its host)."""
    return usable_cores()


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PLUGINS = Path(__file__).parent / "plugins"
# The hostile plug-ins' ``leakbench.attacks`` entry points.
HOSTILE_ENTRY_POINTS = {
    "hostile-probe": "hostile_probe:Probe",
    "hostile-import": "hostile_import",
    "hostile-check": "hostile_hooks:CheckModelPatch",
    "hostile-stash": "hostile_hooks:ClientStash",
    "hostile-enumerator": "hostile_lookup:Enumerator",
    "hostile-memoriser": "hostile_lookup:Memoriser",
}


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    """The hostile plug-ins as an installed distribution, found through its entry points: their
    packages and a ``.dist-info`` on ``sys.path``, as a pip install would leave them."""
    site = tmp_path_factory.mktemp("hostile-site")
    site.chmod(0o755)  # like any site-packages: readable by the sandbox's unprivileged user
    packages = sorted({value.split(":")[0] for value in HOSTILE_ENTRY_POINTS.values()})
    for package in packages:
        shutil.copytree(PLUGINS / package, site / package)
    dist = site / "leakbench_hostile-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: leakbench-hostile\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in HOSTILE_ENTRY_POINTS.items())
    (dist / "entry_points.txt").write_text(f"[leakbench.attacks]\n{lines}")
    files = [p.relative_to(site) for p in site.rglob("*") if p.is_file()]
    (dist / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, "RECORD"]))
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
