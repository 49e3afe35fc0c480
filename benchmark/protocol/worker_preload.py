"""Imported once by the attack workers' fork server, so that each trial's worker starts warm:
torch, the victim zoo and every registered attack (built-in and entry-point plugins) are already
loaded when the worker is forked."""

from leakbench.registry import ATTACKS, MODELS

ATTACKS.names()
MODELS.names()
