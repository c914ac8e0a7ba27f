"""Held-out evaluation of the built-in tool families as `ossgpt chat` runs them: the model's
reply, its tool calls run by the real tools (`ChatTools` with a BrowserTool over the bundled
corpus and a PythonTool), the results sent back on the call's channel, until it answers.

Scores per conversation: `right_tool` (the first reply calls the expected tool), `first_call`
(with the expected arguments), `final` (the answer after the tool loop contains the expected
fact or number), and for the browser `cited` (the answer's `【cursor†Lx-Ly】` resolves, through
the conversation's own BrowserTool, to the fact's file and line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..harmony import BUILTIN_CALLS, ReplyParser, render_prompt
from .builtin_tools import new_browser, run_python
from .examples import render_options, score, trained_turns

if TYPE_CHECKING:
    from ..model import Transformer
    from .tasks import Example


class _Conversation:
    """One example continued by the model, with its own browser (fresh cursors)."""

    def __init__(self, ex: Example) -> None:
        from ..chat import ChatTools
        self.ex = ex
        self.messages = list(ex.messages[:trained_turns(ex.messages)[0][0]])
        self.browser = new_browser() if "browser" in ex.builtin_tools else None
        # python: the same (cached) tool as the data; code the model writes is new, so it runs
        self.tools = ChatTools(browser=self.browser, python=_Python() if "python" in
                               ex.builtin_tools else None)
        self.callable = {c for b in ex.builtin_tools for c in BUILTIN_CALLS[b]}
        self.first: dict | None = None
        self.final: str | None = None
        self.called: list[str] = []    # "name: arguments" of each call the model made

    def add_reply(self, tokens: list[int]) -> bool:
        """Take the model's reply; run its calls. -> whether the conversation goes on."""
        parser = ReplyParser(self.callable)
        for t in tokens:
            parser.push(t)
        parser.finish()
        reply = parser.reply()
        if self.first is None:
            self.first = score(self.ex, reply)
        if not reply.tool_calls:
            self.final = reply.content
            return False
        n = len(self.called)
        self.messages.append({"role": "assistant", "content": reply.content,
                              "reasoning": reply.reasoning, "tool_calls": [
            {"id": f"call_{n + i}", "type": "function", "channel": c.channel,
             "content_type": c.content_type, "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(reply.tool_calls)]})
        for i, c in enumerate(reply.tool_calls):
            self.messages.append({"role": "tool", "tool_call_id": f"call_{n + i}", "name": c.name,
                                  "channel": c.channel, "content": self.tools(c.name, c.arguments)})
        self.called += [f"{c.name}: {c.arguments}" for c in reply.tool_calls]
        return True

    def result(self) -> dict:
        exp, final = self.ex.expected, self.final or ""
        out = {"family": self.ex.family, "kind": exp.get("kind"), "calls": self.called,
               "answer": final, "right_tool": bool(self.first and self.first.get("right_tool")),
               "first_call": bool(self.first and self.first["correct"]),
               "final": bool(final) and all(w.lower() in final.lower() for w in exp["final_contains"])}
        if "cite" in exp:
            want = exp["cite"]
            out["cited"] = any((c.location or "").endswith(want["path"])
                               and c.source_first is not None
                               and c.source_first <= want["line"] <= c.source_last
                               for c in self.browser.citations(final))
        return out


class _Python:
    """PythonTool's interface over `run_python` (one sandboxed interpreter, outputs cached)."""

    def run(self, session: str, code: str) -> str:
        return run_python(code)

    def close(self) -> None:
        pass


def run_tool_loop(model: Transformer, exs: list[Example], max_rounds: int = 4,
                  max_tokens: int = 128, batch_size: int = 32) -> list[dict]:
    """Greedy conversations of `exs` through up to `max_rounds` replies each, tools run in
    between; one result dict per example (see the module docstring)."""
    from ..generate import generate
    from ..harmony import stop_tokens
    from ..sampling import SamplingParams

    convs = [_Conversation(ex) for ex in exs]
    active = list(convs)
    for _ in range(max_rounds):
        still = []
        for i in range(0, len(active), batch_size):
            part = active[i:i + batch_size]
            prompts = [render_prompt(c.messages, **render_options(c.ex)) for c in part]
            replies: list[list[int]] = [[] for _ in part]
            for ev in generate(model, prompts, max_tokens, SamplingParams(temperature=0),
                               stop_tokens()):
                replies[ev.row].append(ev.token)
            still += [c for c, r in zip(part, replies) if c.add_reply(r)]
        active = still
        if not active:
            break
    return [c.result() for c in convs]


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per family: n, the share of each score, and the final answers' share by kind of
    question (`by_kind`: the python computation, the browser's attribute)."""
    def shares(rows: list[dict]) -> dict:
        return {"n": len(rows)} | {k: round(sum(r[k] for r in rows) / len(rows), 4)
                                   for k, v in rows[0].items() if isinstance(v, bool)}

    out: dict[str, dict] = {}
    for fam in dict.fromkeys(r["family"] for r in results):
        rows = [r for r in results if r["family"] == fam]
        out[fam] = shares(rows)
        by_kind: dict[str, list[dict]] = {}
        for r in rows:
            if r["kind"] is not None:
                by_kind.setdefault(r["kind"], []).append(r)
        if by_kind:
            out[fam]["by_kind"] = {k: {"n": len(part), "final": shares(part)["final"]}
                                   for k, part in by_kind.items()}
    return out
