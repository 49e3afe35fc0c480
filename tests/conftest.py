"""Test-wide settings: no network, no W&B traffic, results in temporary folders."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Reference classifiers (task leakage) and trained victims: trained once per test session, in a
# folder of its own, never in the working tree.
os.environ.setdefault(
    "LEAKBENCH_CHECKPOINTS", tempfile.mkdtemp(prefix="leakbench-test-checkpoints-")
)


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
