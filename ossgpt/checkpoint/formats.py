"""Weight-name tables: where each of the model's tensors lives in each checkpoint format.

One table per format, built from the config; a table maps every model state-dict name to a
`Source` (checkpoint tensor name, optional row range, optional transpose). Loading reads each
source; saving inverts the same table, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

ORIGINAL = "original"
HF = "hf"


@dataclass(frozen=True)
class Source:
    name: str                          # tensor name in the checkpoint
    rows: tuple[int, int] | None = None  # a slice of dim 0 (original's fused qkv)
    transpose: bool = False            # swap the last two dims (HF's dense experts)


def _qkv_rows(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return (0, q), (q, q + kv), (q + kv, q + 2 * kv)


def original_table(config: ModelConfig, packed: bool = True) -> dict[str, Source]:
    """The official `original/model.safetensors` names (openai/gpt-oss `torch/weights.py`)."""
    t = {"embedding.weight": Source("embedding.weight"),
         "norm.weight": Source("norm.scale"),
         "unembedding.weight": Source("unembedding.weight")}
    q_rows, k_rows, v_rows = _qkv_rows(config)
    for i in range(config.num_hidden_layers):
        ours, theirs = f"blocks.{i}", f"block.{i}"
        for part in ("weight", "bias"):
            # q, k and v are concatenated along the output dimension, in that order.
            for proj, rows in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
                t[f"{ours}.attn.{proj}.{part}"] = Source(f"{theirs}.attn.qkv.{part}", rows)
            t[f"{ours}.attn.o_proj.{part}"] = Source(f"{theirs}.attn.out.{part}")
            t[f"{ours}.mlp.router.{part}"] = Source(f"{theirs}.mlp.gate.{part}")
        t[f"{ours}.attn.norm.weight"] = Source(f"{theirs}.attn.norm.scale")
        t[f"{ours}.attn.sinks"] = Source(f"{theirs}.attn.sinks")
        t[f"{ours}.mlp.norm.weight"] = Source(f"{theirs}.mlp.norm.scale")
        for m in ("mlp1", "mlp2"):
            t[f"{ours}.mlp.experts.{m}_bias"] = Source(f"{theirs}.mlp.{m}_bias")
            if packed:
                t[f"{ours}.mlp.experts.{m}_blocks"] = Source(f"{theirs}.mlp.{m}_weight.blocks")
                t[f"{ours}.mlp.experts.{m}_scales"] = Source(f"{theirs}.mlp.{m}_weight.scales")
            else:
                t[f"{ours}.mlp.experts.{m}_weight"] = Source(f"{theirs}.mlp.{m}_weight")
    return t


def hf_table(config: ModelConfig, packed: bool = True) -> dict[str, Source]:
    """transformers' GptOssForCausalLM names. The MXFP4 `*_blocks`/`*_scales` are stored exactly
    as in the original layout (out-major, gate/linear interleaved); the dense `gate_up_proj`
    (E, C, 2I) and `down_proj` (E, I, C) are in-major, hence the transposes
    (transformers `integrations/mxfp4.py` `convert_moe_packed_tensors`)."""
    t = {"embedding.weight": Source("model.embed_tokens.weight"),
         "norm.weight": Source("model.norm.weight"),
         "unembedding.weight": Source("lm_head.weight")}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        for part in ("weight", "bias"):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t[f"{ours}.attn.{proj}.{part}"] = Source(f"{theirs}.self_attn.{proj}.{part}")
            t[f"{ours}.mlp.router.{part}"] = Source(f"{theirs}.mlp.router.{part}")
        t[f"{ours}.attn.norm.weight"] = Source(f"{theirs}.input_layernorm.weight")
        t[f"{ours}.attn.sinks"] = Source(f"{theirs}.self_attn.sinks")
        t[f"{ours}.mlp.norm.weight"] = Source(f"{theirs}.post_attention_layernorm.weight")
        for m, hf in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            t[f"{ours}.mlp.experts.{m}_bias"] = Source(f"{theirs}.mlp.experts.{hf}_bias")
            if packed:
                t[f"{ours}.mlp.experts.{m}_blocks"] = Source(f"{theirs}.mlp.experts.{hf}_blocks")
                t[f"{ours}.mlp.experts.{m}_scales"] = Source(f"{theirs}.mlp.experts.{hf}_scales")
            else:
                t[f"{ours}.mlp.experts.{m}_weight"] = Source(f"{theirs}.mlp.experts.{hf}", transpose=True)
    return t


def table(fmt: str, config: ModelConfig, packed: bool = True) -> dict[str, Source]:
    return {ORIGINAL: original_table, HF: hf_table}[fmt](config, packed)


def packed_marker(fmt: str) -> str:
    """A tensor-name suffix present only in MXFP4 checkpoints of this format."""
    return {ORIGINAL: ".mlp.mlp1_weight.blocks", HF: ".mlp.experts.gate_up_proj_blocks"}[fmt]
