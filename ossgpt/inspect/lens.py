"""The logit lens (nostalgebraist 2020): read the residual stream after each block through the
model's own final norm and unembedding, as if the model stopped there. After the last block it
is exactly the model's output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import Transformer
from .trace import Trace, check_layers, run


def lens_logits(model: Transformer, residual: torch.Tensor) -> torch.Tensor:
    """residual (B, T, C) after some block -> float32 logits (B, T, V)."""
    with torch.inference_mode():
        return model.logits(model.norm(residual.to(model.device, model.dtype)))


@dataclass
class Lens:
    layers: list[int]
    positions: torch.Tensor      # (B, T), negative at padding
    top_ids: torch.Tensor        # (L, B, T, top): each layer's most likely next tokens
    top_probs: torch.Tensor      # (L, B, T, top)
    logits: torch.Tensor         # (B, T, V): the model's own


def logit_lens(model: Transformer, prompts: Sequence[Sequence[int]],
               layers: Sequence[int] | None = None, top: int = 5) -> Lens:
    """Each layer's `top` next-token guesses at every position of the prompts (one batch)."""
    layers = check_layers(model, layers)
    with Trace(model, layers=layers, record=("residual", "logits")) as trace:
        logits, positions = run(model, prompts)
    ids, probs = [], []
    for layer in layers:
        p = torch.softmax(lens_logits(model, trace["residual", layer]), dim=-1)
        best = torch.topk(p, top, dim=-1)                                   # (B, T, top)
        ids.append(best.indices.cpu())
        probs.append(best.values.cpu())
    return Lens(layers, positions.cpu(), torch.stack(ids), torch.stack(probs), logits.cpu())
