"""Training's attention, forward and backward, on the CPU: ossgpt's fused path (PyTorch's
differentiable scaled_dot_product_attention with the sink as an extra key,
`kernels.attention_with_grad`), its plain reference (`model.sdpa_with_sinks`) and transformers'
gpt-oss `eager_attention_forward` (what its training runs: the sinks need the eager path), all
float32 on the same inputs, measured in one run. Prints each one's median seconds, the ratios,
and how far each output and gradient lies from the plain path's; writes
benchmarks/results/training_attention.json.

    python benchmarks/training_attention.py [--rounds 5] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ossgpt import kernels, model
from ossgpt.files import write_atomic

SHAPES = {"nano": (4, 8, 2, 32), "20b": (1, 64, 8, 64)}     # sequences, heads, kv heads, head dim


def transformers_attention(q, k, v, sinks, mask, scale):
    """transformers' own function, called as its GptOssAttention calls it (B, H, T, D layout)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups = sinks, q.shape[2] // k.shape[2]
    bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]
    out, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     bias, scale)
    return out


ENGINES = {"ossgpt fused": kernels.attention_with_grad, "ossgpt plain": model.sdpa_with_sinks,
           "transformers eager": transformers_attention}


def run(fn, inputs, mask, scale, upstream):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves, mask, scale)
    (out * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape, (B, H, K, D) in SHAPES.items():
        T = args.tokens
        positions = torch.arange(T).expand(B, T)
        inputs = [torch.randn(B, T, n, D, generator=g) for n in (H, K, K)] + [torch.randn(H, generator=g)]
        upstream = torch.randn(B, T, H, D, generator=g)
        for window in (128, None):
            mask = model.attention_mask(positions, positions, window)
            reference = run(model.sdpa_with_sinks, inputs, mask, D**-0.5, upstream)
            row = {"shape": shape, "batch": B, "tokens": T, "heads": H, "kv_heads": K, "head_dim": D,
                   "window": window}
            for name, fn in ENGINES.items():
                got = run(fn, inputs, mask, D**-0.5, upstream)     # warm-up, and the check
                row[f"{name} max relative error"] = max(
                    ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, reference))
                times = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    run(fn, inputs, mask, D**-0.5, upstream)
                    times.append(time.perf_counter() - t0)
                row[f"{name} seconds"] = round(statistics.median(times), 4)
            for name in ("ossgpt plain", "transformers eager"):
                row[f"fused vs {name}"] = round(row[f"{name} seconds"] / row["ossgpt fused seconds"], 2)
            rows.append(row)
            print(f"{shape:>4} window {str(window):>4}: " + ", ".join(
                f"{name} {row[f'{name} seconds'] * 1e3:.0f} ms" for name in ENGINES)
                  + f"; fused {row['fused vs ossgpt plain']}x plain, "
                    f"{row['fused vs transformers eager']}x transformers", flush=True)
    out = Path(__file__).resolve().parent / "results" / "training_attention.json"
    write_atomic(out, json.dumps({"threads": torch.get_num_threads(), "rounds": args.rounds,
                                  "rows": rows}, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
