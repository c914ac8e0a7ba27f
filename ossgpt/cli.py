"""The `ossgpt` command line: a table of command names to typed functions in `commands.py`;
each function's signature and docstring become its options and help."""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing

from . import commands
from .errors import OssgptError

COMMANDS = {
    "generate": commands.generate,
    "chat": commands.chat,
    "make-random": commands.make_random,
    "train-nano": commands.train_nano,
    "eval-nano": commands.eval_nano,
    "eval": commands.evaluate,
    "serve": commands.serve,
    "finetune": commands.finetune,
    "bench": commands.bench,
    "merge-adapter": commands.merge_adapter,
}


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
        flag = "--" + name.replace("_", "-")
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        text = helps.get(name, "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            suffix = "" if required or default is None else f" (default: {default})"
            parser.add_argument(flag, type=kind, default=default, required=required,
                                help=text + suffix, metavar=name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossgpt", description="Run OpenAI's gpt-oss models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0]
        p = sub.add_parser(name, help=summary, description=summary)
        _add_options(p, fn)
    return parser


def check_ranges(args: dict) -> None:
    """Raise OssgptError for the first numeric option outside its range (commands.RANGES)."""
    for name, value in args.items():
        if name in commands.RANGES and value is not None:
            allowed, text = commands.RANGES[name]
            if not allowed(value):
                flag = "--" + name.replace("_", "-")
                raise OssgptError(f"{flag} must be {text}, got {value}")


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    fn = COMMANDS[args.pop("command")]
    try:
        check_ranges(args)
        fn(**args)
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
