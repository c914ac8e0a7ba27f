"""Multi-turn chat in the harmony format: a session that keeps the history and streams each
reply, and the terminal loop of `ossgpt chat` that shows reasoning apart from the answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console

from .generate import generate
from .harmony import (BUILTIN_CALLS, Reply, ReplyDelta, ReplyParser, ToolCall, render_prompt,
                      stop_tokens)
from .model import Transformer
from .sampling import SamplingParams
from .tools.builtin import call_entry, run_builtin, tool_message


class ChatSession:
    """The conversation so far (OpenAI-style messages) and how to extend it."""

    def __init__(self, model: Transformer, *, reasoning_effort: str = "medium",
                 system: str | None = None, developer: str | None = None,
                 tools: list[dict] | None = None, sampling: SamplingParams | None = None,
                 max_tokens: int = 4096, builtin_tools: Sequence[str] = ()):
        self.model = model
        self.render_options = dict(reasoning_effort=reasoning_effort, system=system,
                                   developer=developer, tools=tools,
                                   builtin_tools=tuple(builtin_tools))
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.history: list[dict] = []
        self.last_reply: Reply | None = None
        self.finish_reason: str | None = None

    def send(self, new_messages: list[dict]) -> Iterator[ReplyDelta]:
        """Add user or tool-result messages and stream the assistant's reply; when the
        iterator ends, the reply is in `last_reply` and in the history."""
        messages = self.history + new_messages
        prompt = render_prompt(messages, **self.render_options)
        # A fresh seed per turn: the same seed would replay the first turn's random draws.
        seed = None if self.sampling.seed is None else self.sampling.seed + len(self.history)
        sampling = dataclasses.replace(self.sampling, seed=seed)
        tools = self.render_options["tools"] or []
        callable_names = {(t.get("function") or t)["name"] for t in tools}
        for builtin in self.render_options["builtin_tools"]:
            callable_names.update(BUILTIN_CALLS[builtin])
        parser = ReplyParser(callable_names)
        self.finish_reason = None
        for token, finish_reason in self._generate(prompt, sampling):
            delta = parser.push(token)
            if delta is not None and delta.text:
                yield delta
            self.finish_reason = finish_reason
        tail = parser.finish()
        if tail is not None and tail.text:
            yield tail
        reply = parser.reply()
        self.last_reply = reply
        assistant: dict = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            assistant["reasoning"] = reply.reasoning
        if reply.tool_calls:
            # channel and content type kept: history renders the call as the model wrote it
            assistant["tool_calls"] = [call_entry(f"call_{len(self.history)}_{i}", c)
                                       for i, c in enumerate(reply.tool_calls)]
        self.history = messages + [assistant]

    def _generate(self, prompt: list[int],
                  sampling: SamplingParams) -> Iterator[tuple[int, str | None]]:
        """The reply's tokens, each with the finish reason (None until the last)."""
        for event in generate(self.model, [prompt], self.max_tokens, sampling, stop_tokens()):
            yield event.token, event.finish_reason

    def say(self, text: str) -> Iterator[ReplyDelta]:
        return self.send([{"role": "user", "content": text}])


def print_reply(session: ChatSession, deltas: Iterator[ReplyDelta], console: Console,
                show_reasoning: bool) -> None:
    """Stream a reply: reasoning dimmed (only with show_reasoning), the answer plain, tool calls
    as `→ name(arguments)` once complete."""
    channel = None
    for delta in deltas:
        if delta.call:                    # tool-call arguments: shown at the end
            continue
        if delta.channel == "analysis" and not show_reasoning:
            continue
        if channel is not None and delta.channel != channel:
            console.print()
        channel = delta.channel
        console.print(delta.text, style="dim" if channel == "analysis" else None, end="",
                      markup=False, highlight=False)
    if channel is not None:
        console.print()
    reply = session.last_reply
    for call in reply.tool_calls if reply else []:
        console.print(f"→ {call.name}({call.arguments})", style="cyan", markup=False, highlight=False)
    if session.finish_reason == "length":
        console.print("[stopped: --max-tokens reached]", style="yellow", markup=False)


ToolRunner = Callable[[str, str], str]
SHOWN_LINES = 12  # of a tool's output, on the terminal (the model gets all of it)


class ChatTools:
    """The tools `ossgpt chat` runs for the model: function tools (`run_function`, e.g. the
    demo tools), and the built-in browser (a BrowserTool) and python (a PythonTool)."""

    def __init__(self, run_function: ToolRunner | None = None, browser: Any = None,
                 python: Any = None) -> None:
        self.run_function = run_function
        self.browser = browser
        self.python = python

    @property
    def builtin_tools(self) -> list[str]:
        return [name for name, tool in (("browser", self.browser), ("python", self.python)) if tool]

    def __call__(self, name: str, arguments: str) -> str:
        output = run_builtin(name, arguments, browser=self.browser, python=self.python,
                             session="chat")
        if output is not None:
            return output
        if self.run_function is not None:
            return self.run_function(name, arguments)
        return f"error: no tool named {name}"

    def close(self) -> None:
        if self.python is not None:
            self.python.close()


def tool_results(calls: list[ToolCall], run_tool: ToolRunner | None,
                 console: Console) -> list[dict]:
    """Each call run (by `run_tool`, else typed by the user at the terminal), as the tool
    messages that answer it, on the channel the call was made on."""
    results = []
    for call in calls:
        if run_tool is not None:
            output = run_tool(call.name, call.arguments)
            lines = output.split("\n")
            shown = "\n".join(lines[:SHOWN_LINES]) + (
                f"\n… ({len(lines) - SHOWN_LINES} more lines)" if len(lines) > SHOWN_LINES else "")
            console.print(f"← {shown}", style="cyan", markup=False, highlight=False)
        else:   # no tool runner: the user plays the tool and types its result
            output = console.input(f"[cyan]{call.name} result> [/]")
        results.append(tool_message(call, output))
    return results


def converse(session: ChatSession, text: str, console: Console, show_reasoning: bool,
             run_tool: ToolRunner | None, interactive: bool, max_tool_rounds: int = 8) -> None:
    """One user turn, with its tool round trips: calls go to `run_tool` when there is one, to
    the user at the terminal when interactive, and otherwise end the turn."""
    deltas = session.say(text)
    for _ in range(max_tool_rounds):
        print_reply(session, deltas, console, show_reasoning)
        calls = session.last_reply.tool_calls if session.last_reply else []
        if not calls or (run_tool is None and not interactive):
            _print_sources(session, run_tool, console)
            return
        deltas = session.send(tool_results(calls, run_tool, console))


def _print_sources(session: ChatSession, run_tool: ToolRunner | None, console: Console) -> None:
    """Where the answer's browser citations (【cursor†Lx-Ly】) point: files or URLs and lines."""
    browser = getattr(run_tool, "browser", None)
    if browser is None or session.last_reply is None:
        return
    for c in browser.citations(session.last_reply.content):
        console.print(f"  【{c.cursor}†L{c.first}-L{c.last}】 {c}", style="dim", markup=False,
                      highlight=False)


def run_repl(session: ChatSession, show_reasoning: bool = False,
             scripted_prompt: str | None = None, run_tool: ToolRunner | None = None) -> None:
    """Interactive loop on a terminal; with `scripted_prompt` (stdin was not a terminal), one
    turn and exit."""
    console = Console(highlight=False)
    if scripted_prompt is not None:
        converse(session, scripted_prompt.strip(), console, show_reasoning, run_tool, False)
        return
    console.print("Chat with the model. /reset clears the history, /exit or Ctrl-D quits.",
                  style="dim")
    while True:
        try:
            text = console.input("[bold green]>>> [/]").strip()
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                session.history = []
            elif text:
                converse(session, text, console, show_reasoning, run_tool, True)
        except KeyboardInterrupt:
            console.print("\n[interrupted]", style="yellow", markup=False)
        except EOFError:
            console.print()
            return
