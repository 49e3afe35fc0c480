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

Launching is idempotent: finished runs are skipped, runs queued or running anywhere are left
alone, half-done ones continue through the runner's trial-level resume (``runner.run`` on the same
folder), and a folder whose saved configuration measures something else is refused, never merged.
A launch decides and submits under the grid's launch lock and records every job it submits with
its run (``.sweep-launches.jsonl``), so two launches of one grid never submit a run twice.
``--launcher local`` runs the jobs on this machine through submitit's local executor, ``--jobs``
at a time; ``--launcher slurm`` submits through submitit one plain job for a run alone in its
resource shape, and one job array per resource shape otherwise. A run sharded over N processes
(``devices: N``) is one job of N tasks on one node, each task one DDP rank.

Run states (``leakbench sweep status``) come from the run folders and from SLURM (``squeue``, then
``sacct`` where the cluster keeps accounting), asked once per grid about the job of each run's last
launch:

- ``done``: ``summary.json`` exists (the runner writes it when every rank has finished).
- ``queued``: SLURM holds the run's job, not started (PENDING, REQUEUED, ...), with its reason
  (Resources, Priority, JobHeldUser, ...).
- ``running``: SLURM runs its job (RUNNING, COMPLETING, SUSPENDED, ...); or the job's first rank
  keeps ``.sweep-heartbeat.json`` fresh (touched every ``HEARTBEAT_S`` seconds, fresh for
  ``STALE_AFTER_HEARTBEATS`` beats and, on this host, while its process lives); or the local job
  just launched is starting.
- ``failed``: the job raised (``.sweep-failed.json`` holds the first rank's error: the cause),
  the run stopped part-way (SLURM's final state says why: CANCELLED, TIMEOUT, PREEMPTED,
  OUT_OF_MEMORY, NODE_FAIL, ...; a re-launch finishes it), or the folder holds a run of another
  configuration.
- ``missing``: no run has started in the folder and no job of it is queued.

A launch submits ``failed`` and ``missing`` runs only; where SLURM cannot be asked about a grid's
jobs it launches nothing. Interruption is not failure: on SIGUSR2 (the time limit is near;
``signal_delay_s`` before it) a job drops its trial in flight and requeues itself through
submitit's checkpointing, then continues from its records; on SIGTERM (``scancel``, preemption)
it drops its trial in flight and ends, and a re-launch finishes the run.

The W&B runs of a grid share one group (the grid's name) and have one job type per track.

The package, one idea per module, each importing only from the ones listed above it::

    grid.py         the grid file and its axes: load_grid, check_grid, the axis registry (axis)
    ledger.py       what a run folder says about its jobs: launches, heartbeat, first failure,
                    and the grid's launch lock
    scheduler.py    what SLURM says about jobs (job_states)
    status.py       the run states of ``leakbench sweep status`` (grid_status, run_status)
    launch.py       what a run asks for (Resources), the submitit job (RunJob, execute), the
                    launchers local and slurm (launcher)
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
    LAUNCHERS,
    LauncherUnavailable,
    LaunchOptions,
    Resources,
    RunJob,
    check_slurm,
    execute,
    launcher,
    local_executor,
    run_resources,
    slurm_executor,
)
from leakbench.sweep.ledger import FAILED_FILE, HEARTBEAT_FILE, HEARTBEAT_S, LAUNCHES_FILE
from leakbench.sweep.scheduler import JobState, SchedulerUnavailable, job_states
from leakbench.sweep.status import (
    STALE_AFTER_HEARTBEATS,
    STATES,
    RunStatus,
    grid_status,
    run_status,
)
from leakbench.sweep.throughput import measure_throughput

__all__ = [
    "AXES",
    "FAILED_FILE",
    "HEARTBEAT_FILE",
    "HEARTBEAT_S",
    "LAUNCHERS",
    "LAUNCHES_FILE",
    "STALE_AFTER_HEARTBEATS",
    "STATES",
    "Grid",
    "JobState",
    "LaunchOptions",
    "LauncherUnavailable",
    "PlannedRun",
    "Resources",
    "RunJob",
    "RunStatus",
    "SchedulerUnavailable",
    "axis",
    "check_grid",
    "check_slurm",
    "collect_rows",
    "execute",
    "expected_trials",
    "grid_status",
    "job_states",
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
