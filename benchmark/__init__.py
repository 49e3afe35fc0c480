"""leakbench: a benchmark suite for gradient inversion attacks and defenses.

The re-exports below load on first use (PEP 562), so that ``import leakbench`` (and with it the
command line's ``--help``, ``list`` and refusals) imports no torch.
"""

import os

# OpenMP threads that spin while they wait (libgomp's default) turn a loaded machine into a
# 10-100x slowdown of every attack step: set before torch loads its OpenMP runtime, so that
# idle threads sleep instead. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# Public name -> the module that defines it.
from leakbench.lazy import lazy_exports  # noqa: E402

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


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
