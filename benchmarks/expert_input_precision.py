"""What rounding the experts' inputs to integers does to a bf16 model's logits: 16-bit integers
(a scale per block of 32, |v| <= 32512: the x86 kernels' before), the 9-bit ones the x86 kernels
use now (|v| <= 255) and the 8-bit ones llama.cpp uses (|v| <= 127), on a random
gpt-oss-20b-sized checkpoint.

    python benchmarks/expert_input_precision.py --layers 4

The experts run on the plain path in float32 with their inputs (mlp1's and mlp2's) rounded per
block of 32 as a kernel would, the rest of the model in bf16; prompts and decode steps as in
isa_logits.py. Prints the median relative error of a row's logits against float32, and its ratio
to transformers-bf16's own (the project's bf16 band is 1.5x). Why it exists: fewer bits halve
the multiplies of the AVX2 expert products (kernels/cpu/mxfp4_bytes.h); this is what they cost in
accuracy.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import isa_logits  # noqa: E402
from ossgpt import kernels, load, model  # noqa: E402
from ossgpt.kernels import build  # noqa: E402


def rounded(x: torch.Tensor, top: int) -> torch.Tensor:
    """x (..., K) in float32, each block of 32 rounded to integers in [-top, top] times its scale."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30) / top
    return (torch.round(blocks / scale).clamp(-top, top) * scale).reshape(x.shape)


def experts_with_integer_inputs(top: int):
    """A MoE.grouped replacement: float32 experts whose inputs are rounded to [-top, top]."""
    def grouped(self: model.MoE, t: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(t.shape, dtype=torch.float32)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)
            w1, w2 = self.experts.weights(e, torch.float32)
            h = model.swiglu(F.linear(rounded(t[token], top), w1, self.experts.mlp1_bias[e].float()), self.limit)
            y = F.linear(rounded(h, top), w2, self.experts.mlp2_bias[e].float())
            out.index_add_(0, token, y * gates[token, slot, None])
        return out
    return grouped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="20b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--transformers-from", type=Path, metavar="JSON",
                   help="transformers-bf16's error from an isa_logits.py results file of the same checkpoint")
    args = p.parse_args(argv)
    directory = isa_logits.checkpoint(args.config, args.layers)
    prompts, steps = isa_logits.inputs(0)
    with kernels.use_isa(build.PLAIN):
        truth = isa_logits.ossgpt_logits(load(directory, device="cpu", dtype=torch.float32, progress=False),
                                         prompts, steps)
        hf = isa_logits.transformers_error(directory, prompts, steps, truth, args.transformers_from)
        print(f"{directory}\ntransformers bf16: median row error {hf:.3e}")
        plain = model.MoE.grouped
        for name, top in (("bf16 inputs (plain)", None), ("16-bit integers", 32512),
                          ("9-bit integers", 255), ("8-bit integers", 127)):
            model.MoE.grouped = plain if top is None else experts_with_integer_inputs(top)
            net = load(directory, device="cpu", dtype=torch.bfloat16, progress=False, pack_dense=False)
            err = isa_logits.row_errors(isa_logits.ossgpt_logits(net, prompts, steps), truth).median().item()
            print(f"experts' inputs as {name:<20} median row error {err:.3e}  {err / hf:.2f}x transformers")
            del net
            gc.collect()
        model.MoE.grouped = plain


if __name__ == "__main__":
    main()
