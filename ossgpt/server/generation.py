"""What every endpoint shares: turning validated parameters into an engine request, and an
assistant reply into a stream of typed pieces (reasoning text, answer text, tool calls) with
the finish reason, token counts and log-probabilities that the API shapes report."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..harmony import ReplyParser, stop_tokens
from ..sampling import SamplingParams
from ..tokenizer import get_tokenizer
from .constrain import ReplyConstraint, check_schema
from .engine import Engine, QueueFull, Sequence
from .protocol import APIError


@dataclass
class Limits:
    max_model_len: int


def sampling_params(temperature: float | None, top_p: float | None, seed: int | None,
                    index: int = 0) -> SamplingParams:
    """OpenAI's defaults (temperature 1, top_p 1); choice i of n draws from seed + i."""
    return SamplingParams(temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p,
                          seed=None if seed is None else seed + index)


def token_budget(prompt: list[int], requested: int | None, limits: Limits, param: str) -> int:
    """How many tokens may be generated; a prompt (plus a requested budget) over the context
    limit is the client's error."""
    room = limits.max_model_len - len(prompt)
    if room <= 0:
        raise APIError(400, f"The prompt is {len(prompt)} tokens, over this model's context "
                            f"length of {limits.max_model_len} tokens.",
                       param="messages", code="context_length_exceeded")
    if requested is not None and requested > room:
        raise APIError(400, f"{param}={requested} plus the {len(prompt)}-token prompt exceeds "
                            f"the context length of {limits.max_model_len} tokens.",
                       param=param, code="context_length_exceeded")
    return requested if requested is not None else room


def resolve_tool_choice(schemas: dict, choice) -> str:
    """tool_choice in either API's shape -> "auto", "required", "none" or a function name."""
    if choice is None:
        return "auto"
    if isinstance(choice, dict):
        # Chat Completions: {"type": "function", "function": {"name"}}; Responses: {"type", "name"}
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not name:
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or a function '
                                'by name', param="tool_choice")
        if name not in schemas:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")
        return name
    if choice == "required" and not schemas:
        raise APIError(400, 'tool_choice "required" needs tools', param="tool_choice")
    return choice


@contextlib.contextmanager
def tokenizing(param: str):
    """Around rendering/tokenizing client text: a ValueError or TypeError is the client's 400,
    and so is the panic of openai-harmony's tokenizer (regex stack overflow) on a huge run of
    text without a break, e.g. a 1 MB word. That panic is a BaseException, which no handler of
    the app catches: the client would get a bare "Internal Server Error" in plain text."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise APIError(400, f"{param}: the text could not be tokenized ({e}); a single run of "
                            f"hundreds of thousands of characters without a space is too long",
                       param=param) from None


def make_constraint(tools: dict[str, dict | None], tool_choice, json_schema: dict | None
                    ) -> ReplyConstraint | None:
    """tool_choice: "auto" | "required" | "none" | a function name; json_schema: {} for
    json_object. The tools render in the prompt whatever the choice; "none" only keeps the
    reply from calling them."""
    for name, schema in tools.items():
        try:
            check_schema(schema)
        except Exception as e:
            raise APIError(400, f"tool {name!r}: its parameters are not a usable JSON schema "
                                f"({e})", param="tools") from None
    if json_schema is not None:
        try:
            check_schema(json_schema or None)
        except Exception as e:
            raise APIError(400, f"response_format: not a usable JSON schema ({e})",
                           param="response_format") from None
    if not tools and json_schema is None:
        return None
    if tool_choice not in ("auto", "required", "none"):
        tools, tool_choice = {tool_choice: tools[tool_choice]}, "required"
    return ReplyConstraint(tools, json_schema, tool_choice)


def submit(engine: Engine, prompt: list[int], max_tokens: int, sampling: SamplingParams,
           constraint: ReplyConstraint | None = None, top_logprobs: int = 0,
           stop: frozenset[int] | None = None, adapter: str | None = None) -> Sequence:
    try:
        return engine.submit(Sequence(prompt, max_tokens, sampling,
                                      frozenset(stop_tokens()) if stop is None else stop,
                                      top_logprobs, constraint, adapter=adapter))
    except QueueFull as e:
        raise APIError(503, str(e), code="server_overloaded", type="server_error") from None


@dataclass
class Piece:
    kind: str        # "reasoning", "content", "call" (a tool call begins: text = name), "arguments"
    text: str
    call: int = -1   # which tool call, for "call" and "arguments"


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ReplyRun:
    """Streams one engine request as Pieces; afterwards holds the totals."""
    engine: Engine
    seq: Sequence
    stop_strings: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # answer tokens only
    reasoning: str = ""
    content: str = ""
    calls: list[dict] = field(default_factory=list)   # {"name", "arguments", "channel", "content_type"}
    builtin: tuple[str, ...] = ()   # built-in tools' calls it may report ("browser.search", ...)

    async def pieces(self) -> AsyncIterator[Piece]:
        # The functions the constraint let the reply call, and so the only calls it reports,
        # and the built-in tools the prompt declared (their calls are not constrained).
        parser = ReplyParser({*(self.seq.constraint.tools if self.seq.constraint else ()),
                              *self.builtin})
        held = ""            # answer text held back while it could begin a stop string
        stopped = False
        async for event in self.engine.stream(self.seq):
            self.completion_tokens += 1
            where = parser.in_content
            delta = parser.push(event.token)
            if where and where[0] == "analysis":
                self.reasoning_tokens += 1
            if where and where[0] == "final" and not where[1]:
                self.logprobs.append(TokenLogprob(event.token, event.logprob, event.top_logprobs))
            if event.finish_reason:
                self.finish_reason = event.finish_reason
            for d in [delta] + ([parser.finish()] if event.finish_reason else []):
                if d is None:
                    continue
                if d.call:  # a complete call, its arguments whole
                    self.calls.append({"name": d.call, "arguments": d.text,
                                       "channel": d.channel, "content_type": d.content_type})
                    yield Piece("call", d.call, len(self.calls) - 1)
                    yield Piece("arguments", d.text, len(self.calls) - 1)
                elif d.channel == "analysis":
                    self.reasoning += d.text
                    yield Piece("reasoning", d.text)
                else:
                    text, stopped = self._check_stop(held + d.text)
                    held = "" if stopped else _holdback(text, self.stop_strings)
                    out = text[:len(text) - len(held)]
                    if out:
                        self.content += out
                        yield Piece("content", out)
            if stopped:
                self.finish_reason = "stop"
                self.engine.cancel(self.seq)
                break
        if held:
            self.content += held
            yield Piece("content", held)
        if self.seq.error:
            raise APIError(500, self.seq.error)
        if self.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def _check_stop(self, text: str) -> tuple[str, bool]:
        cut = first_stop(text, self.stop_strings)
        return (text[:cut], True) if cut >= 0 else (text, False)

    async def run(self) -> "ReplyRun":
        async for _ in self.pieces():
            pass
        return self


def first_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string begins in text, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _holdback(text: str, stops: list[str]) -> str:
    """The longest end of `text` that is a proper prefix of a stop string."""
    best = ""
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), len(best), -1):
            if text.endswith(s[:n]):
                best = text[-n:]
                break
    return best


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    return stops


def token_text(token: int) -> tuple[str, list[int]]:
    raw = get_tokenizer().decode_bytes([token])
    return raw.decode("utf-8", errors="replace"), list(raw)
