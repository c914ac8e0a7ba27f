"""POST /v1/completions: raw text continuation of a prompt, no chat format."""

from __future__ import annotations

import asyncio
import time
import uuid

from ..tokenizer import ENDOFTEXT, RETURN, VOCAB_SIZE, IncrementalDecoder, get_tokenizer
from .generation import (Limits, first_stop, sampling_params, stop_list, submit, token_budget,
                         token_text, tokenizing)
from .protocol import APIError, CompletionRequest

_STOP = frozenset((ENDOFTEXT, RETURN))


def prepare(req: CompletionRequest, limits: Limits) -> tuple[list[int], int, list[str]]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        with tokenizing("prompt"):
            tokens = get_tokenizer().encode(prompt, allow_special=True)
    else:
        tokens = list(prompt)
        if any(not 0 <= t < VOCAB_SIZE for t in tokens):
            raise APIError(400, "prompt: token ids out of range", param="prompt")
    if not tokens:
        raise APIError(400, "prompt is empty", param="prompt")
    return tokens, token_budget(tokens, req.max_tokens, limits, "max_tokens"), stop_list(req.stop)


class _Choice:
    """One sampled continuation: decoded incrementally, cut at a stop string."""

    def __init__(self, engine, req: CompletionRequest, prompt: list[int], budget: int,
                 stops: list[str], index: int, adapter: str | None = None) -> None:
        self.engine, self.stops = engine, stops
        self.seq = submit(engine, prompt, budget, sampling_params(req.temperature, req.top_p,
                          req.seed, index), top_logprobs=req.logprobs or 0, stop=_STOP,
                          adapter=adapter)
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.text = ""
        self.finish_reason = "stop"

    async def deltas(self):
        decoder = IncrementalDecoder(get_tokenizer(), skip_special=True)
        async for event in self.engine.stream(self.seq):
            self.tokens.append(event.token)
            self.logprobs.append(event)
            self.finish_reason = event.finish_reason or self.finish_reason
            piece = decoder.push(event.token) + (decoder.flush() if event.finish_reason else "")
            text = self.text + piece
            cut = first_stop(text, self.stops)
            if cut >= 0:
                piece, self.finish_reason = text[len(self.text):cut], "stop"
                self.engine.cancel(self.seq)
            self.text += piece
            if piece:
                yield piece
            if cut >= 0:
                break
        if self.seq.error:
            raise APIError(500, self.seq.error)

    def logprob_block(self, start: int = 0) -> dict:
        events = self.logprobs[start:]
        return {"tokens": [token_text(e.token)[0] for e in events],
                "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{token_text(t)[0]: v for t, v in e.top_logprobs} for e in events],
                "text_offset": []}


def _usage(prompt: list[int], choices: list[_Choice]) -> dict:
    n = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}


async def complete(engine, req: CompletionRequest, model: str, prompt, budget, stops,
                   adapter: str | None = None) -> dict:
    choices = [_Choice(engine, req, prompt, budget, stops, i, adapter) for i in range(req.n)]

    async def drain(c: _Choice) -> None:
        async for _ in c.deltas():
            pass

    await asyncio.gather(*(drain(c) for c in choices))
    echo = get_tokenizer().decode(prompt) if req.echo else ""
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": echo + c.text, "finish_reason": c.finish_reason,
                         "logprobs": c.logprob_block() if req.logprobs is not None else None}
                        for i, c in enumerate(choices)],
            "usage": _usage(prompt, choices)}


async def stream(engine, req: CompletionRequest, model: str, prompt, budget, stops,
                 adapter: str | None = None):
    if req.n != 1:
        raise APIError(400, "streaming supports n=1 only", param="n")
    choice = _Choice(engine, req, prompt, budget, stops, 0, adapter)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model}
    try:
        async for piece in choice.deltas():
            yield {**base, "choices": [{"index": 0, "text": piece, "finish_reason": None,
                                        "logprobs": None}]}
        yield {**base, "choices": [{"index": 0, "text": "", "finish_reason": choice.finish_reason,
                                    "logprobs": None}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": _usage(prompt, [choice])}
    finally:
        engine.cancel(choice.seq)
