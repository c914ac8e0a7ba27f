"""Key/value caches. Every layer appends the same number of slots per step for every row of
the batch; each slot remembers its token position (negative for padding), so masks come from
positions alone and rows of different lengths share one cache (left padding)."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """A full-attention layer's cache: keeps every position. Storage grows by doubling."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None      # (B, capacity, K, D)
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None    # (B, capacity), -1 where empty
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Append k, v (B, T, K, D) at positions pos (B, T); return all keys, values, positions."""
        T = k.shape[1]
        if self.k is None or self.length + T > self.k.shape[1]:
            self._grow(k, v, max(2 * (self.length + T), 256))
        self.k[:, self.length:self.length + T] = k
        self.v[:, self.length:self.length + T] = v
        self.pos[:, self.length:self.length + T] = pos
        self.length += T
        n = self.length
        return self.k[:, :n], self.v[:, :n], self.pos[:, :n]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        B, _, K, D = k.shape
        new_k = k.new_zeros(B, capacity, K, D)
        new_v = v.new_zeros(B, capacity, K, D)
        new_pos = torch.full((B, capacity), -1, dtype=torch.long, device=k.device)
        if self.k is not None:
            new_k[:, :self.length] = self.k[:, :self.length]
            new_v[:, :self.length] = self.v[:, :self.length]
            new_pos[:, :self.length] = self.pos[:, :self.length]
        self.k, self.v, self.pos = new_k, new_v, new_pos

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch), then drop leading
        slots that no remaining row uses (left padding of a longer row that left)."""
        if self.k is None:
            return
        self.k, self.v, self.pos = self.k[rows], self.v[rows], self.pos[rows]
        used = (self.pos[:, :self.length] >= 0).any(0).nonzero()
        start = int(used[0]) if len(used) else self.length
        if start:
            n = self.length - start
            self.k, self.v, self.pos = (t[:, start:].clone() for t in (self.k, self.v, self.pos))
            self.length = n

    def contents(self):
        """(k, v, pos) of the written slots, or None when empty."""
        return None if self.k is None else (self.k[:, :self.length], self.v[:, :self.length],
                                            self.pos[:, :self.length])

    def set_contents(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.k = self.v = self.pos = None
        self.length = 0
        self._grow(k, v, max(2 * k.shape[1], 256))
        self.update(k, v, pos)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k[:, :self.length].numel() * self.k.element_size()


class SlidingKVCache:
    """A sliding-window layer's cache: only the last `window` slots are kept, since no later
    query can see further back. Attention sees the kept slots plus the new ones.

    Once full, one new token a row (decode) takes the oldest slot in place: the slots are then
    a ring, `oldest` the next one written. Why: three new tensors of the whole window a step
    (`torch.cat`) took 1.7% of a 4-layer decode step in a profile on Zen 1, and attention does
    not care about the keys' order (their positions make its mask). `contents()` gives them in
    order."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.k: torch.Tensor | None = None      # (B, <= window, K, D)
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None    # (B, <= window)
        self.oldest = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        if k.shape[1] == 1 and self.k is not None and self.k.shape[1] == self.window:
            i = self.oldest
            self.k[:, i], self.v[:, i], self.pos[:, i] = k[:, 0], v[:, 0], pos[:, 0]
            self.oldest = (i + 1) % self.window
            return self.k, self.v, self.pos
        if self.k is not None:
            k, v, pos = (torch.cat([kept, new], dim=1) for kept, new in zip(self.contents(), (k, v, pos)))
        self._keep(k, v, pos)
        return k, v, pos

    def _keep(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        # copies: the ring is written in place, and what it was given may be kept elsewhere
        # (the server's prefix cache)
        self.k, self.v, self.pos = (t[:, -self.window:].clone() for t in (k, v, pos))
        self.oldest = 0

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v, self.pos = self.k[rows], self.v[rows], self.pos[rows]

    def contents(self):
        """(k, v, pos) of the kept slots, oldest first, or None when empty."""
        if self.k is None:
            return None
        i = self.oldest
        return tuple(torch.cat([t[:, i:], t[:, :i]], dim=1) if i else t for t in (self.k, self.v, self.pos))

    def set_contents(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self._keep(k, v, pos)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class Cache:
    """One cache per layer plus the number of steps written (the next default position)."""

    def __init__(self, layers: list[KVCache | SlidingKVCache]) -> None:
        self.layers = layers
        self.next_position = 0

    def advance(self, n: int) -> None:
        self.next_position += n

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(rows)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def extend(self, other: "Cache") -> None:
        """Append the rows of `other` to this batch (a request joining a running batch).
        The shorter side is padded on the left, the oldest end, with empty slots (position -1):
        masks come from positions, and a sliding layer drops its oldest slots first."""
        for mine, theirs in zip(self.layers, other.layers):
            a, b = mine.contents(), theirs.contents()
            if a is None or b is None:
                if b is not None:
                    mine.set_contents(*b)
                continue
            n = max(a[0].shape[1], b[0].shape[1])
            mine.set_contents(*(torch.cat([_left_pad(x, n), _left_pad(y, n)])
                                for x, y in zip(a, b)))
        self.next_position = max(self.next_position, other.next_position)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim 1 of keys/values (with 0) or positions (with -1) on the left to length n."""
    if t.shape[1] == n:
        return t
    pad = t.new_full((t.shape[0], n - t.shape[1], *t.shape[2:]), -1 if t.dtype == torch.long else 0)
    return torch.cat([pad, t], dim=1)


def make_cache(config: ModelConfig) -> Cache:
    """Storage is sized on first use, from the keys themselves."""
    return Cache([SlidingKVCache(config.sliding_window) if t == "sliding_attention" else KVCache()
                  for t in config.layer_types])
