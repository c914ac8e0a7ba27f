"""Multi-turn chat in the harmony format: a session that keeps the history and streams each
reply, and the terminal loop of `ossgpt chat` that shows reasoning apart from the answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from rich.console import Console

from .generate import generate
from .harmony import Reply, ReplyDelta, ReplyParser, render_prompt, stop_tokens
from .model import Transformer
from .sampling import SamplingParams


class ChatSession:
    """The conversation so far (OpenAI-style messages) and how to extend it."""

    def __init__(self, model: Transformer, *, reasoning_effort: str = "medium",
                 system: str | None = None, developer: str | None = None,
                 tools: list[dict] | None = None, sampling: SamplingParams | None = None,
                 max_tokens: int = 4096):
        self.model = model
        self.render_options = dict(reasoning_effort=reasoning_effort, system=system,
                                   developer=developer, tools=tools)
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
        parser = ReplyParser({(t.get("function") or t)["name"] for t in tools})
        self.finish_reason = None
        for event in generate(self.model, [prompt], self.max_tokens, sampling, stop_tokens()):
            delta = parser.push(event.token)
            if delta is not None and delta.text:
                yield delta
            self.finish_reason = event.finish_reason
        tail = parser.finish()
        if tail is not None and tail.text:
            yield tail
        reply = parser.reply()
        self.last_reply = reply
        assistant: dict = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            assistant["reasoning"] = reply.reasoning
        if reply.tool_calls:
            assistant["tool_calls"] = [
                {"id": f"call_{len(self.history)}_{i}", "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(reply.tool_calls)]
        self.history = messages + [assistant]

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


def converse(session: ChatSession, text: str, console: Console, show_reasoning: bool,
             run_tool: ToolRunner | None, interactive: bool, max_tool_rounds: int = 8) -> None:
    """One user turn, with its tool round trips: calls go to `run_tool` when there is one, to
    the user at the terminal when interactive, and otherwise end the turn."""
    deltas = session.say(text)
    for _ in range(max_tool_rounds):
        print_reply(session, deltas, console, show_reasoning)
        calls = session.last_reply.tool_calls if session.last_reply else []
        if not calls or (run_tool is None and not interactive):
            return
        results = []
        for call in calls:
            if run_tool is not None:
                output = run_tool(call.name, call.arguments)
                console.print(f"← {output}", style="cyan", markup=False, highlight=False)
            else:   # no tool runner: the user plays the tool and types its result
                output = console.input(f"[cyan]{call.name} result> [/]")
            results.append({"role": "tool", "name": call.name, "content": output})
        deltas = session.send(results)


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
