"""The prefix cache: keys and values of prompts already prefilled, reused by later prompts that
begin with the same tokens (the next turn of a conversation, a shared system prompt with tools).

What is kept is each prompt's keys and values for every position and every layer, the
sliding-window layers included: a later prompt may share any part of it, and a sliding layer
resumed at position P needs the 128 positions before P, which a running cache (the last 128 of
the whole prompt) no longer has. Only prompts are kept, not replies: harmony renders a finished
turn without its reasoning, so the next turn's prompt leaves the generated tokens after the
previous prompt's end ("<|start|>assistant"), where the shared prefix ends.

Bounded by bytes, least recently used first out."""

from __future__ import annotations

import collections

import torch

from ..kv_cache import Cache, KVCache, SlidingKVCache
from ..model import Transformer
from .metrics import Metrics


class RecordingSlidingKVCache(SlidingKVCache):
    """A sliding layer's cache that also keeps everything written to it (until `stop`), so the
    whole prompt's keys and values can be stored."""

    def __init__(self, window: int, log: list | None = None) -> None:
        super().__init__(window)
        self.log: list | None = log if log is not None else []

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        if self.log is not None:
            self.log.append((k, v, pos))
        return super().update(k, v, pos)

    def written(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v, pos = zip(*self.log)
        return torch.cat(k, 1), torch.cat(v, 1), torch.cat(pos, 1)


def recording_cache(model: Transformer) -> Cache:
    """A fresh cache whose sliding layers record what they are given."""
    return Cache([RecordingSlidingKVCache(layer.window) if isinstance(layer, SlidingKVCache) else KVCache()
                  for layer in model.make_cache().layers])


def stop_recording(cache: Cache) -> None:
    for layer in cache.layers:
        if isinstance(layer, RecordingSlidingKVCache):
            layer.log = None


class _Entry:
    def __init__(self, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.layers = layers                          # per layer (k, v), each (1, L, K, D)
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in layers)

    def shared(self, prompt: torch.Tensor) -> int:
        """How many leading tokens this entry shares with `prompt`."""
        n = min(len(self.tokens), len(prompt))
        differ = (self.tokens[:n] != prompt[:n]).nonzero()
        return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, model: Transformer, budget_bytes: int, metrics: Metrics | None = None) -> None:
        self.model, self.budget = model, budget_bytes
        self.metrics = metrics or Metrics()
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._next_key = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in list(self._entries.values()))   # also read by /health

    def lookup(self, prompt: list[int], align: int = 1) -> tuple[int, Cache | None]:
        """-> (P, a recording cache holding the first P tokens of `prompt`), P the longest shared
        prefix, at least one token short of the prompt (its last token must run to give logits)
        and a multiple of `align`; (0, None) when nothing is shared."""
        tokens = torch.tensor(prompt, dtype=torch.long)
        best, shared = None, 0
        for key, entry in self._entries.items():
            n = entry.shared(tokens)
            if n > shared:
                best, shared = key, n
        P = min(shared, len(prompt) - 1) // align * align
        if best is None or P <= 0:
            return 0, None
        entry = self._entries[best]
        self._entries.move_to_end(best)
        cache = recording_cache(self.model)
        pos = torch.arange(P, device=self.model.device)[None]
        for layer, (k, v) in zip(cache.layers, entry.layers):
            if isinstance(layer, RecordingSlidingKVCache):
                layer.log.append((k[:, :P], v[:, :P], pos))
            layer.set_contents(k[:, :P], v[:, :P], pos)
        cache.next_position = P
        self.metrics.prefix_hit_tokens.inc(P)
        return P, cache

    def insert(self, prompts: list[list[int]], cache: Cache) -> None:
        """Keep the keys and values of each row's prompt, from a (recording) cache that holds
        exactly the prompts, left-padded (position -1 where empty)."""
        written = [layer.written() if isinstance(layer, RecordingSlidingKVCache) else layer.contents()
                   for layer in cache.layers]
        for row, prompt in enumerate(prompts):
            tokens = torch.tensor(prompt, dtype=torch.long)
            if any(e.shared(tokens) == len(tokens) for e in self._entries.values()):
                continue                                   # already covered by a longer entry
            layers = []
            for k, v, pos in written:
                keep = pos[row] >= 0
                layers.append((k[row:row + 1, keep].clone(), v[row:row + 1, keep].clone()))
            entry = _Entry(prompt, layers)
            if entry.nbytes > self.budget:
                continue
            for key in [k for k, e in self._entries.items() if e.shared(tokens) == len(e.tokens)]:
                del self._entries[key]                     # the new entry covers these
            self._entries[self._next_key] = entry
            self._next_key += 1
            while self.nbytes > self.budget:
                self._entries.popitem(last=False)
                self.metrics.prefix_evictions.inc()
        self.metrics.prefix_bytes.set(self.nbytes)
