"""The gpt-oss transformer in plain PyTorch, top to bottom:
RMSNorm → YaRN rotary embedding → attention with sinks → mixture of experts → block → Transformer.

Follows OpenAI's reference (`gpt_oss/torch/model.py`) and the model card; numerics are checked
against transformers' GptOssForCausalLM in tests/test_model.py.

Shapes: B batch, T new tokens, S cached keys, C hidden, H query heads, K key/value heads,
G = H / K queries per key head, D head dim, E experts, k experts per token, V vocabulary.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, mxfp4
from .config import ModelConfig
from .kv_cache import Cache, make_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as the reference does.
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        return (t * self.weight.float()).to(x.dtype)


# The fast CPU kernels (ossgpt/kernels): the fused MXFP4 experts read each routed expert once,
# packed, where the plain path first writes a dequantized copy (2x to 13x faster, measured from
# 256 down to 8 tokens a layer); decode's bf16 matrix-vector products read their weights at
# memory speed; decode's norm, q/k/v and rotary embedding are one call, its attention another;
# prefill attention runs PyTorch's flash kernel (5x the plain einsums at 512 tokens). False runs
# the plain path everywhere: the reference the tests compare them with.
USE_KERNELS = True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the bf16 decode kernel where it applies."""
    y = kernels.linear(x, weight, bias) if USE_KERNELS else None
    return y if y is not None else kernels.plain_linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class SharedRowsLinear(nn.Module):
    """An unembedding whose rows are a few distinct rows repeated, as in the bundled nano (its
    198,699 unused ids share one row: 2,390 distinct rows for 201,088 ids): the logits are the
    distinct rows' products gathered per id, the full product's numbers (within float32
    rounding) at an eightieth of its cost; nano's decode is otherwise almost all unembedding.

    `weight` stays the full table, for everything that reads or saves it. Once it changes
    (trained, written in place, moved or converted), the full product is taken again."""

    def __init__(self, weight: torch.Tensor, row_of: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        # one id of each distinct row: their rows are the distinct table (a plain attribute,
        # not part of the state dict)
        first = torch.zeros(int(row_of.max()) + 1, dtype=torch.long)
        first[row_of] = torch.arange(len(row_of))
        self.distinct = weight.detach()[first.to(weight.device)].clone()
        self.row_of = row_of.to(weight.device)
        self._of = self._weight_state()

    def _weight_state(self) -> tuple:
        w = self.weight     # (an inference tensor has no version: it changes only in inference mode)
        return w.data_ptr(), 0 if w.is_inference() else w._version, w.dtype, w.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight.requires_grad and torch.is_grad_enabled()) or self._weight_state() != self._of:
            return linear(x, self.weight)
        return linear(x, self.distinct)[..., self.row_of]


class Embedding(nn.Embedding):
    """nn.Embedding starting at zeros, like every other weight here: weights are loaded, never
    trained from a random start, and normal_ on the meta device imports torch._dynamo, 2-3 s of
    every command's start on a slow CPU."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


# -- rotary embedding --------------------------------------------------------------------------

def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071): NTK-by-parts interpolation of the rotary
    frequencies. Returns (inv_freq (D/2,), concentration), the factor cos and sin are scaled by.
    (Made once per set of values: it took 3% of nano's decode step. Do not write to it.)"""
    return _yarn_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_factor,
                          config.initial_context_length, config.rope_ntk_alpha, config.rope_ntk_beta)


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)    # a normal tensor, wherever first made: training reuses it
def _yarn_inv_freq(d: int, base: float, factor: float, ctx: int, ntk_alpha: float,
                   ntk_beta: float) -> tuple[torch.Tensor, float]:
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    # Dimensions that rotate more than beta_fast times over the original context keep their
    # frequency (extrapolate); fewer than beta_slow times are divided by the factor
    # (interpolate); a linear ramp in between.
    d_half = d / 2
    low = d_half * math.log(ctx / (ntk_beta * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(ctx / (ntk_alpha * 2 * math.pi)) / math.log(base)
    ramp = (torch.arange(d_half, dtype=torch.float32) - low) / (high - low)
    keep = 1 - ramp.clamp(0, 1)
    inv_freq = (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep
    return inv_freq, concentration


def rope_cos_sin(positions: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, D/2), float32, concentration applied."""
    inv_freq, concentration = yarn_inv_freq(config)
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # (B, T, D/2)
    return angles.cos() * concentration, angles.sin() * concentration


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D); rotates the two halves of each head (not interleaved pairs)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)                            # (B, T, 1, D/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# -- attention ---------------------------------------------------------------------------------

def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos (B, T), k_pos (B, S) -> bool (B, T, S), True where the query may attend the key.
    Negative positions mark padding and empty cache slots."""
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def attention_probs(q: torch.Tensor, k: torch.Tensor, sinks: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """q (B, T, H, D), k (B, S, K, D), sinks (H,), mask (B, T, S) -> float32 probabilities
    (B, K, G, T, S + 1): each query's softmax over the keys and, last, its head's sink.

    Each head's learned sink logit joins the softmax as an extra column: it takes probability
    mass but adds no value. It also keeps a fully masked row finite."""
    B, T, H, D = q.shape
    K = k.shape[2]
    # On the CPU in float32: PyTorch has no fast bf16 batched matmul there for these shapes
    # (0.2 ms for a decode step's 0.6 M multiply-adds, more than the layer's weights take).
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    q = q.view(B, T, K, H // K, D).to(work)                             # (B, T, K, G, D)
    scores = torch.einsum("btkgd,bskd->bkgts", q, k.to(work)).float() * scale  # (B, K, G, T, S)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    sink = sinks.float().view(1, K, H // K, 1, 1).expand(B, K, H // K, T, 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)


def sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                    mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, S, K, D), sinks (H,), mask (B, T, S) -> (B, T, H, D): attention
    with the sinks' probability mass dropped after the softmax (attention_probs)."""
    B, T, H, D = q.shape
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    probs = attention_probs(q, k, sinks, mask, scale)[..., :-1]          # (B, K, G, T, S)
    out = torch.einsum("bkgts,bskd->btkgd", probs.to(work), v.to(work))  # (B, T, K, G, D)
    return out.reshape(B, T, H, D).to(v.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        C, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        sliding = config.layer_types[layer] == "sliding_attention"
        self.window = config.sliding_window if sliding else None
        self.norm = RMSNorm(C, config.rms_norm_eps)
        self.q_proj = Linear(C, self.n_heads * D)
        self.k_proj = Linear(C, self.n_kv_heads * D)
        self.v_proj = Linear(C, self.n_kv_heads * D)
        self.o_proj = Linear(self.n_heads * D, C)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        self.scale = 1.0 / math.sqrt(D)
        # Called with attention_probs (B, K, G, T, S + 1) and the query positions (B, T) when
        # set: ossgpt.inspect records attention through it. None (the default) costs nothing.
        self.observer = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = kernels.attention_inputs(x, self, cos, sin) if USE_KERNELS else None
        if qkv is None:
            h = self.norm(x)
            q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim)
            k = self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim)
            v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            q, k, v = qkv
        k_pos = positions
        if cache is not None:
            k, v, k_pos = cache.update(k, v, positions)                  # (B, S, K, D), (B, S)
        if USE_KERNELS and self.observer is None:
            y = kernels.attention_output(x, self, q, k, v, positions, k_pos)   # decode, in one call
            if y is not None:
                return y
        mask = attention_mask(positions, k_pos, self.window)
        out = kernels.attention(q, k, v, self.sinks, mask, self.scale) if USE_KERNELS else None
        if out is None:
            out = sdpa_with_sinks(q, k, v, self.sinks, mask, self.scale)
        if self.observer is not None:
            self.observer(attention_probs(q, k, self.sinks, mask, self.scale), positions)
        return x + self.output(out.reshape(B, T, -1))

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, T, H * D) -> the residual update (B, T, C). (Tensor parallel
        attention, ossgpt/parallel, sums this over the processes that hold the other heads.)"""
        return self.o_proj(out)


# -- mixture of experts ------------------------------------------------------------------------

SWIGLU_ALPHA = 1.702     # gpt-oss's gate: g * sigmoid(1.702 g)


def swiglu(x: torch.Tensor, limit: float, alpha: float = SWIGLU_ALPHA) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved columns: even = gate, odd = linear; note the
    extra +1 on the linear half."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


class Experts(nn.Module):
    """E stacked SwiGLU experts. mlp1 (E, 2I, C) and mlp2 (E, C, I), out-major like nn.Linear.

    `packed=True` keeps the weights as MXFP4 (uint8 blocks + scales, a quarter of bf16's
    memory) and dequantizes only the experts a batch routes to; `packed=False` holds them dense
    (fine-tuning, merged or re-quantized models)."""

    def __init__(self, config: ModelConfig, packed: bool = True):
        super().__init__()
        E, C, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.config, self.packed = config, packed
        if packed:
            self.mlp1_blocks = nn.Parameter(torch.zeros(E, 2 * I, C // 32, 16, dtype=torch.uint8), requires_grad=False)
            self.mlp1_scales = nn.Parameter(torch.zeros(E, 2 * I, C // 32, dtype=torch.uint8), requires_grad=False)
            self.mlp2_blocks = nn.Parameter(torch.zeros(E, C, I // 32, 16, dtype=torch.uint8), requires_grad=False)
            self.mlp2_scales = nn.Parameter(torch.zeros(E, C, I // 32, dtype=torch.uint8), requires_grad=False)
        else:
            self.mlp1_weight = nn.Parameter(torch.zeros(E, 2 * I, C))
            self.mlp2_weight = nn.Parameter(torch.zeros(E, C, I))
        self.mlp1_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.mlp2_bias = nn.Parameter(torch.zeros(E, C))

    def weight(self, e: int, which: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's mlp1 (2I, C) (which=0) or mlp2 (C, I) (which=1) in `dtype`."""
        name = ("mlp1", "mlp2")[which]
        if self.packed:
            return _dequantize(getattr(self, f"{name}_blocks")[e], getattr(self, f"{name}_scales")[e], dtype)
        return getattr(self, f"{name}_weight")[e].to(dtype)

    def weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (mlp1 (2I, C), mlp2 (C, I)) in `dtype`."""
        return self.weight(e, 0, dtype), self.weight(e, 1, dtype)

    def mlp(self, e: int, x: torch.Tensor, limit: float) -> torch.Tensor:
        """Expert e on its tokens x (n, C) -> (n, C): mlp1, SwiGLU, mlp2."""
        h = swiglu(F.linear(x, self.weight(e, 0, x.dtype), self.mlp1_bias[e].to(x.dtype)), limit)
        return F.linear(h, self.weight(e, 1, x.dtype), self.mlp2_bias[e].to(x.dtype))

    def dequantized(self) -> "Experts":
        """These experts held dense in their biases' dtype, on their device (the same values:
        MXFP4 is exact in bf16 and float32), dequantized one expert at a time."""
        with torch.device("meta"):
            dense = Experts(self.config, packed=False)
        dtype, device = self.mlp1_bias.dtype, self.mlp1_bias.device
        w1 = torch.empty(dense.mlp1_weight.shape, dtype=dtype, device=device)
        w2 = torch.empty(dense.mlp2_weight.shape, dtype=dtype, device=device)
        with torch.no_grad():
            for e in range(len(w1)):
                w1[e], w2[e] = self.weights(e, dtype)
        dense.mlp1_weight, dense.mlp2_weight = nn.Parameter(w1), nn.Parameter(w2)
        dense.mlp1_bias, dense.mlp2_bias = self.mlp1_bias, self.mlp2_bias
        return dense


def unpack_experts(model: "Transformer", device: torch.device | None = None) -> None:
    """Hold the model's MXFP4 experts dense instead, in place, a layer at a time (full
    fine-tuning trains them; a GPU with room multiplies them without dequantizing each step);
    with `device`, only those on it (experts kept in CPU memory stay packed for its kernels)."""
    for block in model.blocks:
        experts = block.mlp.experts
        if experts.packed and (device is None or experts.mlp1_bias.device == device):
            block.mlp.experts = experts.dequantized()


def _dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The threaded kernel where there is one; both are exact, so they agree bit for bit. float32
    # goes by way of bf16, which holds every MXFP4 value (and its infinities) as float32 does:
    # 3x the plain path's speed, where LoRA's experts dequantize at every step.
    fast = kernels.dequantize_bf16(blocks, scales) if dtype in (torch.bfloat16, torch.float32) else None
    return fast.to(dtype) if fast is not None else mxfp4.dequantize(blocks, scales, dtype)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, packed: bool = True):
        super().__init__()
        self.k, self.limit = config.experts_per_token, config.swiglu_limit
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = Linear(config.hidden_size, config.num_experts)
        self.experts = Experts(config, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.moe_layer(x, self) if USE_KERNELS else None     # decode, in one call
        if y is not None:
            return y
        shape = x.shape
        t = self.norm(x).reshape(-1, shape[-1])                              # (N, C)
        indices, gates = self.route(t)
        return x + self.mix(t, indices, gates).to(x.dtype).view(shape)

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (N, C) -> each token's k experts (N, k) and their gates (N, k), float32."""
        top = torch.topk(self.router(t), self.k, dim=-1, sorted=True)
        return top.indices, torch.softmax(top.values.float(), dim=-1)       # softmax over the k chosen

    def mix(self, t: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Each token's gate-weighted sum of its experts' outputs -> float32 (N, C)."""
        where = self.experts.mlp1_bias.device
        if where != t.device:
            # Experts held in CPU memory beside a GPU (load's experts_device): the hidden states
            # cross to them and back once a layer; the CPU kernels run them.
            return self.mix(t.to(where), indices.to(where), gates.to(where)).to(t.device)
        out = kernels.moe(t, indices, gates, self.experts, self.limit) if USE_KERNELS else None
        return out if out is not None else kernels.each_row(self.grouped, t, indices, gates)

    def grouped(self, t: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The plain path (and the reference of the fused kernel): group tokens by expert, one
        matmul per routed expert, each expert dequantized once. -> float32 (N, C)."""
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)
            y = self.experts.mlp(e, t[token], self.limit)
            out.index_add_(0, token, y.float() * gates[token, slot, None])
        return out


# -- the model ---------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, packed: bool = True):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MoE(config, packed)

    def forward(self, x, cos, sin, positions, cache=None):
        return self.mlp(self.attn(x, cos, sin, positions, cache))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, packed_experts: bool = True):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, packed_experts) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def make_cache(self) -> Cache:
        """A fresh cache: full for full-attention layers, the last `sliding_window` positions
        for sliding layers."""
        return make_cache(self.config)

    def hidden_states(self, tokens: torch.Tensor, cache: Cache | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> final-normed hidden states (B, T, C).

        positions (B, T): each token's position in its sequence, negative for padding; defaults
        to continuing after what the cache holds."""
        B, T = tokens.shape
        if positions is None:
            start = cache.next_position if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        cos, sin = rope_cos_sin(positions.clamp(min=0), self.config)
        x = self.embedding(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, positions, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.unembedding(h).float()

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), float32."""
        return self.logits(self.hidden_states(tokens, cache, positions))
