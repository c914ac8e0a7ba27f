"""One model across several processes (torch.distributed): expert parallel mixtures of experts
and tensor parallel attention.

Every process holds the embedding, the norms, the routers and the unembedding whole, and runs
every token (the batch is replicated). What is split:
- experts: process r of N holds experts [r E/N, (r+1) E/N) of every layer and runs only the
  (token, slot) pairs routed to them; an all-reduce sums the processes' shares.
- attention: process r holds key/value heads [r K/N, (r+1) K/N) and the query heads that read
  them (gpt-oss groups H/K query heads per key head), their sinks and their slice of the cache,
  and the matching columns of o_proj; an all-reduce sums the partial outputs (o_proj's bias is
  added by process 0 only).
Both sums run in float32, so float32 logits equal one process's within rounding, and a bf16
model's within its own band.

Sharding happens while loading (checkpoint.load's `shard`): the model is built on the meta
device whole, the checkpoint checked against it, each tensor read as this process's slice of
it (a view of the memory-mapped file where the slice is rows, so an unshared expert is never
read), and the whole modules swapped for local ones before the tensors are assigned."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..errors import OssgptError
from ..model import Attention, Experts, MoE, Transformer


@dataclass(frozen=True)
class Shard:
    """This process's part of the model: `rank` of `world` processes."""
    rank: int
    world: int
    experts: bool = True       # expert parallel
    attention: bool = True     # tensor parallel attention

    def check(self, config: ModelConfig) -> None:
        """One clear error where the model cannot be split this way."""
        if self.experts and config.num_experts % self.world:
            raise OssgptError(f"expert parallel over {self.world} processes needs num_experts "
                              f"({config.num_experts}) divisible by {self.world}")
        if self.attention and config.num_key_value_heads % self.world:
            raise OssgptError(f"tensor parallel attention over {self.world} processes needs "
                              f"num_key_value_heads ({config.num_key_value_heads}) divisible by "
                              f"{self.world}")

    def experts_range(self, config: ModelConfig) -> tuple[int, int]:
        n = config.num_experts // self.world if self.experts else config.num_experts
        first = self.rank * n if self.experts else 0
        return first, first + n

    def kv_heads_range(self, config: ModelConfig) -> tuple[int, int]:
        n = config.num_key_value_heads // self.world if self.attention else config.num_key_value_heads
        first = self.rank * n if self.attention else 0
        return first, first + n

    def heads_range(self, config: ModelConfig) -> tuple[int, int]:
        g = config.num_attention_heads // config.num_key_value_heads
        k0, k1 = self.kv_heads_range(config)
        return k0 * g, k1 * g

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this process's modules: its experts and heads only."""
        (e0, e1), (k0, k1), (h0, h1) = (self.experts_range(config), self.kv_heads_range(config),
                                        self.heads_range(config))
        return dataclasses.replace(config, num_experts=e1 - e0,
                                   experts_per_token=min(config.experts_per_token, e1 - e0),
                                   num_attention_heads=h1 - h0, num_key_value_heads=k1 - k0)

    def select(self, name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """This process's slice of the model tensor `name` (the whole tensor where unsplit)."""
        if self.experts and ".mlp.experts." in name:
            e0, e1 = self.experts_range(config)
            return t[e0:e1]
        if not self.attention or ".attn." not in name:
            return t
        D = config.head_dim
        (h0, h1), (k0, k1) = self.heads_range(config), self.kv_heads_range(config)
        field = name.split(".attn.")[1]
        if field in ("q_proj.weight", "q_proj.bias"):
            return t[h0 * D:h1 * D]
        if field.split(".")[0] in ("k_proj", "v_proj"):
            return t[k0 * D:k1 * D]
        if field == "sinks":
            return t[h0:h1]
        if field == "o_proj.weight":
            return t[:, h0 * D:h1 * D].contiguous()
        if field == "o_proj.bias":
            return t if self.rank == 0 else torch.zeros_like(t)
        return t    # the norm

    def apply(self, model: Transformer) -> None:
        """Swap `model`'s (meta) attention and mixtures of experts for this process's."""
        config = model.config
        self.check(config)
        for i, block in enumerate(model.blocks):
            if self.attention:
                block.attn = TensorParallelAttention(config, i, self)
            if self.experts:
                block.mlp = ExpertParallelMoE(config, self, packed=block.mlp.experts.packed)
        model.shard = self

    def describe(self, model: Transformer) -> str:
        """Which experts and heads this process holds, and the bytes of its experts."""
        config = model.config
        (e0, e1), (h0, h1) = self.experts_range(config), self.heads_range(config)
        expert_bytes = sum(t.nbytes for name, t in model.state_dict().items() if ".experts." in name)
        return (f"process {self.rank} of {self.world}: experts {e0}-{e1 - 1} of "
                f"{config.num_experts} ({expert_bytes / 2**20:.1f} MiB), query heads {h0}-{h1 - 1} "
                f"of {config.num_attention_heads}")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    out = t.float()
    dist.all_reduce(out)
    return out


class TensorParallelAttention(Attention):
    """Attention over this process's heads; the partial outputs summed over processes."""

    def __init__(self, config: ModelConfig, layer: int, shard: Shard):
        super().__init__(shard.local_config(config), layer)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        partial = self.o_proj(out)
        return _all_reduce(partial).to(partial.dtype)


class ExpertParallelMoE(MoE):
    """A mixture of experts of which this process holds and runs a contiguous share."""

    def __init__(self, config: ModelConfig, shard: Shard, packed: bool = True):
        super().__init__(config, packed)       # the router stays whole: every process routes
        self.first = shard.experts_range(config)[0]
        self.experts = Experts(shard.local_config(config), packed)

    def mix(self, t: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        n = self.experts.mlp1_bias.shape[0]
        token, slot = torch.where((indices >= self.first) & (indices < self.first + n))
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        if len(token):
            # each routed pair as a token with one expert: no work for the others' experts
            mine = super().mix(t[token], (indices[token, slot] - self.first)[:, None],
                               gates[token, slot][:, None])
            out.index_add_(0, token, mine)
        dist.all_reduce(out)
        return out
