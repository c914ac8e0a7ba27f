"""Trainable tokens: fine-tuning a few rows of the embedding and unembedding, the way PEFT's
`trainable_token_indices` does, for tokens the base model has no trained row for.

Why: a LoRA on attention and experts cannot tell apart tokens whose unembedding rows are the
same vector; they always get the same logit. nano's compact vocabulary (compact_vocab.py) gives
every id its training data never used one shared unembedding row, so a new tool name made of
such tokens (`get_local_time`: `_local`, `_time`) could never be written. Rows can also be all but
shared: an id nano saw only in prompts, never as a target, got nothing but the softmax's push-down,
the same for every such id, so ' *', '}', ' sum' and ' population' ended within 3% of one another
(cosine 0.9995; the nearest rows of ids it learned to write are 43% apart) and nano wrote `print(7117}`. The ids
the fine-tuning data uses whose embedding or unembedding row equals, or lies within
`NEAR_DUPLICATE` of, another id's row get rows of their own.

PEFT's format, for reference (peft.tuners.trainable_tokens): adapter_config.json has
"trainable_token_indices": {"embed_tokens": [ids], "lm_head": [ids]}, and the adapter's
tensors `...embed_tokens.token_adapter.trainable_tokens_delta` (n, C) hold the rows themselves
(the new values, despite the name), in the order of the ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compact_vocab import group_rows

# PEFT tensor names of the two tables under transformers' GptOssForCausalLM.
PEFT_TABLES = {"embedding": ("embed_tokens", "base_model.model.model.embed_tokens"),
               "unembedding": ("lm_head", "base_model.model.lm_head")}
PEFT_SUFFIX = ".token_adapter.trainable_tokens_delta"


def shared_row_ids(weight: torch.Tensor) -> torch.Tensor:
    """Ids whose row of `weight` (V, C) equals some other id's row: rows never trained apart."""
    group, counts, _ = group_rows(weight)
    return (counts[group] > 1).nonzero()[:, 0]


# Relative L2 distance under which two rows count as one: nano's rows trained only by push-down
# lie within 3.2% of one another, the nearest rows of ids it was trained to write 43% apart.
NEAR_DUPLICATE = 0.1


def near_duplicate_rows(rows: torch.Tensor, which: torch.Tensor, rtol: float = NEAR_DUPLICATE
                        ) -> torch.Tensor:
    """Whether each of rows[which] lies within `rtol` (relative L2) of some other row of the
    distinct rows `rows` (G, C) -> (len(which),) bool. Candidates come from a 32-dimensional random
    projection (a real 201,088 x 2,880 table against thousands of ids would be teraflops exactly),
    with a margin no near pair escapes in practice; each candidate is then checked exactly."""
    w = rows.detach().float()
    proj = torch.randn(w.shape[1], 32, generator=torch.Generator().manual_seed(0)) / 32 ** 0.5
    keys = torch.cat([w[i:i + 65536] @ proj for i in range(0, len(w), 65536)])
    norms = w[which].norm(dim=1)
    near = torch.zeros(len(which), dtype=torch.bool)
    for s in range(0, len(which), 256):
        part = which[s:s + 256]
        d = torch.cdist(keys[part], keys)
        d[torch.arange(len(part)), part] = float("inf")  # not itself
        i, j = (d <= 2 * rtol * norms[s:s + 256, None]).nonzero(as_tuple=True)
        close = (w[part[i]] - w[j]).norm(dim=1) <= rtol * norms[s + i]
        near[s + i[close]] = True
    return near


def untrained_ids(model: nn.Module, used: set[int] | list[int]) -> list[int]:
    """The ids among `used` without a row of their own in the model's embedding or unembedding:
    a row equal to another id's, or nearly (`NEAR_DUPLICATE`)."""
    used_t = torch.as_tensor(sorted(set(used)), dtype=torch.long)
    if len(used_t) == 0:
        return []
    hit = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    for table in (model.embedding, model.unembedding):
        group, counts, first = group_rows(table.weight)
        hit[(counts[group] > 1).nonzero()[:, 0]] = True
        hit[used_t[near_duplicate_rows(table.weight.detach()[first], group[used_t])]] = True
    return used_t[hit[used_t]].tolist()


def _slots(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """id -> index into the rows (-1: the base row)."""
    slot = torch.full((vocab_size,), -1, dtype=torch.long)
    slot[ids] = torch.arange(len(ids))
    return slot


def replace_rows(base: nn.Module, x: torch.Tensor, ids: torch.Tensor, slot: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
    """The base table's output with the rows of `ids` replaced by `rows`: for an embedding, the
    looked-up vectors of those ids; for an unembedding, the logit columns of those ids."""
    out = base(x)
    if isinstance(base, nn.Embedding):
        s = slot.to(x.device)[x]
        mine = F.embedding(s.clamp(min=0), rows).to(out.dtype)
        return torch.where((s >= 0)[..., None], mine, out)
    cols = F.linear(x.to(rows.dtype), rows).to(out.dtype)
    return out.index_copy(out.dim() - 1, ids.to(out.device), cols)


class TrainableRows(nn.Module):
    """A frozen embedding or unembedding whose rows for `ids` are trainable parameters, started
    from the base rows (as PEFT starts them)."""

    def __init__(self, base: nn.Module, ids: list[int]) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        ids_t = torch.as_tensor(sorted(set(ids)), dtype=torch.long)
        self.register_buffer("ids", ids_t, persistent=False)
        self.register_buffer("slot", _slots(ids_t, base.weight.shape[0]), persistent=False)
        self.rows = nn.Parameter(base.weight.detach()[ids_t].float().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The base table (for its dtype and device); the trained rows are in `rows`."""
        return self.base.weight

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight.detach().clone()
        w[self.ids] = self.rows.detach().to(w.dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return replace_rows(self.base, x, self.ids, self.slot, self.rows)


def add_trainable_tokens(model: nn.Module, ids: list[int] | dict[str, list[int]]
                         ) -> list[nn.Parameter]:
    """Wrap the model's embedding and unembedding (or the tables a dict names: "embedding",
    "unembedding") so the rows of `ids` train; -> their parameters."""
    per_table = ids if isinstance(ids, dict) else {"embedding": ids, "unembedding": ids}
    params = []
    for name, table_ids in per_table.items():
        if table_ids:
            setattr(model, name, TrainableRows(getattr(model, name), table_ids))
            params.append(getattr(model, name).rows)
    return params


def trainable_ids(model: nn.Module) -> dict[str, list[int]]:
    """{"embedding": ids, "unembedding": ids} of the tables with trainable rows."""
    return {name: getattr(model, name).ids.tolist() for name in PEFT_TABLES
            if isinstance(getattr(model, name), TrainableRows)}


@torch.no_grad()
def merge_tokens(model: nn.Module) -> None:
    """Write the trained rows into the base tables and unwrap them."""
    for name in ("embedding", "unembedding"):
        table = getattr(model, name)
        if isinstance(table, TrainableRows):
            table.base.weight[table.ids] = table.rows.to(table.base.weight.dtype)
            setattr(model, name, table.base)


class SwitchRows(nn.Module):
    """A frozen table with several named adapters' rows; `active` picks one (None: the base)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.active = base, None
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add(self, name: str, rows: TrainableRows) -> None:
        self.factors[name] = (rows.ids, rows.slot, rows.rows.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active not in self.factors:
            return self.base(x)
        return replace_rows(self.base, x, *self.factors[self.active])
