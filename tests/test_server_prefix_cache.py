"""The engine's prefix cache (ossgpt/server/prefix_cache.py) and chunked, fair prefill
(ossgpt/server/engine.py), on nano in float32: a prompt that reuses cached keys and values gets
the same tokens as one prefilled from scratch, across the 128-token sliding window, with
harmony's dropped reasoning; a long prompt does not stall running streams."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

import ossgpt
from ossgpt.harmony import render_prompt, stop_tokens
from ossgpt.sampling import SamplingParams
from ossgpt.server.engine import Engine, Sequence
from ossgpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def nano32():
    return ossgpt.load("nano", dtype=torch.float32, progress=False)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 50_000) for _ in range(n)]


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int = 12, temperature: float = 0.0,
             seed: int | None = None) -> list[tuple[list[int], list[float], int]]:
    """Each prompt submitted in turn, after the previous one finished: (tokens, logprobs,
    prompt tokens the prefix cache supplied)."""
    async def run():
        out = []
        for p in prompts:
            seq = engine.submit(Sequence(p, max_tokens, SamplingParams(temperature=temperature, seed=seed),
                                         frozenset(stop_tokens())))
            events = [e async for e in engine.stream(seq)]
            out.append(([e.token for e in events], [e.logprob for e in events], seq.cached_tokens))
        return out
    return asyncio.run(run())


def _engines(model, **kwargs):
    return Engine(model, **kwargs), Engine(model, prefix_cache_bytes=1 << 30, **kwargs)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 7)], ids=["greedy", "seeded"])
def test_cached_prefixes_give_the_same_tokens(nano32, temperature: float, seed: int | None) -> None:
    first = _prompt(300, 0)                             # past the 128-token sliding window
    turns = [first,
             first + _prompt(40, 1),                    # the next turn: all of `first` reused
             first[:200] + _prompt(60, 2),              # diverges inside: 200 reused, past the window
             first[:50] + _prompt(10, 3),               # diverges before the window is full
             _prompt(30, 4)]                            # nothing shared
    plain, cached = _engines(nano32)
    try:
        want = generate(plain, turns, temperature=temperature, seed=seed)
        got = generate(cached, turns, temperature=temperature, seed=seed)
    finally:
        plain.shutdown(), cached.shutdown()
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2] for g in got] == [0, 300, 200, 50, 0]
    assert all(w[2] == 0 for w in want)
    for (_, a, _), (_, b, _) in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_the_next_turn_reuses_the_previous_prompt_with_reasoning_dropped(nano32) -> None:
    tok = Tokenizer()
    question = [{"role": "user", "content": "What is 348 + 275?"}]
    engine = Engine(nano32, prefix_cache_bytes=1 << 30)
    try:
        first = render_prompt(question, reasoning_effort="low")
        [(reply, _, _)] = generate(engine, [first], max_tokens=200)
        text = tok.decode(reply)
        answer = text.split("<|channel|>final<|message|>")[-1].split("<|return|>")[0]
        reasoning = text.split("<|channel|>analysis<|message|>")[-1].split("<|end|>")[0]
        assert answer and reasoning and "analysis" in text       # nano reasoned, then answered
        second = render_prompt(question + [{"role": "assistant", "content": answer, "reasoning": reasoning},
                                           {"role": "user", "content": "What is the capital of Peru?"}],
                               reasoning_effort="low")
        assert tok.decode(second).count(reasoning) == 0            # harmony drops it
        [(tokens, _, hit)] = generate(engine, [second], max_tokens=40)
    finally:
        engine.shutdown()
    assert second[:len(first)] == first and hit == len(first)      # the whole first prompt
    plain = Engine(nano32)
    try:
        assert generate(plain, [second], max_tokens=40)[0][0] == tokens
    finally:
        plain.shutdown()


def test_memory_budget_evicts_the_oldest(nano32) -> None:
    per_token = 2 * nano32.config.num_hidden_layers * nano32.config.num_key_value_heads * nano32.config.head_dim * 4
    engine = Engine(nano32, prefix_cache_bytes=250 * per_token)          # room for one 200-token prompt
    try:
        a, b = _prompt(200, 10), _prompt(200, 11)
        generate(engine, [a, b], max_tokens=1)
        prefixes = engine._prefixes[None]
        assert prefixes.nbytes == 200 * per_token
        assert engine.metrics.prefix_evictions._value.get() == 1
        assert [r[2] for r in generate(engine, [b + [5], a + [5]], max_tokens=1)] == [200, 0]   # a was dropped
        text = engine.metrics.text().decode()
        assert "ossgpt_prefix_cache_hit_tokens_total 200.0" in text and "ossgpt_prefix_cache_bytes" in text
    finally:
        engine.shutdown()


def test_batch_invariant_reuse_is_exact(nano32) -> None:
    """Batch-invariant engines reuse whole prefill chunks only: the same logprobs, bit for bit."""
    first = _prompt(100, 20)
    turns = [first, first + _prompt(30, 21)]
    plain, cached = _engines(nano32, batch_invariant=True, prefill_chunk=16)
    try:
        want, got = generate(plain, turns), generate(cached, turns)
    finally:
        plain.shutdown(), cached.shutdown()
    assert got[1][2] == 96                                   # 100 shared, in whole chunks of 16
    assert [g[:2] for g in got] == [w[:2] for w in want]


def test_a_long_prompt_does_not_stall_running_streams(nano32) -> None:
    """While a 400-token prompt is prefilled 32 tokens a step, a running stream keeps getting
    a token a step: it gets at least the 12 steps' tokens before the newcomer's first."""
    async def run(chunk: int) -> int:
        engine = Engine(nano32, prefill_chunk=chunk)
        try:
            running = engine.submit(Sequence(_prompt(8, 30), 200, SamplingParams(temperature=0.0), frozenset()))
            order: list[str] = []
            long_seq = None

            async def follow(seq, name):
                async for _ in engine.stream(seq):
                    order.append(name)

            task = asyncio.create_task(follow(running, "running"))
            while len(order) < 3:
                await asyncio.sleep(0.01)
            long_seq = engine.submit(Sequence(_prompt(400, 31), 1, SamplingParams(temperature=0.0), frozenset()))
            mark = len(order)
            await follow(long_seq, "long")
            running.cancelled = True
            await task
            return order.index("long") - mark
        finally:
            engine.shutdown()

    assert asyncio.run(run(32)) >= 12
    assert asyncio.run(run(4096)) <= 2                      # one chunk: the stream waits it out
