"""Every command in the README runs as printed.

The code blocks of README.md are read, and every command in them is either run or, where a test
cannot run it, checked against what does run it:

* ``python3 -m venv .venv`` and ``.venv/bin/pip install ...`` need the package index: the extras
  they name must exist in pyproject.toml, and the CPU index must be the one the workflows use;
* the test command (``.venv/bin/pytest ...``) is what CI runs: ``.ci/run`` holds it verbatim;
* the cron lines run the nightly grid, which ``.github/workflows/nightly-smoke.yml`` runs every
  night: here it is planned (``--dry-run``), which checks every run of it;
* ``--launcher slurm`` submits a SLURM job array: it runs here only where SLURM is absent, and
  must then say so in one line (exit 2).

A command this file does not know how to run fails the test, so a new README command gets its
budget here. Each ``## `` section of the README is a test: its commands run in README order in a
scratch folder holding a copy of ``leaderboards/`` and a ``runs/`` of their own; a placeholder is
filled with what the section made: ``runs/<run>`` with the run the previous command made (the
resumed one cut short first), ``<sha256>`` and ``1a2b3c4d`` with a checkpoint ``leakbench train``
made for the command's victim, ``my_run.yaml`` and ``GRID.yaml`` with the README's own config and
grid blocks, ``my-attack`` with the template attack package, installed as the README says. The
leaderboard commands, which in a checkout write into the repository's ``leaderboards/``, are
given the scratch copy's folders. Budgets are documented options appended after what is printed,
so they win: one trial and two iterations per attack, no covariates. Commands of the studies
that train or sweep many runs are ``@pytest.mark.slow`` and run every night; every other
command runs in CI.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from leakbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TEMPLATE = ROOT / "leaderboards" / "template-attack"
TEMPLATE_ATTACK = "template-gradient-matching"

# Documented options appended to keep a command fast (the last value of an option wins), by
# its command words.
BUDGETS: dict[str, dict[str, str]] = {
    # The covariates are left out: R-GAP's rank analysis of a convolutional victim takes a
    # minute once per process (tests/test_rank.py and tests/test_runner.py cover them).
    "run": {"--trials": "1", "--budget.max_iterations": "2", "--covariates": "[]"},
    "train": {"--epochs": "1"},
    "overhead": {"--rounds": "1", "--trials": "1", "--budget.max_iterations": "2"},
    "client-protocols": {"--trials": "1"},
    "boundary": {"--trials": "2", "--attack_trials": "1", "--compare_trials": "1"},
    "fishing-study": {"--trials": "1", "--ig_trials": "1"},
    "sweep throughput": {"--trials": "2"},
    "leaderboard lookup-bound": {"--trials": "20"},
}
# In a checkout the leaderboard commands write into the repository's own leaderboards/ by
# default: here, into the scratch copy of it.
PLACES: dict[str, dict[str, str]] = {
    "submit": {"--entries_dir": "leaderboards/entries"},
    "leaderboard verify": {"--keys_dir": "leaderboards/keys"},
    "leaderboard render": {
        "--entries_dir": "leaderboards/entries",
        "--out_dir": "leaderboards/tables",
        "--keys_dir": "leaderboards/keys",
    },
    "leaderboard build": {
        "--entries_dir": "leaderboards/entries",
        "--out_dir": "leaderboards/site",
        "--keys_dir": "leaderboards/keys",
    },
}
# The maintainers' verification: ENTRY.json is the entry the README's submission made, and the
# board's key one made here (its public half among the scratch copy's trusted keys).
SUBMITTED_ENTRY = f"leaderboards/entries/lfw-subset-lenet-zhu-b1/{TEMPLATE_ATTACK}-b1.json"
BOARD_KEY = "/path/outside/the/repository/board.pem"
# What the README's grid runs with here (keys of its `set`, applied to every run).
GRID_BUDGET = {"trials": 1, "budget": {"max_iterations": 2}}
# Commands that train victims or sweep many runs: they run in the nightly slow job.
SLOW = (
    "overhead",
    "client-protocols",
    "defenses",
    "boundary",
    "rank",
    "fishing-study",
    "sweep throughput",
)


@dataclass
class Command:
    """One command of the README: its text as printed, README line, words and section."""

    text: str
    line: int
    argv: list[str]
    scheduled: bool = False  # a cron line: its grid is planned here, run by the nightly job
    section: str = ""  # the README's ``## `` heading above it

    @property
    def words(self) -> str:
        """The leakbench command words, e.g. ``sweep throughput`` (``run`` for ``run ...``)."""
        import importlib

        from leakbench.cli import COMMAND_MODULES
        from leakbench.commands import find

        for module in COMMAND_MODULES:  # the commands they declare
            importlib.import_module(module)
        found, _ = find(self.argv[1:])
        return found.name if found else ""

    @property
    def slow(self) -> bool:
        if self.words == "sweep" and "--jobs" in self.argv and not self.scheduled:
            return True  # the README's grid, run for real
        return self.words in SLOW

    def option(self, name: str) -> str | None:
        """The value given to ``--name`` (either spelling), or None."""
        spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
        found = [i for i, word in enumerate(self.argv) if word in spellings]
        return self.argv[found[-1] + 1] if found else None


def code_blocks(text: str) -> Iterator[tuple[str, str, int]]:
    """Every fenced block of ``text``: its language, body and the line its body starts on."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        yield match.group(1), match.group(2), text[: match.start()].count("\n") + 2


def section_at(text: str, line: int) -> str:
    """The README's ``## `` heading above ``line``."""
    headings = re.findall(r"^## (.+)$", "\n".join(text.splitlines()[:line]), re.M)
    return headings[-1] if headings else ""


def readme_commands() -> list[Command]:
    """The shell commands of the README's bash blocks, and the commands its cron lines run;
    ``a && b`` is two commands."""
    commands = []
    text = README.read_text()
    for language, body, start in code_blocks(text):
        if language not in ("bash", "cron", ""):
            continue
        for offset, line in enumerate(body.splitlines()):
            if not line.strip() or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            if language != "bash":  # a schedule: minute hour day month weekday, then the command
                words = words[5:]
                words = words[: words.index(">>")] if ">>" in words else words
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                number = start + offset
                commands.append(
                    Command(
                        line.strip(), number, words[:cut], language != "bash",
                        section_at(text, number),
                    )
                )  # fmt: skip
                words = words[cut + 1 :]
    return [c for c in commands if c.argv[:2] != ["cd", "/path/to/leakbench"]]


def block_starting(prefix: str) -> str:
    """The body of the README's YAML block that begins with ``prefix``."""
    (body,) = [b for lang, b, _ in code_blocks(README.read_text()) if b.startswith(prefix)]
    return body


@dataclass
class Scratch:
    """The folder the commands run in, and what earlier commands made."""

    path: Path
    plugin_path: Path
    last_run: Path | None = None
    first_run: Path | None = None  # the quickstart's
    checkpoints: dict[tuple[str, str], str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scratch:
    folder = tmp_path / "clone"
    shutil.copytree(
        ROOT / "leaderboards", folder / "leaderboards", ignore=shutil.ignore_patterns("site")
    )
    grid = yaml.safe_load(block_starting("# leaderboards/grids/my-grid.yaml"))
    grid["set"] = {**grid.get("set", {}), **GRID_BUDGET}
    (folder / "leaderboards" / "grids" / "my-grid.yaml").write_text(yaml.safe_dump(grid))
    (folder / "my_run.yaml").write_text(block_starting("dataset: lfw-subset"))
    monkeypatch.chdir(folder)
    monkeypatch.setenv("LEAKBENCH_CHECKPOINTS", str(folder / "checkpoints"))
    return Scratch(folder, tmp_path / "plugins")


def filled(command: Command, scratch: Scratch, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The command's words with its placeholders filled and its budget appended."""
    argv = command.argv[1:]
    if "runs/<run>" in argv:
        assert scratch.last_run is not None, f"README line {command.line}: no run made before"
        argv = [str(scratch.last_run) if a == "runs/<run>" else a for a in argv]
    for placeholder, length in (("<sha256>", 64), ("1a2b3c4d", 8)):  # a hash, or its prefix
        if placeholder in argv:
            sha = checkpoint_for(victim_of(command), scratch, capsys)[:length]
            argv = [sha if a == placeholder else a for a in argv]
    if "ENTRY.json" in argv:
        assert Path(SUBMITTED_ENTRY).is_file(), f"README line {command.line}: nothing submitted"
        argv = [SUBMITTED_ENTRY if a == "ENTRY.json" else a for a in argv]
    if BOARD_KEY in argv:
        argv = [str(board_key(scratch, capsys)) if a == BOARD_KEY else a for a in argv]
    argv = [a.replace("my-attack", TEMPLATE_ATTACK).replace("GRID.yaml", "leaderboards/grids/"
            "my-grid.yaml") for a in argv]  # fmt: skip
    if command.words == "run" and any(a in argv for a in ("--resume", "--print-config", "--help")):
        return argv
    budget = BUDGETS.get(command.words, {})
    if TEMPLATE_ATTACK in argv:
        # A track fixes trials and budget (a submission changes only its attacks and their
        # options): the attack's own option keeps it fast instead.
        budget = {
            "--attack_options": f"{{{TEMPLATE_ATTACK}: {{iterations: 2}}}}",
            "--covariates": "[]",  # bookkeeping: an entry's protocol leaves it out
        }
    for key, value in {**budget, **PLACES.get(command.words, {})}.items():
        argv += [key, value]
    return argv


def board_key(scratch: Scratch, capsys: pytest.CaptureFixture[str]) -> Path:
    """A board key made here with ``keygen`` (once), trusted by the scratch copy's board."""
    key = scratch.path.parent / "board.pem"
    if not key.is_file():
        argv = ["leaderboard", "keygen", str(key), "--name", "readme-test"]
        code, out = leakbench([*argv, "--keys_dir", "leaderboards/keys"], capsys)
        assert code == 0, out
    return key


def victim_of(command: Command) -> tuple[str, str]:
    """The (model, dataset) a command attacks: its options, else its command's defaults."""
    from leakbench.commands import COMMANDS
    from leakbench.config import RunConfig

    defaults = {**vars(RunConfig()), **COMMANDS[command.words].defaults}
    return (
        command.option("model") or defaults["model"],
        command.option("dataset") or defaults["dataset"],
    )


def checkpoint_for(
    victim: tuple[str, str], scratch: Scratch, capsys: pytest.CaptureFixture[str]
) -> str:
    """The sha256 of a `leakbench train` checkpoint of ``victim`` (trained here once)."""
    if victim not in scratch.checkpoints:
        model, dataset = victim
        code, out = leakbench(["train", "--model", model, "--dataset", dataset, "--epochs", "1"],
                              capsys)  # fmt: skip
        assert code == 0, out
        scratch.checkpoints[victim] = re.search(r"^checkpoint\s+([0-9a-f]{64})$", out, re.M)[1]
    return scratch.checkpoints[victim]


def leakbench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as done:  # --help: argparse prints and exits
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def install_template(scratch: Scratch) -> None:
    """The template attack package, installed as the README says (no build isolation: it needs
    no package index), into a folder of its own."""
    if scratch.plugin_path.is_dir():
        return
    source = scratch.path.parent / "template-attack"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(scratch.plugin_path), str(source)],
        check=True,
    )  # fmt: skip


def check_install(command: Command) -> None:
    """An install line: what it installs exists, and its CPU index is the workflows'."""
    argv = command.argv
    if argv[1:] == ["-m", "venv", ".venv"]:
        return
    assert argv[:3] == [".venv/bin/pip", "install", "-e"] or argv[:2] == [
        ".venv/bin/pip",
        "install",
    ], command.text
    target = argv[argv.index("-e") + 1]
    extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
    assert extras, f"README line {command.line}: installs {target!r}, not this repository"
    import tomllib

    offered = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in (extras[1] or "").split(",") if extras[1] else []:
        assert extra in offered["optional-dependencies"], f"README line {command.line}: {extra}"
    if "--extra-index-url" in argv:
        assert argv[argv.index("--extra-index-url") + 1] == CPU_INDEX
        for workflow in (ROOT / ".github" / "workflows").glob("*.yml"):
            urls = re.findall(r"--(?:extra-)?index-url\s+(\S+)", workflow.read_text())
            assert all(url == CPU_INDEX for url in urls), workflow


def run_command(command: Command, scratch: Scratch, capsys: pytest.CaptureFixture[str]) -> None:
    """Run one README command as printed (placeholders filled, budget appended)."""
    head = command.argv[0]
    if head in ("python3", ".venv/bin/pip"):
        check_install(command)
        return
    if head == ".venv/bin/pytest":
        assert command.text in (ROOT / ".ci" / "run").read_text(), (
            f"README line {command.line}: .ci/run must run the README's test command verbatim"
        )
        return
    assert head in ("leakbench", ".venv/bin/leakbench"), f"README line {command.line}: {head}"
    assert (BIN / "leakbench").is_file(), "the console script leakbench is not installed"
    argv = filled(command, scratch, capsys)
    if "--launcher" in argv and argv[argv.index("--launcher") + 1] == "slurm":
        if shutil.which("sbatch"):
            scratch.not_run.append(f"line {command.line}: SLURM is here; no job array submitted")
            return
        code, out = leakbench(argv, capsys)
        assert code == 2 and len(out.strip().splitlines()) == 1 and "SLURM" in out, out
        return
    if command.scheduled:  # the nightly grid
        assert (
            "leaderboards/grids/nightly-smoke.yaml"
            in (ROOT / ".github" / "workflows" / "nightly-smoke.yml").read_text()
        )
        argv = [*argv[: argv.index("--jobs")], "--dry-run"]
    if argv[:1] == ["run"] and "--resume" in argv:
        cut_short(Path(argv[argv.index("--resume") + 1]))
    if TEMPLATE_ATTACK in " ".join(argv) or command.words == "submit":
        # leakbench reads the plug-ins' entry points from the path each time: the installed
        # template is on it for this command only (a process of its own per command cost
        # 10 s of CPU in imports alone).
        install_template(scratch)
        sys.path.insert(0, str(scratch.plugin_path))
        try:
            code, out = leakbench(argv, capsys)
        finally:
            sys.path.remove(str(scratch.plugin_path))
    else:
        code, out = leakbench(argv, capsys)
    assert code == 0, f"README line {command.line}: leakbench {shlex.join(argv)}\n{out}"
    assert "Traceback" not in out
    made = re.search(r"^results: (.+)$", out, re.M)
    if made:
        scratch.last_run = Path(made[1])
        scratch.first_run = scratch.first_run or scratch.last_run
    trained = re.search(r"^checkpoint\s+([0-9a-f]{64})$", out, re.M)
    if command.words == "train" and trained:
        scratch.checkpoints[victim_of(command)] = trained[1]


def cut_short(run_dir: Path) -> None:
    """Make ``run_dir`` an interrupted run: its last record is dropped."""
    records = run_dir / "trials.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:-1]))


def test_the_readme_commands_are_all_known():
    commands = readme_commands()
    assert len(commands) > 30
    for command in commands:
        head = command.argv[0]
        known = ("python3", ".venv/bin/pip", ".venv/bin/pytest", "leakbench", ".venv/bin/leakbench")
        assert head in known, f"README line {command.line}: {command.text}"
        if head.endswith("leakbench") and len(command.argv) > 1 and command.argv[1] != "--help":
            assert command.words, f"README line {command.line}: unknown command"


def walk(
    section: str, scratch: Scratch, capsys: pytest.CaptureFixture[str], slow: bool
) -> list[Command]:
    """Run the commands of one README section in order (the slow ones too, with ``slow``); each
    one's wall time goes to stderr, for ``pytest -n 0 -s`` and the durations of a nightly run."""
    ran = []
    for command in readme_commands():
        if command.section != section or (command.slow and not slow):
            continue
        started = time.perf_counter()
        run_command(command, scratch, capsys)
        with capsys.disabled():
            print(f"{time.perf_counter() - started:7.1f} s  README line {command.line}: "
                  f"{shlex.join(command.argv)}", file=sys.stderr)  # fmt: skip
        ran.append(command)
    return ran


def files_of_the_checkout() -> dict[Path, float]:
    """What the README's commands must leave alone: the repository's leaderboards/ and runs."""
    return {p: p.stat().st_mtime for p in (ROOT / "leaderboards").rglob("*") if p.is_file()}


def sections(slow: bool) -> list[str]:
    """The README's sections that hold a command to run (a slow one, with ``slow``), in order.
    A section's commands need only what earlier commands of the section made, so each section
    is a test of its own, and the sections run in parallel."""
    return list(dict.fromkeys(c.section for c in readme_commands() if c.slow == slow))


def test_the_slow_commands_are_the_studies_and_the_grid():
    assert {c.words for c in readme_commands() if c.slow} == {*SLOW, "sweep"}


@pytest.mark.parametrize("section", sections(slow=False))
def test_every_fast_readme_command_runs_as_printed(section, scratch, capsys):
    before = files_of_the_checkout()
    ran = walk(section, scratch, capsys, slow=False)
    assert files_of_the_checkout() == before
    assert ran and not any(c.slow for c in ran)
    if section == "Quickstart":  # the quickstart's run: every cell of it, the skipped one named
        summary = json.loads((scratch.first_run / "summary.json").read_text())
        assert sorted(summary["cells"]) == ["bias__none__b1", "bias__none__b4", "idlg__none__b1"]
        assert summary["skipped"] == {"idlg__none__b4": "idlg handles batches of at most 1"}
    print("\n".join(scratch.not_run))


@pytest.mark.slow
@pytest.mark.parametrize("section", sections(slow=True))
def test_every_readme_command_runs_as_printed(section, scratch, capsys):
    before = files_of_the_checkout()
    ran = walk(section, scratch, capsys, slow=True)
    assert files_of_the_checkout() == before
    assert any(c.slow for c in ran)
    print("\n".join(scratch.not_run))
