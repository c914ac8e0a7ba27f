"""Everything this project checks on a GPU, as one script for the rare, short loan of one: needs
only the repository, a CUDA torch and transformers (no download: the checkpoints are random).

    python benchmarks/gpu_check.py                 # on a GPU machine: a few minutes
    python benchmarks/gpu_check.py --device cpu    # a dry run of the same steps, here

1. logits: a random 20b-dimension checkpoint (4 layers), a batch of unequal prompts past the
   sliding window then decode steps (isa_logits.py's), on the GPU against the CPU's plain float32
   path: float32 (TF32 off) within 1e-5; bf16 within 1.5x transformers-bf16's own error (on the
   same GPU); the same with the experts in CPU memory (--experts-device cpu).
2. speed (--speed): `ossgpt bench` on 24 layers, on the GPU and with the experts in CPU memory,
   then compare_engines.py against transformers on the same GPU.
3. with 2 or more GPUs: `torchrun --nproc-per-node 2 -m ossgpt generate` (NCCL) prints the
   single process's greedy text.
Writes benchmarks/results/gpu_check_<device name>.json as it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from isa_logits import checkpoint, inputs, ossgpt_logits, row_errors  # noqa: E402

from ossgpt import kernels, load  # noqa: E402
from ossgpt.kernels import build  # noqa: E402


@torch.inference_mode()
def transformers_logits(directory: Path, prompts, steps, device: str) -> torch.Tensor:
    """transformers bf16 on `device`, each prompt alone, teacher-forced through the steps."""
    from transformers import GptOssForCausalLM, Mxfp4Config
    model = GptOssForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True)).to(device).eval()
    rows = []
    for b, p in enumerate(prompts):
        logits = model(torch.tensor([p + steps[:, b].tolist()], device=device)).logits[0].float().cpu()
        rows.append(logits[len(p) - 1:len(p) + len(steps)])
    del model
    return torch.stack(rows)


def logits_checks(device: str, layers: int, results: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    directory = checkpoint("20b", layers)
    prompts, steps = inputs(0)
    with kernels.use_isa(build.PLAIN):
        truth = ossgpt_logits(load(directory, device="cpu", dtype=torch.float32, progress=False), prompts, steps)
    gc.collect()

    def run(dtype: torch.dtype, **options) -> torch.Tensor:
        net = load(directory, device=device, dtype=dtype, progress=False, **options)
        out = ossgpt_logits(net, prompts, steps)
        del net
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return out

    band = row_errors(transformers_logits(directory, prompts, steps, device), truth).median().item()
    rows = {"float32_max_error": row_errors(run(torch.float32), truth).max().item(),
            "transformers_bf16_median_error": band,
            "bf16_median_error": row_errors(run(torch.bfloat16), truth).median().item(),
            "bf16_experts_on_cpu_median_error": row_errors(run(torch.bfloat16, experts_device="cpu"),
                                                           truth).median().item(),
            "float32_experts_on_cpu_max_error": row_errors(run(torch.float32, experts_device="cpu"),
                                                           truth).max().item()}
    rows["bf16_over_transformers"] = rows["bf16_median_error"] / band
    rows["bf16_experts_on_cpu_over_transformers"] = rows["bf16_experts_on_cpu_median_error"] / band
    results["logits"] = rows
    for k, v in rows.items():
        print(f"  {k:<40}{v:.3e}", flush=True)


def command(args: list[str], timeout: int = 900) -> str:
    print("$", " ".join(args), flush=True)
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(r.stdout[-4000:], r.stderr[-2000:] if r.returncode else "", flush=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(args)}")
    return r.stdout


def speed_checks(device: str, layers: int, results: dict) -> None:
    directory = checkpoint("20b", layers)
    bench = [sys.executable, "-m", "ossgpt", "bench", "--model", str(directory), "--device", device,
             "--batch", "1,8", "--prompt-tokens", "512"]
    results["bench"] = command(bench)
    results["bench_experts_on_cpu"] = command(bench + ["--experts-device", "cpu"])
    results["compare_engines"] = command([sys.executable, "benchmarks/compare_engines.py", "--checkpoint",
                                          str(directory), "--device", device, "--engines",
                                          "ossgpt,transformers", "--repeat", "2", "--name", f"L{layers}"],
                                         timeout=1800)


def multi_gpu_checks(results: dict) -> None:
    args = ["-m", "ossgpt", "generate", "--model", "nano", "--prompt", "What is 12 + 30?",
            "--temperature", "0", "--max-tokens", "40", "--device", "cuda"]
    one = command([sys.executable, *args])
    two = command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args])
    results["torchrun_generate_same_text"] = one == two
    print(f"  torchrun (NCCL, 2 GPUs) prints the single process's text: {one == two}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--layers", type=int, default=4, help="layers of the logits checkpoint")
    p.add_argument("--speed", action="store_true", help="also the 24-layer speed checks")
    p.add_argument("--speed-layers", type=int, default=24)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (run with --device cpu for a dry run)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu-dry-run"
    results: dict = {"device": name, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M")}
    out = ROOT / "benchmarks" / "results" / f"gpu_check_{re.sub(r'[^A-Za-z0-9]+', '-', name)}.json"
    steps = [("logits", lambda: logits_checks(args.device, args.layers, results))]
    if args.speed:
        steps.append(("speed", lambda: speed_checks(args.device, args.speed_layers, results)))
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        steps.append(("2 GPUs", lambda: multi_gpu_checks(results)))
    for title, step in steps:
        print(f"== {title}", flush=True)
        t0 = time.time()
        step()
        results[f"{title}_seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(results, indent=2) + "\n")      # kept if a later step dies
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
