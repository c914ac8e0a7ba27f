"""Logits of every CPU kernel level this machine runs, on a random gpt-oss-20b-sized checkpoint,
against the plain PyTorch path and against transformers.

    python benchmarks/isa_logits.py --layers 4          # 20b dimensions, 4 layers, made once

A batch of unequal prompts (the longest past the 128-token sliding window, the shortest a
handful of tokens) is prefilled, then decoded a few steps on fixed tokens, by ossgpt at each
level (plain, avx2, avx512, avx512bf16 or neon: what this CPU can run):
- float32: the largest relative error of a row's logits against the plain path (target 1e-5);
- bf16 (dense weights packed, as the CLI loads them, and plain): the median over rows of the
  relative error against float32, beside transformers-bf16's own (each prompt on its own,
  teacher-forced through the same tokens) against the same float32 logits (target: within 1.5x).
Writes benchmarks/results/isa_logits_<name>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ossgpt import kernels, load  # noqa: E402
from ossgpt.generate import decode_step, prefill  # noqa: E402
from ossgpt.kernels import build  # noqa: E402

CACHE = Path(os.environ.get("OSSGPT_BENCH_CACHE", Path.home() / ".cache" / "ossgpt-bench"))
LENGTHS = (300, 160, 129, 37, 5)
STEPS = 4


def checkpoint(config: str, layers: int) -> Path:
    out = CACHE / "checkpoints" / f"{config}-L{layers}-hf"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "ossgpt", "make-random", "--output", str(out), "--config", config,
                        "--layers", str(layers), "--layout", "hf"], cwd=ROOT, check=True)
    return out


def inputs(vocab: int) -> tuple[list[list[int]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 199_998, (n,), generator=g).tolist() for n in LENGTHS]
    steps = torch.randint(0, 199_998, (STEPS, len(LENGTHS)), generator=g)   # fixed, not the argmax
    return prompts, steps


@torch.inference_mode()
def ossgpt_logits(net, prompts: list[list[int]], steps: torch.Tensor) -> torch.Tensor:
    """(B, STEPS + 1, V): the prefill's last logits, then each decode step's."""
    cache = net.make_cache()
    out = [prefill(net, prompts, cache)]
    positions = torch.tensor([len(p) for p in prompts], device=net.device)
    for i in range(len(steps)):
        out.append(decode_step(net, steps[i].to(net.device), positions + i, cache))
    return torch.stack(out, dim=1).float().cpu()


@torch.inference_mode()
def transformers_logits(directory: Path, prompts: list[list[int]], steps: torch.Tensor) -> torch.Tensor:
    from transformers import GptOssForCausalLM, Mxfp4Config
    model = GptOssForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True)).eval()
    rows = []
    for b, p in enumerate(prompts):
        ids = torch.tensor([p + steps[:, b].tolist()])
        logits = model(ids).logits[0].float()
        rows.append(logits[len(p) - 1:len(p) + len(steps)])
    del model
    return torch.stack(rows)


def transformers_error(directory: Path, prompts: list[list[int]], steps: torch.Tensor, truth: torch.Tensor,
                       earlier: Path | None = None) -> float:
    """transformers-bf16's median row error against `truth`, or the one an earlier results file
    of this checkpoint recorded."""
    if earlier is not None:
        recorded = json.loads(earlier.read_text())
        if recorded["checkpoint"] != str(directory) or tuple(recorded["lengths"]) != LENGTHS:
            raise SystemExit(f"{earlier}: another checkpoint or other prompts")
        return recorded["transformers_bf16_median_error"]
    hf = transformers_logits(directory, prompts, steps)
    err = row_errors(hf, truth).median().item()
    del hf
    gc.collect()
    return err


def row_errors(a: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (torch.linalg.vector_norm(a - truth, dim=-1, dtype=torch.float64)
            / torch.linalg.vector_norm(truth, dim=-1, dtype=torch.float64)).flatten()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="20b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--name", help="results file name part (default: CONFIG-LLAYERS)")
    p.add_argument("--transformers-from", type=Path, metavar="JSON",
                   help="take transformers-bf16's error from an earlier results file of the same checkpoint "
                        "(on a CPU without bf16 products its experts take hours)")
    p.add_argument("--levels", help="comma-separated levels to run (default: every one this CPU runs)")
    args = p.parse_args(argv)
    directory = checkpoint(args.config, args.layers)
    from ossgpt.config import ModelConfig
    prompts, steps = inputs(ModelConfig.from_file(directory / "config.json").vocab_size)
    levels = args.levels.split(",") if args.levels else build.supported_levels()
    print(f"{directory}: prompts of {', '.join(map(str, LENGTHS))} tokens, {STEPS} decode steps; "
          f"levels {', '.join(levels)}", flush=True)

    results: dict = {"checkpoint": str(directory), "lengths": LENGTHS, "steps": STEPS, "levels": {}}
    with kernels.use_isa(build.PLAIN):
        plain32 = ossgpt_logits(load(directory, device="cpu", dtype=torch.float32, progress=False), prompts, steps)
    gc.collect()
    hf_err = transformers_error(directory, prompts, steps, plain32, args.transformers_from)
    results["transformers_bf16_median_error"] = hf_err
    if args.transformers_from:
        results["transformers_from"] = str(args.transformers_from)
    print(f"transformers bf16 against float32: median row error {hf_err:.3e}"
          + (f" (from {args.transformers_from})" if args.transformers_from else ""), flush=True)
    print(f"{'level':<12}{'f32 max err':>14}{'bf16 packed':>14}{'bf16 plain':>14}{'packed/hf':>11}", flush=True)
    for level in levels:
        row = {}
        with kernels.use_isa(level):
            net = load(directory, device="cpu", dtype=torch.float32, progress=False)
            row["float32_max_error"] = row_errors(ossgpt_logits(net, prompts, steps), plain32).max().item()
            del net
            for packed in (True, False):
                net = load(directory, device="cpu", dtype=torch.bfloat16, progress=False, pack_dense=packed)
                err = row_errors(ossgpt_logits(net, prompts, steps), plain32).median().item()
                row["bf16_packed_median_error" if packed else "bf16_median_error"] = err
                del net
                gc.collect()
        row["bf16_packed_over_transformers"] = row["bf16_packed_median_error"] / hf_err
        results["levels"][level] = row
        print(f"{level:<12}{row['float32_max_error']:>14.2e}{row['bf16_packed_median_error']:>14.3e}"
              f"{row['bf16_median_error']:>14.3e}{row['bf16_packed_over_transformers']:>10.2f}x", flush=True)
    out = ROOT / "benchmarks" / "results" / f"isa_logits_{args.name or f'{args.config}-L{args.layers}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
