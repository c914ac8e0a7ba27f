"""Generation: batched prefill of prompts of different lengths (left padding, per-row
positions), then one decode step at a time over the KV cache, yielding token events as they
are sampled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .kv_cache import Cache
from .model import Transformer
from .sampling import SamplingParams, make_generators, make_sampler


@dataclass
class TokenEvent:
    row: int                     # which prompt of the batch
    token: int
    logprob: float               # log-probability under the model (before temperature etc.)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" (a stop token, included) or "length"


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (B, L), positions (B, L) with -1 at padding."""
    L = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    positions = torch.full((len(prompts), L), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, L - len(p):] = torch.tensor(p, device=device)
            positions[i, L - len(p):] = torch.arange(len(p), device=device)
    return tokens, positions


@torch.inference_mode()
def prefill(model: Transformer, prompts: list[list[int]], cache: Cache,
            chunk_size: int = 512) -> torch.Tensor:
    """Run the prompts through the model into `cache`, in chunks (bounding the attention
    scores' memory); -> float32 logits of each prompt's last token (B, V)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    tokens, positions = left_pad(prompts, model.device)
    h = None
    for start in range(0, tokens.shape[1], chunk_size):
        end = start + chunk_size
        h = model.hidden_states(tokens[:, start:end], cache, positions[:, start:end])
    return model.logits(h[:, -1])


@torch.inference_mode()
def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                cache: Cache) -> torch.Tensor:
    """One new token per row: tokens (B,), positions (B,) -> float32 logits (B, V)."""
    h = model.hidden_states(tokens[:, None], cache, positions[:, None])
    return model.logits(h[:, -1])


def generate(model: Transformer, prompts: list[list[int]], max_tokens: int = 256,
             sampling: SamplingParams | None = None, stop_tokens: Iterable[int] = (),
             top_logprobs: int = 0, chunk_size: int = 512) -> Iterator[TokenEvent]:
    """Sample continuations of every prompt together; yields one event per row per step.
    A row leaves the batch (and its cache rows are freed) when it samples a stop token or
    reaches max_tokens."""
    sampling = sampling or SamplingParams()
    if max_tokens < 1:
        return
    sample = make_sampler(sampling)
    generators = make_generators(sampling.seed, len(prompts), model.device)
    stop = set(stop_tokens)
    cache = model.make_cache()
    logits = prefill(model, prompts, cache, chunk_size)
    rows = list(range(len(prompts)))                    # active rows, in batch order
    positions = torch.tensor([len(p) for p in prompts], device=model.device)
    for step in range(max_tokens):
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = sample(logprobs, [generators[r] for r in rows])
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        tops = torch.topk(logprobs, top_logprobs, dim=-1) if top_logprobs else None
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            reason = "stop" if token in stop else "length" if step == max_tokens - 1 else None
            alternatives = (list(zip(tops.indices[i].tolist(), tops.values[i].tolist()))
                            if tops is not None else [])
            yield TokenEvent(row, token, chosen[i], alternatives, reason)
            if reason is None:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=model.device)
            cache.select(index)
            tokens, positions = tokens[index], positions[index]
            rows = [rows[i] for i in keep]
        logits = decode_step(model, tokens, positions, cache)
        positions = positions + 1
