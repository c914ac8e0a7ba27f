"""Token sampling: temperature, top-k and top-p (nucleus) over log-probabilities, built once
as a closure and applied per step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Sampler = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]


@dataclass
class SamplingParams:
    temperature: float = 1.0     # 0 = greedy; gpt-oss's recommended setting is 1.0 with top_p 1.0
    top_p: float = 1.0
    top_k: int = 0               # 0 = no limit
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def make_sampler(params: SamplingParams) -> Sampler:
    """-> sample(logprobs (B, V), one generator per row) -> tokens (B,)."""
    if params.temperature == 0:
        return lambda logprobs, generators: logprobs.argmax(dim=-1)

    def sample(logprobs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        logits = logprobs / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            logits = _top_p(logits, params.top_p)
        probs = torch.softmax(logits, dim=-1)
        # One generator per row, so a request's tokens depend on its seed alone, not on
        # what else shares the batch.
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])

    return sample


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs           # mass of strictly more likely tokens
    drop_sorted = before >= top_p                   # never drops the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def make_generators(seed: int | None, n: int, device: torch.device) -> list[torch.Generator]:
    """Row i draws from seed + i; no seed means a fresh random one."""
    base = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    return [torch.Generator(device=device).manual_seed(base + i) for i in range(n)]
