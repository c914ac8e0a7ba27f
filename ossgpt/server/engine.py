"""Continuous batching: one thread decodes every active request together, one token per step.
Requests for a LoRA adapter (`ossgpt serve --adapter`) form their own batch, decoded in the same
loop with that adapter switched on.

New requests are prefilled into a cache of their own, one chunk of `prefill_chunk` tokens per
engine step, between the decode steps of the running batch: a long prompt arriving delays each
running stream by one chunk a token, not by its whole prefill (fair prefill). Requests arriving
together are prefilled together; a prompt that begins with tokens the prefix cache holds
(prefix_cache.py) starts from their keys and values. Once prefilled, the cache joins the running
batch (`Cache.extend`); a finished or cancelled request leaves the batch at once and its cache
rows are freed (`Cache.select`). Each request has its own sampling parameters, seeded generator
and optional logits constraint, so its sampling does not depend on what else shares the batch.
Results go back to the asyncio side through each request's queue.

The logits themselves can: a batched prefill pads prompts, and the CPU kernels sum a row's
products in an order chosen by the number of rows. With `batch_invariant`, each request is
prefilled alone, reuses cached prefixes only in whole chunks (so its chunks are those of an
uncached prefill) and decode runs under `kernels.row_invariant()`, so a request's tokens are a
function of its prompt and seed alone, whatever the batch and the cache (`ossgpt eval` relies
on it; `ossgpt serve --batch-invariant` gives the same replies).
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
from ..generate import TokenEvent, decode_step, left_pad
from ..model import Transformer
from ..sampling import SamplingParams, make_generators, make_sampler
from .constrain import ReplyConstraint
from .metrics import Metrics
from .prefix_cache import PrefixCache, recording_cache, stop_recording
from .protocol import APIError


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
    cached_tokens: int = 0                   # prompt tokens the prefix cache supplied

    def __post_init__(self) -> None:
        self.sample = make_sampler(self.sampling)
        self.generator: torch.Generator | None = None   # made on the model's device on admission

    def emit(self, item: TokenEvent | None) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Engine:
    """The batching loop. `submit` from the event loop; `stream` to iterate a request's events."""

    def __init__(self, model: Transformer, max_batch: int = 16, max_queue: int = 256,
                 metrics: Metrics | None = None, batch_invariant: bool = False,
                 prefill_chunk: int = 256, prefix_cache_bytes: int = 0) -> None:
        self.model = model
        self.batch_invariant = batch_invariant
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        # One prefix cache per adapter (None: the base model): an adapter changes the keys.
        self._prefixes = collections.defaultdict(
            lambda: PrefixCache(model, prefix_cache_bytes, self.metrics) if prefix_cache_bytes > 0 else None)
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
            if seq.error:   # an OpenAI-shaped 500, or an error event where the stream has begun
                raise APIError(500, seq.error)
        finally:
            self.cancel(seq)  # a no-op when it already ended

    def stats(self) -> dict:
        batches = list(self._batches.values())
        return {"active": sum(len(b.active) for b in batches), "waiting": len(self._waiting),
                "prefilling": sum(len(b.prefilling_seqs) for b in batches),
                "cache_bytes": sum(b.cache.nbytes for b in batches if b.cache is not None),
                "prefix_cache_bytes": sum(p.nbytes for p in list(self._prefixes.values()) if p is not None)}

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
                room = self.max_batch - sum(b.rows for b in self._batches.values())
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
                    adapter, _Batch(self.model, self.metrics, self.batch_invariant, self.prefill_chunk,
                                    self._prefixes[adapter]))
                rows = kernels.row_invariant() if self.batch_invariant else contextlib.nullcontext()
                try:
                    with torch.inference_mode(), rows:
                        _select_adapter(self.model, adapter)
                        batch.step([s for s in joining if s.adapter == adapter])
                except Exception as e:  # never let one bad step kill the server
                    batch.fail(f"generation failed: {e}")
                if not batch.rows:
                    del self._batches[adapter]
            with self._wake:
                self._running = sum(b.rows for b in self._batches.values())
            self.metrics.active.set(self._running)


def _select_adapter(model: Transformer, name: str | None) -> None:
    if getattr(model, "adapters", None):
        from ..lora import set_adapter
        set_adapter(model, name)


class _Prefill:
    """Prompts being prefilled together into their own cache, a chunk per engine step."""

    def __init__(self, seqs: list[Sequence], cache, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.seqs, self.cache, self.tokens, self.positions = seqs, cache, tokens, positions
        self.done = 0                 # columns of `tokens` prefilled
        self.h: torch.Tensor | None = None


class _Batch:
    """Active sequences decoded together (their cache, next-token logits and positions), and
    the requests still being prefilled to join them."""

    def __init__(self, model: Transformer, metrics: Metrics, invariant: bool = False,
                 chunk: int = 256, prefixes: PrefixCache | None = None) -> None:
        self.model, self.metrics, self.invariant, self.chunk = model, metrics, invariant, chunk
        self.prefixes = prefixes
        self.active: list[Sequence] = []
        self.prefilling: collections.deque[_Prefill] = collections.deque()
        self.cache = None
        self.logits: torch.Tensor | None = None   # (B, V): next-token logits of each row
        self.positions: torch.Tensor | None = None

    @property
    def prefilling_seqs(self) -> list[Sequence]:
        return [s for p in self.prefilling for s in p.seqs]

    @property
    def rows(self) -> int:
        """Requests decoding or being prefilled: what counts against --max-batch."""
        return len(self.active) + len(self.prefilling_seqs)

    def fail(self, message: str) -> None:
        for seq in self.active + self.prefilling_seqs:
            seq.error = message
            seq.emit(None)
        self.active, self.cache, self.logits, self.positions = [], None, None, None
        self.prefilling.clear()

    def step(self, joining: list[Sequence]) -> None:
        try:
            if joining:
                self._start(joining)
            self._prefill_chunk()
        except Exception as e:   # the requests not yet decoding fail; the batch goes on
            decoding = {id(s) for s in self.active}
            pending = {id(s): s for s in joining + self.prefilling_seqs}
            for key, seq in pending.items():
                if key not in decoding:
                    seq.error = f"generation failed: {e}"
                    seq.emit(None)
            self.prefilling.clear()
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

    def _start(self, joining: list[Sequence]) -> None:
        """Queue prefill jobs: a request whose prompt the prefix cache shares starts from it,
        alone; the others are prefilled together (alone each, when batch-invariant)."""
        device = self.model.device
        fresh = []
        for seq in joining:
            seq.generator = make_generators(seq.sampling.seed, 1, device)[0]
            P, cache = (0, None) if self.prefixes is None else self.prefixes.lookup(
                seq.prompt, align=self.chunk if self.invariant else 1)
            if cache is None:
                fresh.append(seq)
                continue
            seq.cached_tokens = P
            positions = torch.arange(P, len(seq.prompt), device=device)[None]
            self.prefilling.append(_Prefill([seq], cache, torch.tensor([seq.prompt[P:]], device=device), positions))
        for group in ([[s] for s in fresh] if self.invariant else [fresh] if fresh else []):
            tokens, positions = left_pad([s.prompt for s in group], device)
            cache = recording_cache(self.model) if self.prefixes is not None else self.model.make_cache()
            self.prefilling.append(_Prefill(group, cache, tokens, positions))

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest prefill job; a finished job joins the batch."""
        while self.prefilling and all(s.cancelled for s in self.prefilling[0].seqs):
            for seq in self.prefilling.popleft().seqs:
                seq.emit(None)
        if not self.prefilling:
            return
        job = self.prefilling[0]
        end = job.done + self.chunk
        job.h = self.model.hidden_states(job.tokens[:, job.done:end], job.cache, job.positions[:, job.done:end])
        job.done = min(end, job.tokens.shape[1])
        if job.done < job.tokens.shape[1]:
            return
        self.prefilling.popleft()
        prompts = [s.prompt for s in job.seqs]
        if self.prefixes is not None:
            self.prefixes.insert(prompts, job.cache)
            stop_recording(job.cache)
        self.metrics.prompt_tokens.inc(sum(len(p) - s.cached_tokens for p, s in zip(prompts, job.seqs)))
        logits = self.model.logits(job.h[:, -1])
        positions = torch.tensor([len(p) for p in prompts])
        if self.cache is None:
            self.cache, self.logits, self.positions = job.cache, logits, positions
        else:
            self.cache.extend(job.cache)
            self.logits = torch.cat([self.logits, logits])
            self.positions = torch.cat([self.positions, positions])
        self.active.extend(job.seqs)
