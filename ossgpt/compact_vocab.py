"""Training over the full 201,088-id vocabulary while paying only for the ids the data uses.

Every id the data never contains gets the same unembedding row, `shared`. The softmax over the
full vocabulary is then exact and cheap: its partition function is
    Z = sum_{used i} exp(w_i . h) + M * exp(shared . h),   M = number of unused ids,
so log Z = logsumexp([used logits, shared . h + log M]). Targets are always used ids, so the
loss needs no other row. Unused ids' embedding rows are never looked up in training; when the
model is expanded to the full vocabulary they get the mean of the used rows (a neutral input).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CompactVocab:
    def __init__(self, used_ids: list[int] | torch.Tensor, vocab_size: int):
        ids = torch.as_tensor(sorted(set(int(i) for i in used_ids)), dtype=torch.long)
        if len(ids) == 0 or ids[-1] >= vocab_size or ids[0] < 0:
            raise ValueError("used ids must be a non-empty subset of the vocabulary")
        self.ids = ids                                  # (n,) full id of each compact id
        self.vocab_size = vocab_size
        self.to_compact = torch.full((vocab_size,), -1, dtype=torch.long)
        self.to_compact[ids] = torch.arange(len(ids))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_unused(self) -> int:
        return self.vocab_size - len(self.ids)

    def compact(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.to_compact[tokens]
        if (out < 0).any():
            bad = tokens[out < 0][0].item()
            raise ValueError(f"token id {bad} is not in the compact vocabulary")
        return out

    def log_partition(self, logits: torch.Tensor, shared_logit: torch.Tensor) -> torch.Tensor:
        """logits (N, n) of the used ids, shared_logit (N,) -> log Z (N,) over all ids."""
        if self.n_unused == 0:
            return torch.logsumexp(logits, dim=-1)
        extra = shared_logit + math.log(self.n_unused)
        return torch.logsumexp(torch.cat([logits, extra[:, None]], dim=-1), dim=-1)

    def loss(self, h: torch.Tensor, unembedding: torch.Tensor, shared: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the full vocabulary: h (N, C), compact unembedding (n, C),
        shared row (C,), compact targets (N,)."""
        logits = F.linear(h, unembedding).float()
        log_z = self.log_partition(logits, (h @ shared).float())
        return (log_z - logits.gather(-1, targets[:, None])[:, 0]).mean()

    def expand(self, embedding: torch.Tensor, unembedding: torch.Tensor,
               shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact (n, C) tables -> full (V, C) embedding and unembedding."""
        C = embedding.shape[1]
        full_emb = embedding.mean(dim=0, keepdim=True).expand(self.vocab_size, C).clone()
        full_emb[self.ids] = embedding
        full_unemb = shared[None].expand(self.vocab_size, C).clone()
        full_unemb[self.ids] = unembedding
        return full_emb, full_unemb
