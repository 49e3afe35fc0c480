"""leakbench: a benchmark suite for gradient inversion attacks and defenses."""

import os

# OpenMP threads that spin while they wait (libgomp's default) turn a loaded machine into a
# 10-100x slowdown of every attack step: set before torch loads its OpenMP runtime, so that
# idle threads sleep instead. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from leakbench.interfaces import Attack, Defense, TrialFailure, UnsupportedModelError
from leakbench.registry import (
    ATTACKS,
    COVARIATES,
    DATAMODULES,
    DEFENSES,
    MODELS,
    register_attack,
    register_covariate,
    register_datamodule,
    register_defense,
    register_model,
)
from leakbench.threat_model import Budget, Capability, Observation, Reconstruction

__version__ = "0.1.0"

__all__ = [
    "ATTACKS",
    "COVARIATES",
    "DATAMODULES",
    "DEFENSES",
    "MODELS",
    "Attack",
    "Budget",
    "Capability",
    "Defense",
    "Observation",
    "Reconstruction",
    "TrialFailure",
    "UnsupportedModelError",
    "register_attack",
    "register_covariate",
    "register_datamodule",
    "register_defense",
    "register_model",
]
