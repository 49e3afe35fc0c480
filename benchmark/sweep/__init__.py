"""Benchmark grids: expand a grid file into runs, launch them through submitit, and read them back.

A grid file (YAML) names a base configuration, the axes to expand and the resources to ask for::

    name: nightly                     # the W&B group; runs land in runs/sweeps/<name>/<run>
    base: leaderboards/tracks/lfw-subset-cnn6-b1.yaml   # a config file, a track file or name
    set: {trials: 4}                  # keys applied to every run, before the axes
    axes:                             # the product of the axes, in this order
      attacks: [bias, [dlg, idlg], {name: dlg, options: {iterations: 50}, label: dlg50}]
      defenses: [none, {name: noise, options: {std: 0.01}}]
      datasets: [lfw-subset, {name: synthetic-uniform, options: {size: 32}, split: test}]
      models: [fcn, {name: lenet-zhu, seed: 1, client_mode: train}]    # victims and states
      model_seeds: [0, 1]
      batch_sizes: [1, [1, 4]]
      seeds: [0, 1]
      tracks: all                     # or a list of track names / files (instead of base)
    output_dir: runs/sweeps/nightly   # default runs/sweeps/<name>
    resources: {partition: gpu, time_min: 60, cpus_per_task: 4, gpus_per_node: 1, mem_gb: 16,
                array_parallelism: 8}

Each run's folder name joins its axis labels in a fixed axis order (tracks, datasets, models,
model_seeds, defenses, attacks, batch_sizes, seeds), e.g. ``noise-1a2b3c__dlg50__b1``, so the
same grid always names the same folders, whatever the order of its keys, and a re-launch finds
them. Every expanded configuration is checked
(``RunConfig.from_mapping``, the registries, ``runner.prepare``) before anything is launched; a
bad axis or value is refused in one line that names the valid ones.

Launching is idempotent: finished runs are skipped, half-done ones continue through the runner's
trial-level resume (``runner.run`` on the same folder), and a folder whose saved configuration
measures something else is refused, never merged. ``--launcher local`` runs the jobs on this
machine through submitit's local executor, ``--jobs`` at a time; ``--launcher slurm`` submits one
SLURM job array per resource shape through submitit. A run sharded over N processes (``devices:
N``) is one job of N tasks on one node, each task one DDP rank.

Run states (``leakbench sweep status``) come from the run folders alone, so they also work for
jobs that are queued or running on a cluster:

- ``running``: the job's first rank keeps ``.sweep-heartbeat.json`` in the run folder fresh (its
  mtime is touched every ``HEARTBEAT_S`` seconds). It counts as running while it is younger than
  ``STALE_AFTER_HEARTBEATS`` beats and, when it names this host, while its process is alive (a
  killed process is seen at once).
- ``done``: ``summary.json`` exists (the runner writes it when every rank has finished).
- ``failed``: the job raised (``.sweep-failed.json`` holds its error), the run stopped part-way
  with no live heartbeat (killed, preempted, out of time: a re-launch finishes it), or the folder
  holds a run of another configuration.
- ``missing``: no run has started in the folder yet (SLURM jobs still queued are missing too).

The W&B runs of a grid share one group (the grid's name) and have one job type per track.

The package, one idea per module, each importing only from the ones listed above it::

    grid.py         the grid file and its axes: load_grid, check_grid, the axis registry (axis)
    launch.py       what a run asks for (Resources), the submitit job (execute, its Heartbeat),
                    the launchers local and slurm (launcher)
    status.py       the run states of ``leakbench sweep status`` (run_status)
    collect.py      finished runs into CSV and Markdown tables, leaderboard entries (collect_rows)
    throughput.py   trials per minute on 1, 2, ... processes (measure_throughput)
    commands.py     ``leakbench sweep`` and its commands (status, collect, throughput)
"""

from __future__ import annotations

from leakbench.sweep.collect import collect_rows, render_collected, write_entries
from leakbench.sweep.grid import (
    AXES,
    Grid,
    PlannedRun,
    axis,
    check_grid,
    expected_trials,
    load_grid,
)
from leakbench.sweep.launch import (
    HEARTBEAT_FILE,
    HEARTBEAT_S,
    LAUNCHERS,
    LauncherUnavailable,
    LaunchOptions,
    Resources,
    check_slurm,
    execute,
    launcher,
    local_executor,
    run_resources,
    slurm_executor,
)
from leakbench.sweep.status import STALE_AFTER_HEARTBEATS, STATES, RunStatus, run_status
from leakbench.sweep.throughput import measure_throughput

__all__ = [
    "AXES",
    "HEARTBEAT_FILE",
    "HEARTBEAT_S",
    "LAUNCHERS",
    "STALE_AFTER_HEARTBEATS",
    "STATES",
    "Grid",
    "LaunchOptions",
    "LauncherUnavailable",
    "PlannedRun",
    "Resources",
    "RunStatus",
    "axis",
    "check_grid",
    "check_slurm",
    "collect_rows",
    "execute",
    "expected_trials",
    "launcher",
    "load_grid",
    "local_executor",
    "measure_throughput",
    "render_collected",
    "run_resources",
    "run_status",
    "slurm_executor",
    "write_entries",
]
