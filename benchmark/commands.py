"""The command registry: every ``leakbench`` subcommand is a typed function.

A command is declared with :func:`command` in a light module (no torch at module level; heavy
imports go inside the function) that :data:`leakbench.cli.COMMAND_MODULES` names. Its options
come from its signature, read by jsonargparse:

* a parameter whose type is a dataclass (``config: RunConfig``) contributes every field as a
  config-file key and a ``--field value`` option (nested ``--budget.max_seconds 5``, lists
  ``--attacks [bias,idlg]``), with ``--config FILE.yaml`` and ``--print_config``;
* a positional parameter (before ``*``, without a default) is a positional argument; one typed
  ``list[X] | None = None`` takes zero or more words (none: None);
* a keyword-only parameter is ``--name value`` (a ``bool`` one is ``--name`` / ``--no_name``);
* a parameter typed :data:`Given` receives the keys the user gave (file and command line).

Help text comes from the docstrings (the function's ``Args:`` and the dataclass's). Spellings
with dashes (``--output-dir``) are accepted for every option with underscores.

Example (``leakbench hello --name ada --times 2``)::

    @command("hello")
    def hello(*, name: str = "world", times: int = 1) -> int:
        '''Greet someone.

        Args:
            name: Who to greet.
            times: How often.
        '''
        print(f"hello {name}\\n" * times, end="")
        return 0
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from leakbench.config import (
    ConfigError,
    _register_types,
    command_line_numbers,
    one_line,
    read_yaml,
    validated,
)

# Handled before parsing (jsonargparse reserves --print_config for its own config files).
PRINT_CONFIG = "--print-config"


class Given(dict):
    """The keys a user gave, from the config file and the command line (type marker)."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its words (``"leaderboard verify"``), function and option settings."""

    name: str
    function: Callable[..., int]
    # Keys of the first dataclass parameter (the shared RunConfig) this command offers (None:
    # all); a later dataclass parameter (a study's own keys) offers all of its fields.
    keys: frozenset[str] | None = None
    # Per-command defaults of dataclass fields (a study's own victim, batch sizes, ...).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Old repeated flags kept working: flag -> list key, e.g. {"--attack": "attacks"}.
    repeated: Mapping[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.function) or "").split("\n\n")[0].replace("\n", " ")


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    *,
    keys: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    repeated: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Declare ``function`` as the subcommand ``name`` (words separated by spaces)."""

    def decorator(function: Callable[..., int]) -> Callable[..., int]:
        if name in COMMANDS and COMMANDS[name].function is not function:
            raise ValueError(f"command {name!r} is already declared by {COMMANDS[name].function}")
        COMMANDS[name] = Command(
            name,
            function,
            None if keys is None else frozenset(keys),
            dict(defaults or {}),
            dict(repeated or {}),
        )
        return function

    return decorator


def _parameter_docs(function: Callable[..., Any]) -> dict[str, str]:
    import docstring_parser

    parsed = docstring_parser.parse(inspect.getdoc(function) or "")
    return {p.arg_name: (p.description or "").replace("\n", " ") for p in parsed.params}


def _optional_list_item(hint: Any) -> Any:
    """``X`` for ``list[X] | None``, else None."""
    args = typing.get_args(hint)
    if type(None) not in args:
        return None
    lists = [a for a in args if typing.get_origin(a) is list]
    return typing.get_args(lists[0])[0] if len(lists) == 1 and len(args) == 2 else None


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@dataclass
class _Plan:
    """A command's parser and how its parameters are filled."""

    parser: Any
    dataclasses: dict[str, type]  # parameter -> dataclass type
    plain: list[str]  # parameters read straight from the parsed arguments
    given_parameter: str | None


def build(cmd: Command) -> _Plan:
    """The jsonargparse parser of one command."""
    from jsonargparse import ActionYesNo, ArgumentParser

    _register_types()
    parser = ArgumentParser(
        prog=f"leakbench {cmd.name}",
        description=inspect.getdoc(cmd.function).split("\nArgs:")[0]
        if cmd.function.__doc__
        else None,
        exit_on_error=False,
    )
    hints = typing.get_type_hints(cmd.function)
    docs = _parameter_docs(cmd.function)
    plan = _Plan(parser, {}, [], None)
    for name, parameter in inspect.signature(cmd.function).parameters.items():
        hint = hints.get(name, str)
        if hint is Given:
            plan.given_parameter = name
        elif _is_dataclass_type(hint):
            first = not plan.dataclasses
            plan.dataclasses[name] = hint
            offered = {f.name for f in dataclasses.fields(hint)}
            skip = offered - cmd.keys if cmd.keys is not None and first else set()
            parser.add_class_arguments(hint, nested_key=None, skip=skip)
            if cmd.defaults:
                parser.set_defaults({k: v for k, v in cmd.defaults.items() if k in offered})
        elif parameter.kind is not parameter.KEYWORD_ONLY and parameter.default is parameter.empty:
            plan.plain.append(name)
            if typing.get_origin(hint) is list:  # one or more words, each an item
                parser.add_argument(
                    name, type=typing.get_args(hint)[0], nargs="+", help=docs.get(name)
                )
            else:
                parser.add_argument(name, type=hint, help=docs.get(name))
        elif parameter.kind is not parameter.KEYWORD_ONLY and _optional_list_item(hint):
            plan.plain.append(name)  # zero or more words; none gives the default None
            parser.add_argument(
                name, type=_optional_list_item(hint), nargs="*", default=None, help=docs.get(name)
            )
        else:
            plan.plain.append(name)
            default = None if parameter.default is parameter.empty else parameter.default
            if f"--{name}" in cmd.repeated:  # an older repeated flag of the same name
                parser.add_argument(f"--{name}", action="append", default=None, help=docs.get(name))
            elif hint is bool:
                parser.add_argument(
                    f"--{name}", action=ActionYesNo, default=default, help=docs.get(name)
                )
            else:
                parser.add_argument(
                    f"--{name}",
                    type=hint,
                    default=default,
                    required=parameter.default is parameter.empty,
                    help=docs.get(name),
                )
    if plan.dataclasses:
        parser.add_argument(
            "--config",
            type=str | None,
            help="YAML file of config keys; options given on the line win. "
            f"{PRINT_CONFIG} prints the resolved configuration as YAML and exits",
        )
    for flag, key in cmd.repeated.items():
        if flag == f"--{key}" and key in plan.plain:
            continue
        parser.add_argument(
            flag,
            dest=f"_repeated_{key}",
            action="append",
            default=None,
            metavar="ITEM",
            help=f"one item of --{key}; repeatable (older spelling)",
        )
    # Options are defined with underscores (a config file's keys) and given either way
    # (``_normalised``); the help shows the spelling the README uses: ``--dry-run``.
    underscored_help = parser.format_help
    parser.format_help = lambda: _dashed(underscored_help())
    return plan


def _dashed(text: str) -> str:
    """``--dry_run`` -> ``--dry-run`` for every option named in ``text``."""
    return re.sub(r"(?<![\w-])--([\w.]+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def _normalised(parser: Any, argv: Sequence[str]) -> list[str]:
    """``--output-dir`` -> ``--output_dir`` (and ``--no-progress``), where only the
    underscore spelling is an option."""
    known = set(parser._option_string_actions)
    out = []
    for token in argv:
        flag, sep, value = token.partition("=")
        if flag.startswith("--") and flag not in known:
            underscored = "--" + flag[2:].replace("-", "_")
            if underscored in known:
                token = underscored + sep + value
        out.append(token)
    return out


def merged(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; a nested mapping (``budget``) is merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def invoke(cmd: Command, argv: Sequence[str]) -> int:
    """Parse ``argv`` for ``cmd``, validate everything, then call its function."""
    plan = build(cmd)
    print_config = bool(plan.dataclasses) and any(
        a in (PRINT_CONFIG, "--print_config") for a in argv
    )
    argv = _normalised(plan.parser, [a for a in argv if a not in (PRINT_CONFIG, "--print_config")])
    try:
        with command_line_numbers():
            given_cli = plan.parser.parse_args(argv, defaults=False).as_dict()
            parsed = plan.parser.parse_args(argv).as_dict()
    except Exception as exc:  # jsonargparse's ArgumentError
        raise ConfigError(one_line(exc)) from None
    # --config is the shared configuration's file only where a command has one (a study's
    # own ``config`` parameter, such as a defense track's file, is passed as it is).
    config_path = parsed.get("config") if plan.dataclasses else None
    from_file = read_yaml(config_path) if config_path else {}
    source = str(config_path) if config_path else "command line"
    # The first dataclass (the shared RunConfig) owns only the keys the command offers of it;
    # a study's own keys (its attack_options, say) never reach the shared configuration.
    owned = {
        name: [
            f.name
            for f in dataclasses.fields(cls)
            if cmd.keys is None or position > 0 or f.name in cmd.keys
        ]
        for position, (name, cls) in enumerate(plan.dataclasses.items())
    }
    offered = {k for keys in owned.values() for k in keys}
    unknown = sorted(set(from_file) - offered)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; "
            f"valid keys: {', '.join(sorted(offered))}"
        )
    given = merged(from_file, {k: v for k, v in given_cli.items() if k in offered})
    for flag, key in cmd.repeated.items():
        items = parsed.get(f"_repeated_{key}")
        if flag == f"--{key}" and key in plan.plain:
            items, parsed[key] = parsed.get(key), None
        if items and key in plan.plain:
            parsed[key] = [*(parsed.get(key) or []), *(yaml.safe_load(i) for i in items)]
        elif items:
            # Read like every command-line value: YAML (``--batch-size 4`` is the integer 4).
            given[key] = [*given_cli.get(key, []), *(yaml.safe_load(i) for i in items)]
    kwargs: dict[str, Any] = {}
    for name, cls in plan.dataclasses.items():
        values = merged(
            {k: v for k, v in cmd.defaults.items() if k in owned[name]},
            {k: v for k, v in given.items() if k in owned[name]},
        )
        factory = getattr(cls, "from_mapping", None)
        kwargs[name] = factory(values, source) if factory else validated(cls, values, source)
    for name in plan.plain:
        kwargs[name] = parsed.get(name)
    if plan.given_parameter:
        kwargs[plan.given_parameter] = Given(given)
    if print_config:
        resolved: dict[str, Any] = {}
        for name in plan.dataclasses:
            value = kwargs[name]
            values = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
            resolved.update({k: v for k, v in values.items() if k in offered})
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        return 0
    return cmd.function(**kwargs)


def find(argv: Sequence[str]) -> tuple[Command | None, list[str]]:
    """The command named by the leading words of ``argv`` (the longest match), and the rest."""
    for length in range(min(len(argv), 3), 0, -1):
        name = " ".join(argv[:length])
        if name in COMMANDS:
            return COMMANDS[name], list(argv[length:])
    return None, list(argv)


def groups() -> dict[str, list[Command]]:
    """Commands by their first word, for the overview and for ``leakbench GROUP --help``."""
    grouped: dict[str, list[Command]] = {}
    for name in sorted(COMMANDS):
        grouped.setdefault(name.split()[0], []).append(COMMANDS[name])
    return grouped


def describe(name: str) -> str:
    return re.sub(r"\s+", " ", COMMANDS[name].summary)
