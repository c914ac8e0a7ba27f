"""Batch-1 decode with the dense weights packed (ossgpt/packed_bf16.py) against plain bf16, in
one process, alternating short bursts of steps on the same model and cache.

This machine's memory bandwidth drifts between about 30 and 55 GB/s within minutes, which
moves separate runs' figures by ±25%; bursts a second apart see the same bandwidth, so their
ratio is the packing's own effect.

    python benchmarks/packed_ab.py --model DIR [--bursts 12] [--steps 8] [--context 128]

The model loads packed; plain nn.Linear copies of the packed weights (unpacked, bit for bit the
checkpoint's) are swapped in for the "bf16" bursts, so both forms share the experts and cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ossgpt
from ossgpt.bench import random_prompts
from ossgpt.generate import decode_step, prefill
from ossgpt.model import Linear
from ossgpt.packed_bf16 import PackedLinear


def _plain_copy(p: PackedLinear) -> Linear:
    lin = Linear(p.in_features, p.out_features, bias=p.bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(p.weight, requires_grad=False)
    if p.bias is not None:
        lin.bias = p.bias
    return lin


def _swap(net: torch.nn.Module, forms: dict[str, dict[str, torch.nn.Module]], which: str) -> None:
    for name, modules in forms.items():
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, modules[which])


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bursts", type=int, default=12, help="bursts of each form, alternating")
    ap.add_argument("--steps", type=int, default=8, help="decode steps a burst")
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()
    net = ossgpt.load(args.model, dtype=torch.bfloat16, pack_dense=True)
    forms = {name: {"packed": m, "bf16": _plain_copy(m)} for name, m in net.named_modules()
             if isinstance(m, PackedLinear)}
    if not forms:
        raise SystemExit("nothing was packed (no CPU kernels, or not a bf16 model)")
    cache = net.make_cache()
    logits = prefill(net, random_prompts(1, args.context), cache)
    position = args.context
    rates: dict[str, list[float]] = {"packed": [], "bf16": []}
    for burst in range(2 * args.bursts + 2):
        which = ("packed", "bf16")[burst % 2]
        _swap(net, forms, which)
        logits = decode_step(net, logits.argmax(-1), torch.tensor([position]), cache)   # warm-up
        position += 1
        t0 = time.perf_counter()
        for _ in range(args.steps):
            logits = decode_step(net, logits.argmax(-1), torch.tensor([position]), cache)
            position += 1
        if burst >= 2:                                   # the first pair warms both forms up
            rates[which].append(args.steps / (time.perf_counter() - t0))
    ratios = [p / b for p, b in zip(rates["packed"], rates["bf16"])]
    for which, r in rates.items():
        print(f"{which:>7}: " + " ".join(f"{x:5.2f}" for x in r) + f"   median {statistics.median(r):.2f} tok/s")
    print("packed / bf16, burst by burst: " + " ".join(f"{x:.2f}" for x in ratios)
          + f"   median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
