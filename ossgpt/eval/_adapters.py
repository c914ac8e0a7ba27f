"""What the lm-evaluation-harness and inspect_ai adapters share: a model loaded once per process,
the batching engine that decodes every pending request together, and one harmony reply per
request (reasoning, final-channel text, tool calls) read with ossgpt's own reply parser.

Each request carries its own seed, so its tokens do not depend on what else shares the batch
(see server/engine.py)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence as Seq

import torch

from ..harmony import stop_tokens
from ..model import Transformer
from ..sampling import SamplingParams
from ..server.constrain import ReplyConstraint
from ..server.engine import Engine, Sequence
from ..server.generation import ReplyRun
from ..server.protocol import APIError

EFFORTS = ("low", "medium", "high")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def effort(value: object) -> str:
    """A reasoning effort as harmony knows it (low, medium, high)."""
    text = str(value).lower()
    if text not in EFFORTS:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {value!r}")
    return text


def dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if str(value).lower() not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {value!r}")
    return DTYPES[str(value).lower()]


@functools.lru_cache(maxsize=4)
def load_model(ref: str, dtype_: torch.dtype = torch.bfloat16, device: str = "auto") -> Transformer:
    """`ossgpt.load` once per process for each (model, dtype, device): lm_eval builds its model
    once, but inspect_ai may build a provider per task."""
    from .. import load
    return load(ref, device=device, dtype=dtype_, progress=False)


def make_engine(model: Transformer, max_batch: int) -> Engine:
    # Every request of a harness run is queued at once; the batch takes max_batch of them.
    return Engine(model, max_batch=max(1, int(max_batch)), max_queue=1 << 30)


async def reply(engine: Engine, prompt: list[int], max_tokens: int, sampling: SamplingParams,
                stop_strings: Seq[str] = (), constraint: ReplyConstraint | None = None
                ) -> ReplyRun:
    """Generate one assistant reply to a rendered harmony prompt (ending in
    `<|start|>assistant`); the reply's text stops at the first of `stop_strings` in the final
    channel. -> the finished ReplyRun (reasoning, content, calls, finish_reason, token counts)."""
    seq = engine.submit(Sequence(prompt, max_tokens, sampling, frozenset(stop_tokens()),
                                 constraint=constraint))
    run = ReplyRun(engine, seq, [s for s in stop_strings if s])
    try:
        return await run.run()
    except APIError as e:
        raise RuntimeError(e.message) from None
    finally:
        engine.cancel(seq)


def run_all(engine: Engine, jobs: list[tuple], progress=None) -> list[ReplyRun]:
    """`reply(engine, *job)` for every job together, from synchronous code; -> runs in order.
    `progress`: called once per finished reply."""
    async def main() -> list[ReplyRun]:
        async def one(job: tuple) -> ReplyRun:
            run = await reply(engine, *job)
            if progress is not None:
                progress()
            return run
        return list(await asyncio.gather(*(one(job) for job in jobs)))
    return asyncio.run(main())
