"""What readers of trial records need without running a trial: the seeds a trial is drawn with
and the record fields that measure the machine. Light on purpose (numpy, no torch), so that the
leaderboard's checks of recorded entries answer at once."""

from __future__ import annotations

import zlib

import numpy as np

# Stream ids that keep the attacker's randomness apart from the trial plan and the client's.
ATTACK_SEED_STREAM = 0x5EED_A77C

# Record fields that measure the machine rather than the attack: they differ between two runs
# of the same configuration, and only they do.
# (The client code's report holds its own timings, such as an LP solver's.)
MEASURED_FIELDS = ("time_s", "wall_s", "client_code_s", "client_report", "budget", "memory")


def attack_seed(run_seed: int, cell: str) -> int:
    """The attacker's seed: one per cell, from its own stream.

    It is the same for every trial of a cell, so it cannot be inverted to a trial index (and
    through the public trial plan to the private samples); same run seed, same attack seed.
    """
    key = zlib.crc32(cell.encode())
    return int(np.random.SeedSequence([run_seed, ATTACK_SEED_STREAM, key]).generate_state(1)[0])


def trial_seed(run_seed: int, trial: int) -> int:
    """The client's seed of one trial (defense noise, mixing): never shown to the attacker."""
    return int(np.random.SeedSequence([run_seed, trial]).generate_state(1)[0])
