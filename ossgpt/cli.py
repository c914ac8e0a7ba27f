"""The `ossgpt` command line: a table of command names to typed functions in `commands.py`;
each function's signature and docstring become its options and help. A table value may itself
be a table (a group: `ossgpt inspect router ...`)."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing

from . import commands
from .errors import OssgptError
from .convert import commands as convert_commands
from .inspect import commands as inspect_commands
from .merge import commands as merge_commands
from .train import commands as train_commands

COMMANDS = {
    "generate": commands.generate,
    "chat": commands.chat,
    "make-random": commands.make_random,
    "train-nano": train_commands.train_nano,
    "eval-nano": commands.eval_nano,
    "eval": commands.evaluate,
    "serve": commands.serve,
    "finetune": train_commands.finetune,
    "bench": commands.bench,
    "merge-adapter": train_commands.merge_adapter,
    "merge": merge_commands.merge,
    "convert": convert_commands.convert,
    "inspect": {
        "router": inspect_commands.router,
        "lens": inspect_commands.lens,
        "attention": inspect_commands.attention,
        "steer": inspect_commands.steer,
    },
}
GROUP_HELP = {"inspect": "Look inside the model: router statistics, logit lens, attention sinks, "
                         "steering vectors (JSON, plots and index.html)"}


def _param_help(doc: str) -> dict[str, str]:
    """`name: help` lines of a docstring."""
    out = {}
    for line in doc.splitlines():
        name, sep, text = line.strip().partition(": ")
        if sep and name.isidentifier():
            out[name] = text
    return out


def _add_options(parser: argparse.ArgumentParser, fn) -> None:
    helps = _param_help(inspect.getdoc(fn) or "")
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind = hints.get(name, str)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        text = helps.get(name, "")
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:     # `ossgpt merge CONFIG ...`
            parser.add_argument(name, type=kind, help=text, metavar=name.upper())
            continue
        # a trailing underscore frees a Python keyword: `from_` is --from
        flag = "--" + name.rstrip("_").replace("_", "-")
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=text, dest=name)
        else:
            suffix = "" if required or default is None else f" (default: {default})"
            parser.add_argument(flag, type=kind, default=default, required=required, dest=name,
                                help=text + suffix, metavar=name.rstrip("_").upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossgpt", description="Run OpenAI's gpt-oss models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, COMMANDS, "command")
    return parser


def _add_commands(sub, table: dict, dest: str) -> None:
    for name, fn in table.items():
        if isinstance(fn, dict):
            summary = GROUP_HELP.get(name, "")
            group = sub.add_parser(name, help=summary, description=summary)
            _add_commands(group.add_subparsers(dest=f"{dest}_{name}", required=True, metavar="ANALYSIS"),
                          fn, f"{dest}_{name}")
            continue
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0]
        p = sub.add_parser(name, help=summary, description=summary)
        _add_options(p, fn)


def check_ranges(args: dict) -> None:
    """Raise OssgptError for the first numeric option outside its range (commands.RANGES)."""
    for name, value in args.items():
        # Only numbers: a text option may share a name with a numeric one (--layers 0,3 of
        # `inspect` against make-random's --layers 4) and is checked by its command.
        if name in commands.RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            allowed, text = commands.RANGES[name]
            if not allowed(value):
                flag = "--" + name.replace("_", "-")
                raise OssgptError(f"{flag} must be {text}, got {value}")


def _join_negative_lists(argv: list[str]) -> list[str]:
    """`--scales -4,0,4` -> `--scales=-4,0,4`: argparse takes a single negative number as a
    value, but reads a comma-separated list that starts with one as an unknown option."""
    out: list[str] = []
    for arg in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1]
                and re.fullmatch(r"-\.?\d[\w.+-]*(,[\w.+-]*)+", arg)):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = _join_negative_lists(sys.argv[1:] if argv is None else list(argv))
    args = vars(build_parser().parse_args(argv))
    fn, dest = COMMANDS[args.pop("command")], "command"
    while isinstance(fn, dict):             # a group: its chosen subcommand
        name = next(key for key in args if key.startswith(dest + "_"))
        dest = name
        fn = fn[args.pop(name)]
    positional = [args.pop(name) for name, p in inspect.signature(fn).parameters.items()
                  if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    try:
        check_ranges(args)
        fn(*positional, **args)
    except KeyboardInterrupt:
        sys.exit(130)
    except OssgptError as e:
        # Problems with what the user gave us: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
