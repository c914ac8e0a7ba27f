"""mkdocs hook: the reference pages written from the code itself, so they cannot drift from it.

`<!-- generated: cli -->` becomes every `ossgpt` command with its options, read from the parser
the command line builds (`ossgpt.cli.build_parser`); `<!-- generated: http -->` becomes every
route of the server with its request body's fields, read from the FastAPI app `ossgpt serve`
runs (on nano) and the pydantic models that validate the bodies."""

from __future__ import annotations

import argparse
import inspect
import typing

import pydantic

MARK = "<!-- generated: {} -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARK.format("cli") in markdown:
        markdown = markdown.replace(MARK.format("cli"), cli_reference())
    if MARK.format("http") in markdown:
        markdown = markdown.replace(MARK.format("http"), http_reference())
    return markdown


# -- the command line --------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _commands(parser: argparse.ArgumentParser, prefix: str):
    """(name, parser) for each command under `parser`, groups flattened, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                has_sub = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                yield f"{prefix} {name}", sub, has_sub
                if has_sub:
                    yield from _commands(sub, f"{prefix} {name}")


def cli_reference() -> str:
    from ossgpt.cli import build_parser
    out = []
    for name, parser, is_group in _commands(build_parser(), "ossgpt"):
        out += [f"## `{name}`", "", _cell(parser.description or ""), ""]
        if is_group:
            continue
        out += ["```text", parser.format_usage().strip(), "```", "",
                "| option | default | what |", "|---|---|---|"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{f}`" for f in action.option_strings)
            if isinstance(action, argparse.BooleanOptionalAction):
                flags = f"`{action.option_strings[0]}` / `{action.option_strings[1]}`"
            default = "required" if action.required else ("" if action.default is None else f"`{action.default}`")
            text = (action.help or "").split(" (default: ")[0]
            out.append(f"| {flags} | {default} | {_cell(text)} |")
        out.append("")
    return "\n".join(out)


# -- the HTTP API ------------------------------------------------------------------------------

def _type_name(annotation) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def _constraints(field) -> str:
    parts = []
    for item in field.metadata:
        for key in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(item, key, None)
            if value is not None:
                parts.append(f"{key} {value}")
    return ", ".join(parts)


def _body_model(endpoint) -> type[pydantic.BaseModel] | None:
    for param in inspect.signature(endpoint).parameters.values():
        hint = typing.get_type_hints(endpoint).get(param.name)
        if isinstance(hint, type) and issubclass(hint, pydantic.BaseModel):
            return hint
    return None


def http_reference() -> str:
    import ossgpt
    from fastapi.routing import APIRoute
    from ossgpt.server.app import create_app

    app = create_app(ossgpt.load("nano", progress=False), "nano")
    try:
        routes = [r for r in app.routes if isinstance(r, APIRoute)]
    finally:
        app.state.engine.shutdown()
    out = ["| method | path | body |", "|---|---|---|"]
    bodies = []
    for route in routes:
        model = _body_model(route.endpoint)
        out.append(f"| {', '.join(sorted(route.methods))} | `{route.path}` | "
                   + (f"[`{model.__name__}`](#{model.__name__.lower()})" if model else "") + " |")
        if model and model not in bodies:
            bodies.append(model)
    for model in bodies:
        out += ["", f"### {model.__name__}", "", "| field | type | default | allowed |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else f"`{field.default!r}`"
            out.append(f"| `{name}` | `{_cell(_type_name(field.annotation))}` | {default} | "
                       f"{_cell(_constraints(field))} |")
    return "\n".join(out)
