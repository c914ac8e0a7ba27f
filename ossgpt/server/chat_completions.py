"""POST /v1/chat/completions: messages in, one assistant turn out (or streamed as chunks).

The reasoning (harmony's analysis channel) is returned apart from the answer, as `reasoning`
(what the OpenAI Agents SDK and openai/gpt-oss read) and `reasoning_content` (vLLM's name)."""

from __future__ import annotations

import asyncio
import time
import uuid

from ..harmony import render_prompt
from .generation import (Limits, ReplyRun, make_constraint, resolve_tool_choice,
                         sampling_params, stop_list, submit, token_budget, token_text,
                         tokenizing)
from .protocol import APIError, ChatCompletionRequest


def _tools_and_choice(req: ChatCompletionRequest) -> tuple[list[dict], dict, str]:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
    return tools, schemas, resolve_tool_choice(schemas, req.tool_choice)


def _json_schema(req: ChatCompletionRequest) -> dict | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {}
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format")
    return schema


def prepare(req: ChatCompletionRequest, limits: Limits):
    """Validate and render: -> (prompt tokens, generation settings)."""
    tools, schemas, choice = _tools_and_choice(req)
    json_schema = _json_schema(req)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    with tokenizing("messages"):
        prompt = render_prompt(messages, reasoning_effort=req.reasoning_effort or "medium",
                               tools=tools or None)
    requested = req.max_completion_tokens or req.max_tokens
    budget = token_budget(prompt, requested, limits,
                          "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return prompt, dict(budget=budget, schemas=schemas, choice=choice, json_schema=json_schema,
                        stops=stop_list(req.stop))


def _runs(engine, req: ChatCompletionRequest, prompt: list[int], s: dict) -> list[ReplyRun]:
    runs = []
    for i in range(req.n):
        constraint = make_constraint(s["schemas"], s["choice"], s["json_schema"])
        seq = submit(engine, prompt, s["budget"], sampling_params(req.temperature, req.top_p,
                     req.seed, i), constraint, top_logprobs=req.top_logprobs or 0,
                     adapter=s.get("adapter"))
        runs.append(ReplyRun(engine, seq, s["stops"]))
    return runs


def _logprobs(run: ReplyRun) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(t.token, t.logprob),
                         "top_logprobs": [entry(i, v) for i, v in t.top]} for t in run.logprobs],
            "refusal": None}


def _tool_calls(run: ReplyRun, ids: list[str]) -> list[dict]:
    return [{"id": ids[i], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(run.calls)]


def _usage(prompt: list[int], runs: list[ReplyRun]) -> dict:
    completion = sum(r.completion_tokens for r in runs)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion,
            "total_tokens": len(prompt) + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(r.reasoning_tokens for r in runs)},
            "prompt_tokens_details": {"cached_tokens": min(r.seq.cached_tokens for r in runs)}}


async def complete(engine, req: ChatCompletionRequest, model: str, prompt, s) -> dict:
    runs = _runs(engine, req, prompt, s)
    await asyncio.gather(*(r.run() for r in runs))
    choices = []
    for i, run in enumerate(runs):
        message = {"role": "assistant", "content": run.content or None,
                   "reasoning": run.reasoning or None, "reasoning_content": run.reasoning or None,
                   "refusal": None}
        if run.calls:
            message["tool_calls"] = _tool_calls(run, [_call_id() for _ in run.calls])
        choices.append({"index": i, "message": message, "finish_reason": run.finish_reason,
                        "logprobs": _logprobs(run) if req.logprobs else None})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(prompt, runs), "system_fingerprint": None}


async def stream(engine, req: ChatCompletionRequest, model: str, prompt, s):
    """Chunks as dicts (the route adds SSE framing and [DONE]); the n choices interleave."""
    runs = _runs(engine, req, prompt, s)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": None}
    queue: asyncio.Queue = asyncio.Queue()

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        return {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                     "logprobs": logprobs}]}

    async def pump(i: int, run: ReplyRun) -> None:
        try:
            await queue.put(chunk(i, {"role": "assistant", "content": ""}))
            ids: list[str] = []
            sent = 0
            async for p in run.pieces():
                if p.kind == "reasoning":
                    delta = {"reasoning": p.text, "reasoning_content": p.text}
                elif p.kind == "content":
                    delta = {"content": p.text}
                elif p.kind == "call":
                    ids.append(_call_id())
                    delta = {"tool_calls": [{"index": p.call, "id": ids[-1], "type": "function",
                                             "function": {"name": p.text, "arguments": ""}}]}
                else:
                    delta = {"tool_calls": [{"index": p.call, "function": {"arguments": p.text}}]}
                lp = None
                if req.logprobs and p.kind == "content":
                    lp = _logprobs(run)
                    lp["content"] = lp["content"][sent:]
                    sent += len(lp["content"])
                await queue.put(chunk(i, delta, logprobs=lp))
            await queue.put(chunk(i, {}, run.finish_reason))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(runs)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            else:
                yield item
        for t in tasks:
            t.result()  # re-raise a failure
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": _usage(prompt, runs)}
    finally:
        for t in tasks:
            t.cancel()
        for r in runs:
            engine.cancel(r.seq)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
