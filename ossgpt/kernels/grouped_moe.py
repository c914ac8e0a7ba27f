"""The mixture of experts for accelerators (CUDA), in PyTorch ops: the (token, slot) pairs are
sorted by expert once, and each weight matrix is one grouped matrix product over them.

Why not MoE.grouped (ossgpt/model.py), the plain reference: it loops over the routed experts in
Python, and finding them (`unique`, `where`) waits for the GPU each time, a host sync per expert
per layer per decode step. Here decode runs without one:
- dense experts (loaded dequantized where the GPU has room, checkpoint/load.py): both products
  through torch's grouped GEMM (`F.grouped_mm`, CUTLASS on Hopper), the group sizes staying on
  the device;
- MXFP4 experts with few pairs (decode): each pair's expert is dequantized on the device by
  gathering its blocks, then one batched product per matrix (a routed expert is read packed,
  a quarter of bf16's bytes);
- MXFP4 experts with many pairs (prefill): each used expert dequantized once, one sync a layer
  to learn the group sizes.
Runs on any device, so tests/test_grouped_moe.py checks it on the CPU against MoE.grouped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import mxfp4

# MXFP4 experts: up to this many (token, slot) pairs are dequantized pair by pair (decode up to
# batch 8 with 4 experts a token; each pair's bf16 copy is 50 MB for gpt-oss's experts); more
# take each used expert once, after one sync.
PAIRWISE_PAIRS = 32

_grouped_mm_fails: set[tuple[str, torch.dtype]] = set()   # (device type, dtype) seen to raise


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (P, in) sorted by expert, weight (E, out, in), ends (E,) int32 cumulative group sizes
    -> (P, out), each row multiplied by its group's matrix."""
    key = (x.device.type, x.dtype)
    grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped_mm is not None and key not in _grouped_mm_fails:
        try:
            return grouped_mm(x, weight.transpose(-1, -2), offs=ends)
        except (RuntimeError, NotImplementedError, TypeError):
            # an older torch, a GPU before sm80, a dtype the kernel lacks: the loop below
            _grouped_mm_fails.add(key)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = x[start:start + n] @ weight[e].T
            start += n
    return out


def moe(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, experts,
        limit: float, alpha: float = 1.702) -> torch.Tensor:
    """sum_j gates[n, j] * expert_{indices[n, j]}(x[n]) for x (N, C) -> float32 (N, C), as
    MoE.grouped computes it (products in x's dtype, then float32)."""
    from ..model import swiglu   # the model imports this package
    N, k = indices.shape
    E = experts.mlp1_bias.shape[0]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)             # pairs grouped by expert
    expert = flat[order]
    token = order // k
    xs = x[token]                                        # (P, C)
    b1 = experts.mlp1_bias[expert].to(x.dtype)            # only the routed rows converted
    b2 = experts.mlp2_bias[expert].to(x.dtype)
    if experts.packed and flat.numel() <= PAIRWISE_PAIRS:
        w1 = mxfp4.dequantize(experts.mlp1_blocks[expert], experts.mlp1_scales[expert], x.dtype)
        h = swiglu(torch.baddbmm(b1[:, :, None], w1, xs[:, :, None])[..., 0], limit, alpha)
        del w1
        w2 = mxfp4.dequantize(experts.mlp2_blocks[expert], experts.mlp2_scales[expert], x.dtype)
        y = torch.baddbmm(b2[:, :, None], w2, h[:, :, None])[..., 0]
    elif experts.packed:
        counts = torch.bincount(flat, minlength=E).tolist()     # the one sync of this layer
        h = xs.new_empty(xs.shape[0], experts.mlp1_bias.shape[1] // 2)
        y = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = slice(start, start + n)
            w1 = mxfp4.dequantize(experts.mlp1_blocks[e], experts.mlp1_scales[e], x.dtype)
            h[rows] = swiglu(torch.addmm(b1[rows], xs[rows], w1.T), limit, alpha)
            w2 = mxfp4.dequantize(experts.mlp2_blocks[e], experts.mlp2_scales[e], x.dtype)
            y[rows] = torch.addmm(b2[rows], h[rows], w2.T)
            start += n
    else:
        # not bincount: on CUDA it reads the largest index back to size its output (a sync)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        ends = torch.cumsum(counts, 0, dtype=torch.int32)
        w1, w2 = experts.mlp1_weight.to(x.dtype), experts.mlp2_weight.to(x.dtype)
        h = swiglu(_grouped_linear(xs, w1, ends) + b1, limit, alpha)
        y = _grouped_linear(h, w2, ends) + b2
    weighted = y.float() * gates.reshape(-1)[order, None].float()
    return torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, weighted)
