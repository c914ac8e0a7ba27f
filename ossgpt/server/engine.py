"""Continuous batching: one thread decodes every active request together, one token per step.
Requests for a LoRA adapter (`ossgpt serve --adapter`) form their own batch, decoded in the same
loop with that adapter switched on.

New requests are prefilled (together, when several wait) into a cache of their own which then
joins the running batch between two decode steps (`Cache.extend`); a finished or cancelled
request leaves the batch at once and its cache rows are freed (`Cache.select`). Each request has
its own sampling parameters, seeded generator and optional logits constraint, so its sampling
does not depend on what else shares the batch. Results go back to the asyncio side through each
request's queue.

The logits themselves can: a batched prefill pads prompts, and the CPU kernels sum a row's
products in an order chosen by the number of rows. With `batch_invariant`, each request is
prefilled alone and decode runs under `kernels.row_invariant()`, so a request's tokens are a
function of its prompt and seed alone, whatever the batch (`ossgpt eval` relies on it; `ossgpt
serve --batch-invariant` gives the same replies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..generate import TokenEvent, decode_step, prefill
from ..model import Transformer
from ..sampling import SamplingParams, make_generators, make_sampler
from .constrain import ReplyConstraint
from .metrics import Metrics


class QueueFull(Exception):
    pass


@dataclass
class Sequence:
    """One generation request and its live state."""
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_tokens: frozenset[int]
    top_logprobs: int = 0
    constraint: ReplyConstraint | None = None
    id: int = field(default_factory=itertools.count().__next__)
    events: asyncio.Queue | None = None      # TokenEvents, then None at the end
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    generated: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    error: str | None = None
    adapter: str | None = None               # a LoRA adapter served beside the base, by name

    def __post_init__(self) -> None:
        self.sample = make_sampler(self.sampling)
        self.generator: torch.Generator | None = None   # made on the model's device on admission

    def emit(self, item: TokenEvent | None) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Engine:
    """The batching loop. `submit` from the event loop; `stream` to iterate a request's events."""

    def __init__(self, model: Transformer, max_batch: int = 16, max_queue: int = 256,
                 metrics: Metrics | None = None, batch_invariant: bool = False) -> None:
        self.model = model
        self.batch_invariant = batch_invariant
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running = 0   # requests in the batches, as of the engine thread's last look
        self._wake = threading.Condition()
        self._batches: dict[str | None, _Batch] = {}   # by adapter (None: the base model)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ossgpt-engine", daemon=True)
        self._thread.start()

    # -- the asyncio side -----------------------------------------------------------------------

    def submit(self, seq: Sequence) -> Sequence:
        seq.loop = asyncio.get_running_loop()
        seq.events = asyncio.Queue()
        with self._wake:
            # The queue is what waits beyond the batch: requests that free batch rows will take
            # at the engine's next step do not count (they may all arrive before it wakes).
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - self._running):
                raise QueueFull(f"the server is at capacity ({self.max_queue} requests waiting)")
            self._waiting.append(seq)
            self.metrics.queue_size.set(len(self._waiting))
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for this request (client gone); its cache is freed on the next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    async def stream(self, seq: Sequence):
        """Yield the request's TokenEvents until it ends; cancels it if the consumer stops."""
        try:
            while (event := await seq.events.get()) is not None:
                yield event
            if seq.error:
                raise RuntimeError(seq.error)
        finally:
            self.cancel(seq)  # a no-op when it already ended

    def stats(self) -> dict:
        batches = list(self._batches.values())
        return {"active": sum(len(b.active) for b in batches), "waiting": len(self._waiting),
                "cache_bytes": sum(b.cache.nbytes for b in batches if b.cache is not None)}

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._batches and not self._waiting:
                    self._wake.wait()
                if self._stopped:
                    return
                joining: list[Sequence] = []
                room = self.max_batch - sum(len(b.active) for b in self._batches.values())
                while self._waiting and len(joining) < room:
                    seq = self._waiting.popleft()
                    if seq.cancelled:
                        seq.emit(None)
                    else:
                        joining.append(seq)
                self._running = self.max_batch - room + len(joining)
                self.metrics.queue_size.set(len(self._waiting))
            for adapter in dict.fromkeys([s.adapter for s in joining] + list(self._batches)):
                batch = self._batches.setdefault(
                    adapter, _Batch(self.model, self.metrics, self.batch_invariant))
                rows = kernels.row_invariant() if self.batch_invariant else contextlib.nullcontext()
                try:
                    with torch.inference_mode(), rows:
                        _select_adapter(self.model, adapter)
                        batch.step([s for s in joining if s.adapter == adapter])
                except Exception as e:  # never let one bad step kill the server
                    batch.fail(f"generation failed: {e}")
                if not batch.active:
                    del self._batches[adapter]
            with self._wake:
                self._running = sum(len(b.active) for b in self._batches.values())
            self.metrics.active.set(self._running)


def _select_adapter(model: Transformer, name: str | None) -> None:
    if getattr(model, "adapters", None):
        from ..lora import set_adapter
        set_adapter(model, name)


class _Batch:
    """Active sequences decoded together: their cache, next-token logits and positions."""

    def __init__(self, model: Transformer, metrics: Metrics, invariant: bool = False) -> None:
        self.model, self.metrics, self.invariant = model, metrics, invariant
        self.active: list[Sequence] = []
        self.cache = None
        self.logits: torch.Tensor | None = None   # (B, V): next-token logits of each row
        self.positions: torch.Tensor | None = None

    def fail(self, message: str) -> None:
        for seq in self.active:
            seq.error = message
            seq.emit(None)
        self.active, self.cache, self.logits, self.positions = [], None, None, None

    def step(self, joining: list[Sequence]) -> None:
        if joining:
            try:
                self._admit(joining)
            except Exception as e:
                for seq in joining:
                    seq.error = f"generation failed: {e}"
                    seq.emit(None)
        if not self.active:
            return
        logits = self.logits
        for i, seq in enumerate(self.active):
            if seq.constraint is not None and seq.constraint.active:
                seq.constraint.apply(logits[i])
        logprobs = torch.log_softmax(logits, dim=-1)
        keep, tokens, ended = [], [], []
        now = time.perf_counter()
        for i, seq in enumerate(self.active):
            if seq.cancelled:
                ended.append(seq)
                continue
            token = int(seq.sample(logprobs[i:i + 1], [seq.generator])[0])
            if seq.constraint is not None:
                seq.constraint.accept(token)
            seq.generated += 1
            reason = ("stop" if token in seq.stop_tokens else
                      "length" if seq.generated >= seq.max_tokens else None)
            top = []
            if seq.top_logprobs:
                values, indices = torch.topk(logprobs[i], seq.top_logprobs)
                top = list(zip(indices.tolist(), values.tolist()))
            seq.emit(TokenEvent(0, token, float(logprobs[i, token]), top, reason))
            if seq.first_token is None:
                seq.first_token = now
                self.metrics.ttft.observe(now - seq.submitted)
            if reason is None:
                keep.append(i)
                tokens.append(token)
            else:
                ended.append(seq)
                self.metrics.finished(seq, now)
        self.metrics.generated_tokens.inc(len(self.active))
        if len(keep) < len(self.active):
            index = torch.tensor(keep, dtype=torch.long)
            self.active = [self.active[i] for i in keep]
            self.positions = self.positions[index]
            if self.active:
                self.cache.select(index.to(self.model.device))
            else:
                self.cache = None
        self.metrics.batch_size.observe(len(self.active))
        if not self.active:
            self.logits = None
        # Only now, with their cache rows freed, do the ended requests hear they are done.
        for seq in ended:
            seq.emit(None)
        if not self.active:
            return
        device = self.model.device
        self.logits = decode_step(self.model, torch.tensor(tokens, device=device),
                                  self.positions.to(device), self.cache)
        self.positions = self.positions + 1

    def _admit(self, joining: list[Sequence]) -> None:
        for seq in joining:
            seq.generator = make_generators(seq.sampling.seed, 1, self.model.device)[0]
        if self.invariant:   # alone, unpadded: each prompt's cache and logits as at batch 1
            cache, logits = self.model.make_cache(), []
            for seq in joining:
                own = self.model.make_cache()
                logits.append(prefill(self.model, [seq.prompt], own))
                cache.extend(own)
            logits = torch.cat(logits)
        else:
            cache = self.model.make_cache()
            logits = prefill(self.model, [s.prompt for s in joining], cache)
        self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in joining))
        positions = torch.tensor([len(s.prompt) for s in joining])
        if self.cache is None:
            self.cache, self.logits, self.positions = cache, logits, positions
        else:
            self.cache.extend(cache)
            self.logits = torch.cat([self.logits, logits])
            self.positions = torch.cat([self.positions, positions])
        self.active.extend(joining)
