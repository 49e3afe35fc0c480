"""``leakbench``: run experiments, list components, inspect datasets and models.

leakbench run                       the quickstart (lfw-subset, FCN, bias + iDLG, B = 1 and 4)
leakbench run --config FILE.yaml    a configured run, with command-line overrides
leakbench list                      everything registered, with each attack's requirements
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Modules that contribute subcommands through an ``add_command(subparsers)`` function.
COMMAND_MODULES: tuple[str, ...] = (
    "leakbench.datamodules.check",
    "leakbench.leaderboard",
    "leakbench.analysis.rank",
    "leakbench.analysis.boundary",
    "leakbench.analysis.overhead",
    "leakbench.analysis.fishing_study",
    "leakbench.sweep",
)


def add_run_command(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run a benchmark (no arguments: the quickstart)")
    p.add_argument("--config", help="YAML run configuration")
    p.add_argument("--dataset")
    p.add_argument("--model")
    p.add_argument("--attack", dest="attacks", action="append", help="repeatable")
    p.add_argument("--defense")
    p.add_argument("--batch-size", dest="batch_sizes", type=int, action="append", help="repeatable")
    p.add_argument("--trials", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dir")
    p.add_argument("--run-name")
    p.add_argument("--logger", choices=["wandb", "csv", "none"])
    p.add_argument("--grant", dest="grants", action="append", help="capability; repeatable")
    p.add_argument(
        "--isolation",
        choices=["process", "in-process"],
        help="where attacks run: a fresh worker process per trial (default), or in-process "
        "(debugging; isolates nothing)",
    )
    p.add_argument("--threads", type=int, help="intra-op threads per process (default: cores)")
    p.add_argument("--devices", type=int, help="processes (Lightning devices) sharing the trials")
    p.add_argument(
        "--resume",
        help="an earlier run folder: continue the run its config.yaml describes, skipping the "
        "trials it already holds (flags that change what it measures are refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from leakbench.config import ConfigError, RunConfig
    from leakbench.runner import NOT_PROTOCOL_KEYS, run, saved_config

    overrides = {
        key: getattr(args, key)
        for key in (
            "dataset",
            "model",
            "attacks",
            "defense",
            "batch_sizes",
            "trials",
            "seed",
            "output_dir",
            "run_name",
            "logger",
            "grants",
            "isolation",
            "threads",
            "devices",
        )
    }
    if args.resume is None:
        config = RunConfig.load(args.config, overrides)
    else:
        saved = saved_config(Path(args.resume)).to_dict()
        given = {k: v for k, v in overrides.items() if v is not None}
        if args.config is not None:
            given = {**RunConfig.load(args.config).to_dict(), **given}
        differing = sorted(
            k for k, v in given.items() if k not in NOT_PROTOCOL_KEYS and saved.get(k) != v
        )
        if differing:
            raise ConfigError(
                f"--resume continues the run saved in {args.resume}; these options would "
                f"change what it measures: {', '.join(differing)}"
            )
        config = RunConfig.from_mapping({**saved, **given}, source="command line")
    run(config, resume=args.resume, progress=not args.no_progress)
    return 0


def add_list_command(subparsers: Any) -> None:
    p = subparsers.add_parser("list", help="list registered datasets, models, attacks, defenses")
    p.set_defaults(func=list_command)


def list_command(args: argparse.Namespace) -> int:
    from leakbench.registry import ATTACKS, COVARIATES, DATAMODULES, DEFENSES, MODELS

    print("datasets:   " + ", ".join(DATAMODULES.names()))
    print("models:     " + ", ".join(MODELS.names()))
    print("defenses:   " + ", ".join(DEFENSES.names()))
    print("covariates: " + ", ".join(COVARIATES.names()))
    print("attacks:")
    for name, attack in ATTACKS.items():
        needs = ", ".join(sorted(c.value for c in attack.requires)) or "nothing beyond the update"
        limit = "" if attack.max_batch_size is None else f"; batch size <= {attack.max_batch_size}"
        print(f"  {name:<24} requires: {needs}{limit}")
        print(f"  {'':<24} threat model: {attack.threat_model}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leakbench", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_run_command(subparsers)
    add_list_command(subparsers)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as exc:
        # Bad input of any kind: one clear line, no traceback.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"leakbench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
