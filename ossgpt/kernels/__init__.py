"""Fast kernels behind a small interface; the plain PyTorch code in ossgpt/model.py and
ossgpt/mxfp4.py is the reference they are tested against (tests/test_kernels.py,
tests/test_grouped_moe.py). On the CPU, C++ (ossgpt/kernels/cpu) built for the best instruction
set this CPU has (build.py); on GPUs, grouped_moe.py's sync-free mixture of experts (the rest of
the model runs its plain PyTorch there).

Without a compiler, on a CPU none of the levels fits, or with OSSGPT_ISA=plain (OSSGPT_KERNELS=0),
`cpu_kernels()` is None and the model runs the plain path.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F

from . import build, grouped_moe

_lock = threading.Lock()
_chosen: tuple[str, ModuleType | None] | None = None     # (level, extension) once chosen
_rows = threading.local()    # .invariant: within row_invariant() on this thread


def cpu_kernels() -> ModuleType | None:
    """The extension of the level chosen for this CPU (built on first use), or None where the
    plain path runs."""
    global _chosen
    if _chosen is not None:
        return _chosen[1]
    with _lock:
        if _chosen is None:
            level, note = build.chosen_level()
            if note:
                print(f"ossgpt: {note}", file=sys.stderr, flush=True)
            supported = build.supported_levels()
            chosen: tuple[str, ModuleType | None] = (build.PLAIN, None)
            for candidate in reversed(supported[1:supported.index(level) + 1]):   # then lower ones
                module = build.build(candidate)
                if module is not None:
                    chosen = (candidate, module)
                    break
                if not build.have_compiler():
                    break                                          # no compiler: no level will build
            if level != build.PLAIN and chosen[1] is None:
                print("ossgpt: running the plain PyTorch path (slower)", file=sys.stderr, flush=True)
            _chosen = chosen
    return _chosen[1]


def isa() -> str:
    """The instruction-set level the CPU kernels run at here: avx2, avx512, avx512bf16, neon, or
    plain (the PyTorch path)."""
    cpu_kernels()
    return _chosen[0]


def expert_decode_inputs(dtype: torch.dtype) -> str:
    """How decode's fused MXFP4 experts take a `dtype` model's activations on this CPU: "exact"
    (bf16 products, or float32 ones: the plain path's numerics); "int16" or "int9" (each block of
    32 held as integers on its largest element's scale, rounded to at most 2**-16 or 2**-9 of it,
    where bf16 rounds each value to 2**-9 of its own size; kernels/cpu/mxfp4.h, mxfp4_bytes.h);
    or "plain" (no kernels)."""
    ext = cpu_kernels()
    if ext is None:
        return "plain"
    integers = ext.expert_decode_inputs in ("int16", "int9")
    return ext.expert_decode_inputs if dtype == torch.bfloat16 and integers else "exact"


def expert_prefill_inputs(dtype: torch.dtype) -> str:
    """The same for prefill (many tokens per expert): "int9" on avx2 and avx512 for bf16 models
    (decode's integers, in an integer GEMM: kernels/cpu/gemm_i16.h), else "exact" or "plain"."""
    ext = cpu_kernels()
    if ext is None:
        return "plain"
    return "int9" if dtype == torch.bfloat16 and ext.expert_prefill_inputs == "int9" else "exact"


@contextmanager
def use_isa(level: str) -> Iterator[ModuleType | None]:
    """Run the CPU kernels of `level` (plain: none) within the block, for tests and benchmarks
    that compare levels on one machine. Raises ValueError where this CPU cannot run the level
    and RuntimeError where it does not compile."""
    global _chosen
    if level not in build.supported_levels():
        raise ValueError(f"this CPU cannot run {level} (it runs {', '.join(build.supported_levels())})")
    module = None if level == build.PLAIN else build.build(level)
    if level != build.PLAIN and module is None:
        raise RuntimeError(f"the CPU kernels for {level} did not compile")
    cpu_kernels()
    before = _chosen
    _chosen = (level, module)
    try:
        yield module
    finally:
        _chosen = before


@contextmanager
def row_invariant() -> Iterator[None]:
    """Within the block (on this thread), the decode products give each row the same bits
    whatever else shares the batch: the bf16 products, the attention inputs and the experts run
    one row at a time, as at batch 1. Why: their kernels pick accumulator layouts by the number
    of rows (4 independent sums per token for one token, 2 for two, 1 from three; 3-row weight
    tiles from 5 tokens; expert panels past 4 tokens an expert), so a row's float32 sums, and
    then its sampled tokens, would change with the batch. Decode attention is per row already.
    Costs a call per row per product: `ossgpt eval` and `ossgpt serve --batch-invariant`.
    The plain path (no kernels) does the same through `each_row`: oneDNN also picks its bf16
    kernel by the number of rows (nano's o_proj gave a row other bits at 3 rows than at 1).
    GPUs are not covered: cuBLAS chooses its kernels by shape, so there a reply may still
    depend on its batch."""
    before = getattr(_rows, "invariant", False)
    _rows.invariant = True
    try:
        yield
    finally:
        _rows.invariant = before


def moe(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, experts,
        limit: float, alpha: float = 1.702) -> torch.Tensor | None:
    if getattr(_rows, "invariant", False) and x.shape[0] > 1:
        outs = [_moe(x[i:i + 1], indices[i:i + 1], gates[i:i + 1], experts, limit, alpha)
                for i in range(x.shape[0])]
        return None if outs[0] is None else torch.cat(outs)
    return _moe(x, indices, gates, experts, limit, alpha)


def _moe(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, experts,
         limit: float, alpha: float = 1.702) -> torch.Tensor | None:
    """The mixture of experts for x (N, C) -> float32 (N, C): on the CPU the fused MXFP4 kernel,
    elsewhere (GPUs) grouped_moe's sync-free grouped products; None where neither applies
    (gradients wanted, wrapped experts, the CPU without kernels or with dense experts)."""
    from .. import model   # the module type the plain path is made of (it imports this module)
    # Wrapped experts (LoRA) and subclasses (nano's fake quantization) change what weights(e)
    # returns, and take the plain path; so does anything that needs gradients, which the
    # kernels do not give.
    if (type(experts) is not model.Experts
            or torch.is_grad_enabled() and (x.requires_grad or experts.mlp1_bias.requires_grad)):
        return None
    if x.device.type != "cpu":
        return grouped_moe.moe(x, indices, gates, experts, limit, alpha)
    ext = cpu_kernels() if experts.packed else None
    if ext is None:
        return None
    return ext.moe_forward(x if x.dtype == torch.bfloat16 else x.float(), indices, gates.float(),
                           experts.mlp1_blocks, experts.mlp1_scales, experts.mlp1_bias,
                           experts.mlp2_blocks, experts.mlp2_scales, experts.mlp2_bias,
                           float(limit), float(alpha))


def _unhooked(*modules: torch.nn.Module) -> bool:
    """Whether no forward hook would see these modules' calls (ossgpt.inspect records through
    hooks): a fused call makes none of them."""
    registry = torch.nn.modules.module
    return not (registry._global_forward_hooks or registry._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def moe_layer(x: torch.Tensor, moe) -> torch.Tensor | None:
    """x + moe(x) for decode's few bf16 tokens on the CPU, in one call: model.MoE.forward's own
    operations on the kernel path (norm, router, top k, gates, experts, residual), so the same
    bits, without ~20 Python round trips a layer. None where it does not apply (then the modules
    run): more than 8 tokens, gradients, hooks or adapters on its parts, experts not packed here,
    a subclass's routing or mixing (expert parallel)."""
    from .. import model, packed_bf16   # the module types the plain path is made of
    norm, router, experts = moe.norm, moe.router, moe.experts
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.numel() > 8 * x.shape[-1]
            or getattr(_rows, "invariant", False) and x.numel() > x.shape[-1]
            or type(moe).route is not model.MoE.route or type(moe).mix is not model.MoE.mix
            or type(norm) is not model.RMSNorm or type(experts) is not model.Experts
            or not experts.packed or experts.mlp1_bias.device.type != "cpu"
            or type(router) not in (model.Linear, packed_bf16.PackedLinear)
            or not _unhooked(norm, router, experts)
            or torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in moe.parameters()))):
        return None
    ext = cpu_kernels()
    weight = _weight_parts(router.packed if type(router) is packed_bf16.PackedLinear else router.weight)
    if ext is None or weight is None:
        return None
    return ext.moe_layer_bf16(x, norm.weight, norm.eps, weight, router.bias, moe.k,
                              experts.mlp1_blocks, experts.mlp1_scales, experts.mlp1_bias,
                              experts.mlp2_blocks, experts.mlp2_scales, experts.mlp2_bias,
                              float(moe.limit), model.SWIGLU_ALPHA)


def attention_output(x: torch.Tensor, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """x + attn.output(attention) for decode (one new bf16 token a sequence) on the CPU, in one
    call: the mask (as model.attention_mask), decode attention, o_proj and the residual, the
    operations Attention.forward takes on the kernel path. None where it does not apply (then
    Attention.forward goes on): prefill, gradients, hooks or adapters on o_proj, a subclass's
    output (tensor parallel attention)."""
    from .. import model, packed_bf16   # the module types the plain path is made of
    B, T = q.shape[:2]
    o = attn.o_proj
    if (T != 1 or x.device.type != "cpu" or not _decode_attention_takes(q, k)
            or getattr(_rows, "invariant", False) and B > 1
            or type(attn).output is not model.Attention.output
            or type(o) not in (model.Linear, packed_bf16.PackedLinear) or not _unhooked(o)
            or torch.is_grad_enabled() and (x.requires_grad or q.requires_grad
                                            or any(p.requires_grad for p in attn.parameters()))):
        return None
    ext = cpu_kernels()
    weight = _weight_parts(o.packed if type(o) is packed_bf16.PackedLinear else o.weight)
    # more than 8 tokens on the avx512bf16 level: oneDNN's bf16 matmul takes o_proj (as in linear)
    if ext is None or weight is None or o.in_features % 32 or B > 8 and not ext.many_rows:
        return None
    window = -1 if attn.window is None else attn.window
    return ext.attention_output_bf16(x, q, k, v, attn.sinks, positions, k_pos, window, attn.scale,
                                     weight, o.bias)


def dequantize_bf16(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """MXFP4 -> bfloat16 on the CPU, threaded (exact, as mxfp4.dequantize); None where the
    kernels are unavailable."""
    if blocks.device.type != "cpu":
        return None
    ext = cpu_kernels()
    return None if ext is None else ext.dequantize_bf16(blocks, scales)


def _weight_parts(weight) -> list[torch.Tensor] | None:
    """What the C++ products take for a weight: [bf16 tensor] or a PackedBF16's parts (its
    `parts()`); None for anything else."""
    if isinstance(weight, torch.Tensor):
        return [weight] if weight.dtype == torch.bfloat16 else None
    return weight.parts()


def each_row(fn, x: torch.Tensor, *per_row: torch.Tensor) -> torch.Tensor | None:
    """fn(x, *per_row), or within row_invariant() for decode's few rows (2 to 8 of x's rows,
    its last dimension the features) fn of each row alone, concatenated: the kernels' products
    and the plain path's, whose library kernels depend on the number of rows too. None where
    fn gives None (a kernel that does not apply)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (getattr(_rows, "invariant", False) and 1 < rows <= 8):
        return fn(x, *per_row)
    flat = x.reshape(rows, x.shape[-1])
    parts = [p.reshape(rows, *p.shape[x.dim() - 1:]) for p in per_row]
    outs = [fn(flat[i:i + 1], *(p[i:i + 1] for p in parts)) for i in range(rows)]
    return None if outs[0] is None else torch.cat(outs).view(*x.shape[:-1], -1)


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, a row at a time within row_invariant(): the plain path's product."""
    return each_row(lambda row: F.linear(row, weight, bias), x)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor | None:
    return each_row(lambda row: _linear(row, weight, bias), x)


def _linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias for bf16 x on the CPU, weight bf16 or a packed_bf16.PackedBF16: up to
    8 rows (decode, batches of up to 8) at every level, and any number of rows (prefill) where
    the level has no bf16 products and oneDNN's bf16 matmul would emulate them; None where the
    kernel does not apply (then F.linear)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    parts = _weight_parts(weight)
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or parts is None
            or rows == 0 or x.shape[-1] % 32 or parts[0].device.type != "cpu"
            or torch.is_grad_enabled() and (x.requires_grad or getattr(weight, "requires_grad", False))):
        return None
    ext = cpu_kernels()
    if ext is None or rows > 8 and not ext.many_rows:
        return None
    y = ext.linear_bf16(x.reshape(rows, x.shape[-1]), parts, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def attention_inputs(x: torch.Tensor, attn, cos: torch.Tensor, sin: torch.Tensor):
    if getattr(_rows, "invariant", False) and x.shape[0] > 1 and x.shape[1] == 1:
        outs = [_attention_inputs(x[i:i + 1], attn, cos[i:i + 1], sin[i:i + 1])
                for i in range(x.shape[0])]
        return None if outs[0] is None else tuple(torch.cat(t) for t in zip(*outs))
    return _attention_inputs(x, attn, cos, sin)


def _attention_inputs(x: torch.Tensor, attn, cos: torch.Tensor, sin: torch.Tensor):
    """Attention's q, k, v for up to 8 tokens of bf16 x (B, T, C) in one call (RMSNorm, the three
    products, the rotary embedding of q and k), or None where it does not apply (then the
    plain modules run: adapters wrapping the projections, gradients, not the CPU)."""
    # the module types the plain path is made of (both import this module)
    from .. import model, packed_bf16
    B, T, C = x.shape
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or B * T > 8 or C % 32
            or any(type(p) not in (model.Linear, packed_bf16.PackedLinear) or p.bias is None
                   for p in projections)
            or type(attn.norm) is not model.RMSNorm
            or torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in attn.parameters()))):
        return None
    weights = [_weight_parts(p.packed if type(p) is packed_bf16.PackedLinear else p.weight)
               for p in projections]
    ext = cpu_kernels()
    if ext is None or any(w is None for w in weights):
        return None
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    out = ext.qkv_rope_bf16(x.reshape(B * T, C), attn.norm.weight, attn.norm.eps,
                            weights, [p.bias for p in projections],
                            cos.reshape(B * T, -1).float(), sin.reshape(B * T, -1).float(), H + K)
    q, k, v = out.view(B, T, -1).split([H * D, K * D, K * D], dim=-1)
    return q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)


def _decode_attention_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the decode attention kernel takes these bf16 q (B, 1, H, D) and keys (B, S, K, D)."""
    H, D = q.shape[2:]
    return (q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and not D % 16 and D <= 128
            and H // k.shape[2] <= 8)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              mask: torch.Tensor, scale: float) -> torch.Tensor | None:
    """model.sdpa_with_sinks on the CPU, or None where no kernel applies (not the CPU, kernels
    unavailable). Prefill goes through PyTorch's flash attention, decode (one new token per
    sequence) through ours, training (gradients wanted) through `attention_with_grad`.

    The flash kernel has no sinks, but it returns each row's log-sum-exp: a sink logit s adds
    e**s to the softmax's denominator and nothing to its numerator, so the output with the sink
    is the output without it times Z / (Z + e**s) = sigmoid(lse - s)."""
    B, T, H, D = q.shape
    if q.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks)):
        return attention_with_grad(q, k, v, sinks, mask, scale)
    if T == 1:
        ext = cpu_kernels()
        if ext is None or not _decode_attention_takes(q, k):
            return None
        return ext.decode_attention(q.view(B, H, D), k, v, sinks.float(), mask.view(B, -1),
                                    scale).view(B, 1, H, D)
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None:
        return None
    G = H // k.shape[2]
    k = k.transpose(1, 2).repeat_interleave(G, dim=1)                   # (B, H, S, D)
    v = v.transpose(1, 2).repeat_interleave(G, dim=1)
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))[:, None]
    out, lse = flash(q.transpose(1, 2), k, v, 0.0, False, attn_mask=bias, scale=scale)
    keep = torch.sigmoid(lse - sinks.float().view(1, H, 1)).unsqueeze(-1)  # (B, H, T, 1)
    # a row with no key to attend gives lse -inf and 0 * nan: the sink takes all, the output is 0
    out = torch.nan_to_num(out.float() * keep, nan=0.0)
    return out.transpose(1, 2).to(q.dtype)


def attention_with_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        mask: torch.Tensor, scale: float) -> torch.Tensor:
    """model.sdpa_with_sinks through PyTorch's fused, differentiable scaled_dot_product_attention:
    training's attention, forward and backward about twice the plain path's speed on the CPU
    (it never holds the (T, S) probabilities of every head). The flash path's log-sum-exp
    correction has no gradient, so here the sink joins as one more key: each query gains a last
    dimension holding its head's sink / scale, the keys a 0 there, and the extra key is all 0 but
    a 1 there, with a value of 0. Its score is exactly the sink; it is never masked, which also
    keeps a padding row (no key to attend) at an output of 0, as the plain path gives."""
    B, T, H, D = q.shape
    S, K = k.shape[1:3]
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()      # the plain path's float32 on the CPU
    q = torch.cat([q, (sinks.float() / scale).view(1, 1, H, 1).expand(B, T, H, 1)], dim=-1)
    sink_key = torch.cat([k.new_zeros(B, 1, K, D), k.new_ones(B, 1, K, 1)], dim=-1)
    k = torch.cat([torch.cat([k, k.new_zeros(B, S, K, 1)], dim=-1), sink_key], dim=1)
    v = torch.cat([v, v.new_zeros(B, 1, K, D)], dim=1)
    mask = torch.cat([mask, mask.new_ones(B, T, 1)], dim=-1)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).to(dtype)
