"""``leakbench``: run experiments, list components, inspect datasets and models.

leakbench run                       the quickstart (lfw-subset, FCN, bias + iDLG, B = 1 and 4)
leakbench run --config FILE.yaml    a configured run; options given on the line win
leakbench list                      everything registered, with each attack's requirements
leakbench COMMAND --help            every option of a command, with its help text

Every command is a typed function (:mod:`leakbench.commands`); this module and the command
modules import no torch, so ``--help``, ``list`` and the refusal of bad input answer at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from leakbench.commands import (
    COMMANDS,
    Given,
    command,
    describe,
    find,
    groups,
    invoke,
    merged,
)
from leakbench.config import ConfigError, RunConfig, check_output_folder
from leakbench.interruption import RunInterrupted, end_process

# Light modules that declare commands with ``@command`` (imported for every invocation).
COMMAND_MODULES: tuple[str, ...] = (
    "leakbench.analysis.commands",
    "leakbench.datamodules.commands",
    "leakbench.analysis.defense_commands",
    "leakbench.leaderboard.commands",
    "leakbench.models.commands",
    "leakbench.sweep.commands",
    "leakbench.timing",
)


@command(
    "run", repeated={"--attack": "attacks", "--batch-size": "batch_sizes", "--grant": "grants"}
)
def run_command(
    config: RunConfig,
    *,
    resume: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    given: Given,
) -> int:
    """Run a benchmark (no arguments: the quickstart).

    Args:
        resume: An earlier run folder: continue the run its config.yaml describes, skipping the
            trials it already holds (options that change what it measures are refused).
        progress: Show the progress bar.
        verbose: Show W&B's own output (otherwise one line says where the W&B run is).
    """
    config.check_names()
    if resume is None:
        check_output_folder(config.output_dir)
        if config.run_name is not None:
            check_output_folder(Path(config.output_dir) / config.run_name, key="run_name")
    from leakbench.config import NOT_PROTOCOL_KEYS, saved_config
    from leakbench.runner import run

    if resume is not None:
        saved = saved_config(Path(resume)).to_dict()
        wanted = merged(saved, given)
        differing = sorted(
            k for k in given if k not in NOT_PROTOCOL_KEYS and saved.get(k) != wanted[k]
        )
        if differing:
            raise ConfigError(
                f"--resume continues the run saved in {resume}; these options would "
                f"change what it measures: {', '.join(differing)}"
            )
        config = RunConfig.from_mapping(wanted, source="command line")
    run(config, resume=resume, progress=progress, verbose=verbose)
    return 0


@command("list")
def list_command() -> int:
    """List registered datasets, models, defenses, covariates and attacks (with requirements)."""
    from leakbench.registry import ATTACKS, COVARIATES, DATAMODULES, DEFENSES, MODELS, listing

    print("datasets:   " + ", ".join(listing(DATAMODULES).names))
    print("models:     " + ", ".join(listing(MODELS).names))
    print("defenses:   " + ", ".join(listing(DEFENSES).names))
    print("covariates: " + ", ".join(listing(COVARIATES).names))
    print("attacks (SoK letter: the threat model of Carletti et al., USENIX Security 2025):")
    attacks = listing(ATTACKS, describe=_plugin_facts)
    for name in attacks.names:
        facts = attacks.attack_facts[name]
        needs = ", ".join(facts["requires"]) or "nothing beyond the update"
        limit = facts["max_batch_size"]
        print(f"  {name:<24} requires: {needs}")
        print(f"  {'':<24} batch size: {'any' if limit is None else f'at most {limit}'}")
        print(f"  {'':<24} threat model: {facts['threat_model']}")
        print(f"  {'':<24} SoK letter: {sok_letters(facts.get('threat_letters', {}))}")
    return 0


def sok_letters(by_protocol: dict[str, str]) -> str:
    """``B (informed eavesdropper); C under fedavg``: the FedSGD letter, then any other."""
    from leakbench.capabilities import THREAT_MODELS

    if not by_protocol:
        return "-"
    base = by_protocol.get("fedsgd", next(iter(by_protocol.values())))
    others = [f"{letter} under {p}" for p, letter in sorted(by_protocol.items()) if letter != base]
    return "; ".join([THREAT_MODELS[base].describe(), *others])


def _plugin_facts(name: str) -> dict:
    """A plug-in's facts, asked where its code may run (imports torch: only with plug-ins)."""
    from leakbench.protocol.attack import plugin_facts

    return plugin_facts(name)


@command("report")
def report_command(run_dir: str, *, output: str | None = None) -> int:
    """Write one HTML page for a finished run: summary table, figures, config, environment.

    Args:
        run_dir: The run folder (it holds summary.json).
        output: Where to write the page (default: RUN_DIR/report.html).
    """
    from leakbench.report import report_command as write

    return write(run_dir, output)


@command("lpips-fetch")
def lpips_fetch_command(*, timeout: float = 30.0) -> int:
    """Download the AlexNet backbone weights LPIPS needs into $TORCH_HOME (runs never
    download; without them they say once that LPIPS is unavailable).

    Args:
        timeout: Seconds any one network operation may take.
    """
    from leakbench.metrics import LpipsFetchError, fetch_lpips_weights

    try:
        fetch_lpips_weights(timeout_s=timeout)
    except LpipsFetchError as exc:
        print(f"leakbench: error: {exc}", file=sys.stderr)
        return 1
    return 0


@command("index")
def index_command(*, check: bool = False) -> int:
    """Regenerate the registry index (registry_index.json) from the real registries.

    Args:
        check: Only compare: exit 1 if the index is stale, writing nothing.
    """
    from leakbench.registry import INDEX_PATH, build_index, index_text

    fresh = index_text(build_index())
    if check:
        stale = not INDEX_PATH.is_file() or INDEX_PATH.read_text() != fresh
        print(f"{INDEX_PATH} is {'stale: run `leakbench index`' if stale else 'up to date'}")
        return 1 if stale else 0
    INDEX_PATH.write_text(fresh)
    print(f"wrote {INDEX_PATH}")
    return 0


def overview() -> str:
    lines = [__doc__.split("\n\n")[0], "", "commands:"]
    for members in groups().values():
        for cmd in members:
            lines.append(f"  {cmd.name:<26} {describe(cmd.name)}")
    lines += ["", "leakbench --version prints the version."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    program = argv is None  # called as the program (its arguments are sys.argv), not by a test
    argv = list(sys.argv[1:] if argv is None else argv)
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    if argv[:1] == ["--version"]:
        from leakbench import __version__

        print(f"leakbench {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = find(argv)
    try:
        if cmd is None:
            members = groups().get(argv[0])
            if members and (len(argv) == 1 or argv[1] in ("-h", "--help")):
                for member in members:
                    print(f"leakbench {member.name:<26} {describe(member.name)}")
                return 0 if len(argv) > 1 else 2
            words = " ".join(argv[:2]) if members else argv[0]
            valid = ", ".join(sorted(COMMANDS))
            raise ConfigError(f"unknown command {words!r}; valid commands: {valid}")
        return invoke(cmd, rest)
    except RunInterrupted as exc:  # the run said what it kept and how to continue
        if program:
            end_process(exc.exit_code)  # Python's own teardown takes seconds
        return exc.exit_code
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as exc:
        # Bad input of any kind: one clear line, no traceback.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"leakbench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
