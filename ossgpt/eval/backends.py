"""Where replies come from: the model in this process through the batching engine, or an
OpenAI-compatible endpoint (ossgpt serve, vLLM, Ollama, ...) through the `openai` client.

Both take the same requests, each with its own seed, and give the same `Generation`s: with
`ossgpt serve --batch-invariant` on the same checkpoint an endpoint's replies equal the
in-process ones token for token. The seed travels as the request's `seed`, which the server
turns into a generator exactly as the in-process engine does (server/engine.py:
`make_generators(seed, 1)`: torch.Generator().manual_seed(seed)); the engine here runs with
`batch_invariant`, so a reply does not depend on the batch it decoded in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import OssgptError
from ..harmony import ParsedMessage, Reply, ReplyParser, ToolCall, render_prompt, stop_tokens


@dataclass
class Request:
    key: str                     # the task's key (sample, effort, repeat)
    messages: list[dict]
    effort: str
    seed: int
    max_tokens: int
    temperature: float
    top_p: float
    tools: list[dict] | None = None
    date: str | None = None      # the conversation date rendered in-process (endpoints: theirs)


@dataclass
class Generation:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # {"name", "arguments"}
    harmony: str = ""            # the reply as harmony text (tokens decoded; endpoints: rebuilt)
    tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str = "stop"
    error: str | None = None

    def reply(self) -> Reply:
        """As ossgpt.harmony's Reply (what nano's scorer reads): analysis, then the answer."""
        messages = []
        if self.reasoning:
            messages.append(ParsedMessage("assistant", "analysis", None, None, self.reasoning))
        if self.content:
            messages.append(ParsedMessage("assistant", "final", None, None, self.content))
        calls = [ToolCall(c["name"], c["arguments"]) for c in self.tool_calls]
        return Reply(self.reasoning, self.content, calls, messages,
                     well_formed=bool(self.content or calls))


Done = Callable[[Request, Generation], None]


def harmony_text(g: Generation) -> str:
    """An endpoint's reply rebuilt as harmony text (it sends the channels apart)."""
    parts = []
    if g.reasoning:
        parts.append(f"<|channel|>analysis<|message|>{g.reasoning}<|end|>")
    for c in g.tool_calls:
        parts.append(f"<|start|>assistant<|channel|>commentary to=functions.{c['name']} "
                     f"<|constrain|>json<|message|>{c['arguments']}<|call|>")
    if g.content:
        parts.append(f"<|start|>assistant<|channel|>final<|message|>{g.content}<|return|>")
    return "".join(parts)


class LocalBackend:
    """The model in this process: every request goes to one batching engine (server/engine.py)
    holding up to `batch` sequences, which take the place of finished ones as they end."""

    def __init__(self, model, batch: int = 8, name: str = "nano") -> None:
        self.model, self.batch, self.name = model, batch, name

    def describe(self) -> str:
        return f"{self.name} in-process, batch {self.batch}"

    def run(self, requests: list[Request], done: Done) -> None:
        if requests:
            asyncio.run(self._run(requests, done))

    async def _run(self, requests: list[Request], done: Done) -> None:
        from ..sampling import SamplingParams
        from ..server.engine import Engine, Sequence

        engine = Engine(self.model, max_batch=self.batch, max_queue=len(requests) + 1,
                        batch_invariant=True)
        stops = frozenset(stop_tokens())

        async def one(req: Request) -> None:
            prompt = render_prompt(req.messages, reasoning_effort=req.effort, tools=req.tools,
                                   date=req.date)
            seq = engine.submit(Sequence(prompt, req.max_tokens,
                                         SamplingParams(req.temperature, req.top_p, seed=req.seed),
                                         stops))
            tokens, finish = [], "stop"
            try:
                async for event in engine.stream(seq):
                    tokens.append(event.token)
                    finish = event.finish_reason or finish
            except RuntimeError as e:
                done(req, Generation(error=str(e)))
                return
            done(req, generation_from_tokens(tokens, finish, req.tools))

        try:
            await asyncio.gather(*(one(r) for r in requests))
        finally:
            engine.shutdown()


def generation_from_tokens(tokens: list[int], finish: str, tools: list[dict] | None) -> Generation:
    """Read a reply as the server does (server/generation.py ReplyRun): the same parser, the
    same split into reasoning, answer and calls, the same reasoning-token count."""
    from ..tokenizer import get_tokenizer

    names = [t["function"]["name"] if "function" in t else t["name"] for t in tools or []]
    parser = ReplyParser(names)
    g = Generation(tokens=len(tokens), finish_reason=finish,
                   harmony=get_tokenizer().decode(tokens))
    for token in tokens:
        where = parser.in_content
        delta = parser.push(token)
        if where and where[0] == "analysis":
            g.reasoning_tokens += 1
        _add(g, delta)
    _add(g, parser.finish())
    if g.tool_calls and finish == "stop":
        g.finish_reason = "tool_calls"
    return g


def _add(g: Generation, delta) -> None:
    if delta is None:
        return
    if delta.call:
        g.tool_calls.append({"name": delta.call, "arguments": delta.text})
    elif delta.channel == "analysis":
        g.reasoning += delta.text
    else:
        g.content += delta.text


class EndpointBackend:
    """An OpenAI-compatible server, `batch` requests in flight at a time."""

    def __init__(self, base_url: str, api: str = "chat", model: str | None = None,
                 batch: int = 8, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        import openai

        if api not in ("chat", "responses"):
            raise OssgptError(f"--api must be chat or responses, got {api!r}")
        self.base_url, self.api, self.batch = base_url, api, batch
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused",
                                    timeout=timeout_s, max_retries=2)
        try:
            served = [m.id for m in self.client.models.list().data]
        except openai.APIConnectionError:
            raise OssgptError(f"cannot reach {base_url} (is the server running? the URL "
                              f"should end in /v1)") from None
        except openai.APIStatusError as e:
            raise OssgptError(f"{base_url}: GET /models failed with HTTP {e.status_code} "
                              f"({e.message})") from None
        if model is None or model == "nano" and model not in served:
            if not served:
                raise OssgptError(f"{base_url} serves no model")
            model = served[0]
        self.model = model

    def describe(self) -> str:
        return f"{self.model} at {self.base_url} ({self.api} API, {self.batch} at a time)"

    def run(self, requests: list[Request], done: Done) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.batch) as pool:
            futures = {pool.submit(self._one, r): r for r in requests}
            try:
                for future in concurrent.futures.as_completed(futures):
                    done(futures[future], future.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _one(self, req: Request) -> Generation:
        import openai

        try:
            return self._chat(req) if self.api == "chat" else self._responses(req)
        except openai.APIConnectionError:
            raise OssgptError(f"lost the connection to {self.base_url}") from None
        except openai.APIStatusError as e:   # this request's problem: record it, go on
            return Generation(error=f"HTTP {e.status_code}: {e.message}")

    def _chat(self, req: Request) -> Generation:
        extra = {"tools": req.tools} if req.tools else {}
        r = self.client.chat.completions.create(
            model=self.model, messages=req.messages, max_tokens=req.max_tokens,
            temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            reasoning_effort=req.effort, **extra)
        choice = r.choices[0]
        message = choice.message
        extras = message.model_extra or {}
        reasoning = extras.get("reasoning") or extras.get("reasoning_content") or ""
        g = Generation(reasoning=reasoning, content=message.content or "",
                       tool_calls=[{"name": c.function.name, "arguments": c.function.arguments}
                                   for c in message.tool_calls or []],
                       finish_reason=choice.finish_reason or "stop")
        if r.usage:
            g.tokens = r.usage.completion_tokens
            details = r.usage.completion_tokens_details
            g.reasoning_tokens = (details.reasoning_tokens or 0) if details else 0
        g.harmony = harmony_text(g)
        return g

    def _responses(self, req: Request) -> Generation:
        extra = ({"tools": [{"type": "function", **t["function"]} for t in req.tools]}
                 if req.tools else {})
        r = self.client.responses.create(
            model=self.model, input=req.messages, max_output_tokens=req.max_tokens,
            temperature=req.temperature, top_p=req.top_p, reasoning={"effort": req.effort},
            extra_body={"seed": req.seed}, **extra)
        g = Generation()
        for item in r.output:
            if item.type == "reasoning":
                g.reasoning += "".join(getattr(c, "text", "") for c in item.content or [])
            elif item.type == "message":
                g.content += "".join(getattr(c, "text", "") for c in item.content or [])
            elif item.type == "function_call":
                g.tool_calls.append({"name": item.name, "arguments": item.arguments})
        g.finish_reason = "length" if r.status == "incomplete" else (
            "tool_calls" if g.tool_calls else "stop")
        if r.usage:
            g.tokens = r.usage.output_tokens
            g.reasoning_tokens = r.usage.output_tokens_details.reasoning_tokens or 0
        g.harmony = harmony_text(g)
        return g
