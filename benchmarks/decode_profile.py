"""Where decode time goes: milliseconds per step in attention, the mixture of experts and the
unembedding, each with the bytes it must read and the read speed that implies (compare with the
machine's bandwidth that benchmarks/compare_engines.py measures), and the multiply-adds it must do
and the rate that implies (compare with the bf16 GEMM rate measured here: batched decode is bound
by arithmetic where one token is bound by memory).

    python benchmarks/decode_profile.py --model DIR [--steps 16] [--context 128] [--batch 1] [--plain]
                                        [--no-pack-dense] [--prefill TOKENS]

--plain runs the plain PyTorch path (model.USE_KERNELS = False) instead of the fast kernels.
--no-pack-dense keeps the dense weights plain bf16 (by default they are packed, as the CLI loads
them: ossgpt/packed_bf16.py).
--batch B decodes B sequences at once: the times are per step (B tokens), and the experts'
bytes are those of the distinct experts the step's tokens route to (at most the layer's all).
--prefill TOKENS profiles one prefill of a TOKENS-long prompt instead (after a warm-up one):
seconds per part and the multiply-adds a second each part makes (attention over the keys left
out), beside the bf16 GEMM's rate; prefill is bound by arithmetic, not bytes.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import ossgpt
from ossgpt import model as model_module
from ossgpt.bench import random_prompts
from ossgpt.generate import decode_step, prefill
from ossgpt.packed_bf16 import PackedLinear


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(module: torch.nn.Module) -> int:
    """Its parameters' bytes, packed weights as stored."""
    packed = [t for m in module.modules() if isinstance(m, PackedLinear) for t in m.packed.parts()]
    return _nbytes(*module.parameters(), *packed)


def bytes_per_step(net, batch: int = 1) -> dict[str, int]:
    """Weight bytes one decode step reads per part: k routed experts per layer and token, taken
    as distinct experts drawn uniformly at random for a batch (random weights route so)."""
    cfg = net.config
    attn = sum(_module_bytes(b.attn) for b in net.blocks)
    experts = 0
    for b in net.blocks:
        e = b.mlp.experts
        packed = (e.mlp1_blocks, e.mlp1_scales, e.mlp2_blocks, e.mlp2_scales) if e.packed \
            else (e.mlp1_weight, e.mlp2_weight)
        E = cfg.num_experts
        distinct = E * (1 - (1 - cfg.experts_per_token / E) ** batch)
        experts += int(_nbytes(*packed) * distinct / E)
        experts += _module_bytes(b.mlp.router) + _nbytes(b.mlp.norm.weight)
    return {"attention": attn, "experts": experts, "unembedding": _module_bytes(net.unembedding)}


def macs_per_step(net, batch: int = 1) -> dict[str, int]:
    """Multiply-adds one decode step does per part: every weight of attention's projections and
    of the unembedding once per token, k experts per token (attention over the cache left out)."""
    cfg = net.config
    attn = sum(m.in_features * m.out_features for b in net.blocks
               for m in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.o_proj))
    expert = 3 * cfg.hidden_size * cfg.intermediate_size       # mlp1 (2I x C) and mlp2 (C x I)
    experts = cfg.num_hidden_layers * (cfg.experts_per_token * expert + cfg.num_experts * cfg.hidden_size)
    unembed = cfg.vocab_size * cfg.hidden_size
    return {"attention": attn * batch, "experts": experts * batch, "unembedding": unembed * batch}


def gemm_gmacs(repeats: int = 5) -> float:
    """The machine's bf16 matrix-product rate: oneDNN on a 1024 x 2880 x 2880 GEMM, best of runs."""
    a = torch.randn(1024, 2880, dtype=torch.bfloat16)
    b = torch.randn(2880, 2880, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return a.shape[0] * b.numel() / best / 1e9


def timed_parts(net) -> dict[str, float]:
    """Seconds spent in attention, the experts and the unembedding, summed into the returned
    dict by forward hooks on every later call."""
    totals: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}

    def timed(module: torch.nn.Module, part: str) -> None:
        module.register_forward_pre_hook(lambda *_: started.__setitem__(part, time.perf_counter()))
        module.register_forward_hook(
            lambda *_: totals.__setitem__(part, totals[part] + time.perf_counter() - started[part]))

    for b in net.blocks:
        timed(b.attn, "attention")
        timed(b.mlp, "experts")
    timed(net.unembedding, "unembedding")
    return totals


@torch.inference_mode()
def profile(net, steps: int, context: int, batch: int = 1) -> dict[str, float]:
    """Seconds per decode step in each part, timed by forward hooks."""
    totals = timed_parts(net)
    cache = net.make_cache()
    logits = prefill(net, random_prompts(batch, context), cache)
    logits = decode_step(net, logits.argmax(-1), torch.full((batch,), context), cache)   # warm-up
    totals.clear()
    t0 = time.perf_counter()
    for i in range(steps):
        logits = decode_step(net, logits.argmax(-1), torch.full((batch,), context + 1 + i), cache)
    totals["total"] = time.perf_counter() - t0
    return {part: seconds / steps for part, seconds in totals.items()}


@torch.inference_mode()
def profile_prefill(net, tokens: int) -> dict[str, float]:
    """Seconds one prefill of `tokens` tokens spends in each part, timed by forward hooks."""
    totals = timed_parts(net)
    prompt = random_prompts(1, tokens)
    prefill(net, prompt, net.make_cache())                                  # warm-up
    totals.clear()
    t0 = time.perf_counter()
    prefill(net, prompt, net.make_cache())
    totals["total"] = time.perf_counter() - t0
    return dict(totals)


def print_prefill(net, tokens: int) -> None:
    seconds = profile_prefill(net, tokens)
    per_token = macs_per_step(net)
    macs = {"attention": per_token["attention"] * tokens, "experts": per_token["experts"] * tokens,
            "unembedding": per_token["unembedding"]}                      # the last token's logits
    print(f"{'part':<12} {'s':>8} {'share':>6} {'GMAC':>8} {'GMAC/s':>7}")
    for part in ("attention", "experts", "unembedding"):
        print(f"{part:<12} {seconds[part]:8.3f} {seconds[part] / seconds['total']:6.1%} "
              f"{macs[part] / 1e9:8.2f} {macs[part] / seconds[part] / 1e9:7.1f}")
    other = seconds["total"] - sum(seconds[p] for p in macs)
    print(f"{'other':<12} {other:8.3f} {other / seconds['total']:6.1%}")
    total = sum(macs.values())
    print(f"{'total':<12} {seconds['total']:8.3f} {1:6.1%} {total / 1e9:8.2f} {total / seconds['total'] / 1e9:7.1f}"
          f"   ({tokens / seconds['total']:.1f} tok/s, {tokens}-token prompt, {torch.get_num_threads()} threads)")
    print(f"bf16 GEMM here: {gemm_gmacs():.1f} GMAC/s (oneDNN, 1024 x 2880 x 2880, "
          f"{torch.get_num_threads()} threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--pack-dense", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prefill", type=int, metavar="TOKENS")
    args = ap.parse_args()
    model_module.USE_KERNELS = not args.plain
    net = ossgpt.load(args.model, dtype=torch.bfloat16, pack_dense=args.pack_dense and not args.plain)
    if args.prefill:
        print_prefill(net, args.prefill)
        return
    sizes, macs = bytes_per_step(net, args.batch), macs_per_step(net, args.batch)
    seconds = profile(net, args.steps, args.context, args.batch)
    print(f"{'part':<12} {'ms/step':>9} {'MB read':>9} {'GB/s':>7} {'GMAC':>7} {'GMAC/s':>7}")
    for part in ("attention", "experts", "unembedding"):
        print(f"{part:<12} {seconds[part] * 1e3:9.2f} {sizes[part] / 1e6:9.1f} "
              f"{sizes[part] / seconds[part] / 1e9:7.1f} {macs[part] / 1e9:7.3f} "
              f"{macs[part] / seconds[part] / 1e9:7.1f}")
    other = seconds["total"] - sum(seconds[p] for p in sizes)
    total_bytes = sum(sizes.values())
    print(f"{'other':<12} {other * 1e3:9.2f}")
    total_macs = sum(macs.values())
    print(f"{'total':<12} {seconds['total'] * 1e3:9.2f} {total_bytes / 1e6:9.1f} "
          f"{total_bytes / seconds['total'] / 1e9:7.1f} {total_macs / 1e9:7.3f} "
          f"{total_macs / seconds['total'] / 1e9:7.1f}   ({args.batch / seconds['total']:.2f} tok/s, "
          f"batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {'plain' if args.plain else 'kernels'}"
          f"{', dense weights packed' if any(isinstance(m, PackedLinear) for m in net.modules()) else ''})")
    print(f"bf16 GEMM here: {gemm_gmacs():.1f} GMAC/s (oneDNN, 1024 x 2880 x 2880, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
