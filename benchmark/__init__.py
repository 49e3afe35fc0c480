"""leakbench: a benchmark suite for gradient inversion attacks and defenses.

The re-exports below load on first use (PEP 562), so that ``import leakbench`` (and with it the
command line's ``--help``, ``list`` and refusals) imports no torch.
"""

import importlib
import os
from typing import Any

# OpenMP threads that spin while they wait (libgomp's default) turn a loaded machine into a
# 10-100x slowdown of every attack step: set before torch loads its OpenMP runtime, so that
# idle threads sleep instead. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Attack": "leakbench.interfaces",
    "Defense": "leakbench.interfaces",
    "TrialFailure": "leakbench.interfaces",
    "UnsupportedModelError": "leakbench.interfaces",
    "ATTACKS": "leakbench.registry",
    "COVARIATES": "leakbench.registry",
    "DATAMODULES": "leakbench.registry",
    "DEFENSES": "leakbench.registry",
    "MODELS": "leakbench.registry",
    "register_attack": "leakbench.registry",
    "register_covariate": "leakbench.registry",
    "register_datamodule": "leakbench.registry",
    "register_defense": "leakbench.registry",
    "register_model": "leakbench.registry",
    "Budget": "leakbench.capabilities",
    "Capability": "leakbench.capabilities",
    "Observation": "leakbench.threat_model",
    "Reconstruction": "leakbench.threat_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'leakbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
