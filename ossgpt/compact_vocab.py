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


def group_rows(weight: torch.Tensor, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ids of a table (V, C) by identical rows, leaving out `exclude`; -> (group of
    each id (V,), -1 for excluded ids; ids sharing each group (G,); one member id of each (G,)).
    Rows are keyed by a float64 random projection, then each id is checked against its group's
    first member, so the grouping is exact."""
    w = weight.detach()
    probe = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # In slices: a 201,088 x 2,880 table in float64 at once would be 4.6 GB.
    keys = torch.cat([w[i:i + 4096].double() @ probe for i in range(0, len(w), 4096)])
    kept = torch.ones(len(w), dtype=torch.bool)
    if exclude is not None:
        kept[exclude] = False
    kept_ids = kept.nonzero()[:, 0]
    _, inverse = torch.unique(keys[kept_ids], return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(w), dtype=torch.long).scatter_reduce(
        0, inverse, kept_ids, "amin")
    equal = torch.cat([(w[kept_ids[i:i + 4096]] == w[first[inverse[i:i + 4096]]]).all(dim=1)
                       for i in range(0, len(kept_ids), 4096)])
    if not bool(equal.all()):  # a projection collision of unequal rows: give them groups of their own
        extra = (~equal).nonzero()[:, 0]
        inverse[extra] = len(first) + torch.arange(len(extra))
        first = torch.cat([first, kept_ids[extra]])
    group = torch.full((len(w),), -1, dtype=torch.long)
    group[kept_ids] = inverse
    counts = torch.bincount(inverse, minlength=len(first))
    return group, counts, first


class DistinctRowsLoss:
    """Exact cross-entropy over the full vocabulary for a frozen unembedding with many identical
    rows (nano's untrained ids all share one): log Z sums each distinct row once, weighted by how
    many ids share it, as `CompactVocab.log_partition` does. Rows being trained (trainable tokens)
    are kept apart and passed to `loss`."""

    def __init__(self, weight: torch.Tensor, grouping: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                 ) -> None:
        self.group, counts, first = grouping
        self.rows = weight.detach()[first]
        self.log_counts = counts.double().log().float()

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def if_worth_it(cls, weight: torch.Tensor, trained_ids: torch.Tensor | None = None
                    ) -> DistinctRowsLoss | None:
        """The loss over `weight`'s distinct rows where under half of them are distinct (nano:
        2,390 of 201,088), else None (a real checkpoint's rows are all distinct)."""
        grouping = group_rows(weight, trained_ids)
        return cls(weight, grouping) if len(grouping[2]) < len(weight) // 2 else None

    def loss_sum(self, h: torch.Tensor, targets: torch.Tensor, trained_rows: torch.Tensor | None = None,
                 trained_slot: torch.Tensor | None = None) -> torch.Tensor:
        """Summed cross-entropy of h (N, C) against full-vocabulary targets (N,)."""
        logits = F.linear(h, self.rows.to(h.dtype)).float()
        parts = [logits + self.log_counts]
        g = self.group[targets]
        target_logit = logits.gather(-1, g.clamp(min=0)[:, None])[:, 0]
        if trained_rows is not None:
            own = F.linear(h, trained_rows.to(h.dtype)).float()
            parts.append(own)
            s = trained_slot[targets]
            target_logit = torch.where(s >= 0, own.gather(-1, s.clamp(min=0)[:, None])[:, 0],
                                       target_logit)
        return (torch.logsumexp(torch.cat(parts, dim=-1), dim=-1) - target_logit).sum()
