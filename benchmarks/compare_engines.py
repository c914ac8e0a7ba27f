"""Compare ossgpt with transformers and llama.cpp on one checkpoint, on this machine (CPU or GPU).

    python benchmarks/compare_engines.py --config 20b --layers 4          # random 4-layer 20b
    python benchmarks/compare_engines.py --checkpoint DIR --engines ossgpt,llama.cpp
    python benchmarks/compare_engines.py --config 20b --layers 24 --device cuda --engines ossgpt,transformers

Every engine runs in its own subprocess (so peak RSS is per engine and memory is freed in
between) on the same token ids: a random prompt of --prompt-tokens for load time, prefill
tokens/s and time to first token, then --decode-steps greedy steps after 128-token prompts (or
--prompt-tokens, if fewer) per batch size of --batches (default 1 and 8), as `ossgpt bench`
(ossgpt/bench.py) does, which the ossgpt row uses as it is.

- ossgpt holds the dense weights in its lossless 12-bit packed form (ossgpt/packed_bf16.py), as
  its CLI does; the optional engine `ossgpt-bf16` measures it with them plain bf16.
- transformers: GptOssForCausalLM in bf16 with the MXFP4 experts dequantized at load (what it
  does on CPU anyway), run only when its bf16 size fits in the available memory.
- llama.cpp: the PyPI package llama-cpp-python, built from source on this machine:
      CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install llama-cpp-python
  The checkpoint is converted to GGUF (experts kept MXFP4, the rest bf16) with
  convert_hf_to_gguf.py from the sdist of the installed version, which this script fetches with
  `pip download` into the cache folder ($OSSGPT_BENCH_CACHE, default ~/.cache/ossgpt-bench).
  Weights are read into memory (use_mmap=False) so its load time counts as the others' do.

The engines run in --repeat rounds (default 3), each engine once per round in turn, and the
figures are the medians over rounds: this machine's memory bandwidth drifts over minutes, and
a single run of each can compare one engine's fast moment with another's slow one. Each
engine's best round of decode is given too (`best_decode_tok_s`, ratios `decode_b1_best`): the
least disturbed, as timeit's minimum, when the medians still pair unequal phases; and the median
of the rounds' own ratios (`decode_b1_rounds_median`), each pairing the engines minutes apart.
Where an engine's batch-1 decode moved by more than 10% between rounds, a warning says so
(and the results' "drift"): such a run is repeated rather than reported.

Where it may (root), the script empties the kernel's page cache before every engine's run, so
each starts as after a reboot (its checkpoint read from disk) and none inherits memory that the
previous one's cached files left fragmented: that cost ossgpt huge pages for a fifth of its
weights (ossgpt/checkpoint/hugepages.py) and decode speed with them. The JSON records whether
it did (cold_page_cache), and ossgpt's huge_pages_gib how much of its weights got huge pages.

Decode is memory-bound: the table also gives batch-1 decode as a fraction of the limit set by
this machine's read bandwidth (a torch sum over 1 GiB, best of 5, measured every round) and the bytes each decoded
token must read (decode_bytes_per_token). Results go to benchmarks/results/compare_<name>.json.

With --isa LEVEL every engine runs as on a CPU whose best instruction set is LEVEL (avx2 or
avx512), to compare on a machine that has more: ossgpt's kernels at that level (OSSGPT_ISA),
PyTorch's own kernels and oneDNN's capped to it (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA: the
prefill products of ossgpt and all of transformers), and llama.cpp from a build for it, given
with --llama-cpp-path (a `pip install --target` of llama-cpp-python; docs/benchmarks.md).
Memory and caches stay this machine's. The results file ends in -LEVEL.

With --device cuda every engine runs on the GPU: ossgpt with its experts dense where they fit
(`experts` in its result), transformers with them dequantized (bf16), llama.cpp with every layer
offloaded if llama-cpp-python was built with CUDA (CMAKE_ARGS="-DGGML_CUDA=on"); the bandwidth
is the GPU's (a sum over 4 GiB), peak memory the GPU's (peak_gpu_gib), and the results file
ends in -cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if TYPE_CHECKING:     # importing ossgpt imports torch: the llama.cpp worker stays without it
    from ossgpt.config import ModelConfig

CACHE = Path(os.environ.get("OSSGPT_BENCH_CACHE", Path.home() / ".cache" / "ossgpt-bench"))
ENGINES = ("ossgpt", "transformers", "llama.cpp")
OPTIONAL_ENGINES = ("ossgpt-bf16",)
DECODE_CONTEXT = 128
RESULT_TAG = "@@result "
LLAMA_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install llama-cpp-python'
# What caps PyTorch (its vectorized kernels) and oneDNN (its matmuls) to an instruction set.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
           "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
           "avx512bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}}


# -- checkpoint, GGUF, bandwidth (parent process) -------------------------------------------------

def prepare_checkpoint(args: argparse.Namespace) -> Path:
    """The HF layout checkpoint to compare on: --checkpoint, or a random one made once."""
    if args.checkpoint:
        return Path(args.checkpoint).resolve()
    out = CACHE / "checkpoints" / f"{args.config}-L{args.layers}-hf"
    if not (out / "config.json").is_file():           # config.json is written last
        print(f"writing a random {args.config} checkpoint with {args.layers} layers to {out}", flush=True)
        subprocess.run([sys.executable, "-m", "ossgpt", "make-random", "--output", str(out), "--config",
                        args.config, "--layers", str(args.layers), "--layout", "hf"], cwd=ROOT, check=True)
    return out


def converter_script(version: str) -> Path:
    """convert_hf_to_gguf.py of llama-cpp-python `version`'s llama.cpp, fetched once from PyPI."""
    top = CACHE / f"llama_cpp_python-{version}"
    script = top / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        sdist = CACHE / "sdist" / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={version}", "-d", str(sdist.parent)], check=True)
        keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                "vendor/llama.cpp/gguf-py/")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.partition("/")[2].startswith(keep)]
            tar.extractall(CACHE, members=members, filter="data")
    return script


def convert_to_gguf(checkpoint: Path) -> Path:
    """A cached GGUF of `checkpoint`: MXFP4 experts as they are, everything else bf16."""
    import llama_cpp   # the converter must match the llama.cpp that will read the file

    stamp = int((checkpoint / "config.json").stat().st_mtime)
    out = CACHE / "gguf" / f"{checkpoint.name}-{stamp}-llama.cpp-{llama_cpp.__version__}-bf16.gguf"
    if out.is_file():
        return out
    source = checkpoint
    if not (checkpoint / "tokenizer.json").is_file():  # made before make-random wrote one
        from ossgpt.checkpoint.hf_tokenizer import write_hf_tokenizer
        source = CACHE / "gguf" / f"{checkpoint.name}-with-tokenizer"
        source.mkdir(parents=True, exist_ok=True)
        for f in checkpoint.iterdir():
            if not (source / f.name).exists():
                (source / f.name).symlink_to(f)
        write_hf_tokenizer(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    print(f"converting {checkpoint} to GGUF", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(converter_script(llama_cpp.__version__)), str(source),
                           "--outtype", "bf16", "--outfile", str(tmp)], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, "convert_hf_to_gguf.py")
    os.replace(tmp, out)
    print(f"  {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def memory_bandwidth_gbs(threads: int, device: str = "cpu", repeats: int = 5) -> float:
    """Read bandwidth with all threads (or of the GPU): best time of a float32 sum over 1 GiB
    (4 GiB on a GPU, where 1 GiB takes a fraction of a millisecond), in GB/s."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28 if device == "cpu" else 2**30, device=device)
    best = float("inf")
    for _ in range(repeats + 1):          # the first pass also touches the pages
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def decode_bytes_per_token(c: ModelConfig, expert_bytes_per_weight: float, context: int,
                           dense_bytes_per_weight: float = 2.0) -> float:
    """Bytes one batch-1 decode step must read: every layer's attention (weights at
    `dense_bytes_per_weight`, bf16 biases, sinks), KV cache, router, norms and its top-k experts
    (weights at `expert_bytes_per_weight`, bf16 biases), then the final norm and the
    unembedding; plus one embedding row."""
    C, I, D, k = c.hidden_size, c.intermediate_size, c.head_dim, c.experts_per_token
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    dense = dense_bytes_per_weight
    attention = dense * (C * q + 2 * C * kv + q * C) + 2 * (q + 2 * kv + C + c.num_attention_heads)
    router = dense * c.num_experts * C + 2 * c.num_experts
    experts = k * (3 * I * C * expert_bytes_per_weight + 2 * (2 * I + C))
    norms = 2 * 2 * C
    total = 0.0
    for kind in c.layer_types:
        cached = min(context, c.sliding_window) if kind == "sliding_attention" else context
        total += attention + router + experts + norms + 2 * 2 * kv * cached
    return total + 2 * C + dense * c.vocab_size * C + 2 * C


def bf16_model_bytes(c: ModelConfig) -> int:
    """Size of the whole model with bf16 (dequantized) experts."""
    C, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    layer = (2 * C * q + 2 * C * kv + q + 2 * kv + C + c.num_attention_heads + 2 * C
             + c.num_experts * (C + 1 + 3 * I * C + 2 * I + C))
    return 2 * (c.num_hidden_layers * layer + 2 * c.vocab_size * C + C)


# -- the engines (each in its own worker process) ------------------------------------------------

def bench_ossgpt(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ossgpt import bench

    torch.set_num_threads(job["threads"])
    r = bench.run(job["checkpoint"], len(job["prompt"]), job["decode_steps"], tuple(job["batches"]),
                  device=job["device"], dtype=torch.bfloat16, seed=job["seed"],
                  pack_dense=job.get("pack_dense", True))
    return r.to_dict()


def bench_ossgpt_bf16(job: dict[str, Any]) -> dict[str, Any]:
    return bench_ossgpt({**job, "pack_dense": False})


def bench_transformers(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    from ossgpt.config import ModelConfig

    device = job["device"]
    need = bf16_model_bytes(ModelConfig.from_file(Path(job["checkpoint"]) / "config.json")) + 2**30
    if device == "cpu":
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:      # MemAvailable counts reclaimable page cache too
            available = max(available, next(int(line.split()[1]) * 1024 for line in f
                                            if line.startswith("MemAvailable")))
    else:
        available = torch.cuda.mem_get_info(device)[0]
    if need > 0.9 * available:
        return {"skipped": f"bf16 model needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.bfloat16, device_map=device,
                                              quantization_config=Mxfp4Config(dequantize=True))
    load_s = time.perf_counter() - t0
    model.eval()

    @torch.inference_mode()
    def forward(ids: list[list[int]], cache: Any = None) -> Any:
        return model(torch.tensor(ids, device=device), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)

    forward([job["prompt"][:16]])                                     # warm-up
    t0 = time.perf_counter()
    out = forward([job["prompt"]])
    prefill_s = time.perf_counter() - t0
    out.logits[:, -1].argmax(-1)
    ttft = time.perf_counter() - t0
    decode = {}
    for b in job["batches"]:
        out = forward(job["decode_prompts"][str(b)])
        out = forward(out.logits[:, -1].argmax(-1, keepdim=True).tolist(), out.past_key_values)  # warm-up
        t0 = time.perf_counter()
        for _ in range(job["decode_steps"]):
            out = forward(out.logits[:, -1].argmax(-1, keepdim=True).tolist(), out.past_key_values)
        decode[str(b)] = round(b * job["decode_steps"] / (time.perf_counter() - t0), 2)
    gpu = {"peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)} if device != "cpu" else {}
    return {"load_s": round(load_s, 3), "prefill_tok_s": round(len(job["prompt"]) / prefill_s, 2),
            "ttft_s": round(ttft, 4), "decode_tok_s": decode, "dtype": "bfloat16 (experts dequantized)",
            "experts": "dense", "threads": torch.get_num_threads(), **gpu}


def bench_llama_cpp(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    threads, steps = job["threads"], job["decode_steps"]
    n_ctx = -(-(max(len(job["prompt"]), DECODE_CONTEXT) + steps + 2) // 256) * 256
    gpu_layers = 0
    if job["device"] != "cpu":
        if not llama_cpp.llama_supports_gpu_offload():
            return {"skipped": 'llama-cpp-python was built without CUDA: CMAKE_ARGS="-DGGML_CUDA=on" '
                               "pip install --force-reinstall --no-cache-dir llama-cpp-python"}
        gpu_layers = -1
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(job["gguf"], n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=512, n_ubatch=512, flash_attn=True, use_mmap=False, verbose=False,
                          n_gpu_layers=gpu_layers)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    llm.eval(job["prompt"][:16])                                       # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(job["prompt"])
    prefill_s = time.perf_counter() - t0
    next_token()
    ttft = time.perf_counter() - t0
    llm.reset()
    llm.eval(job["decode_prompts"]["1"][0])
    llm.eval([next_token()])                                           # warm-up step
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([next_token()])
    decode_s = time.perf_counter() - t0
    return {"load_s": round(load_s, 3), "prefill_tok_s": round(len(job["prompt"]) / prefill_s, 2),
            "ttft_s": round(ttft, 4), "decode_tok_s": {"1": round(steps / decode_s, 2)}, "version": llama_cpp.__version__,
            "dtype": "MXFP4 experts, bf16 rest (GGUF)", "threads": threads,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "note": "batch > 1 not measured: llama_cpp.Llama decodes one sequence"}


WORKERS = {"ossgpt": bench_ossgpt, "ossgpt-bf16": bench_ossgpt_bf16, "transformers": bench_transformers,
           "llama.cpp": bench_llama_cpp}
def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so a
    worker would report at least its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


# bytes per weight read by decode: experts (MXFP4, unless an engine holds them dense), then the
# dense products (12-bit packed: 1.5 and a per-row base and index, which this leaves out)
MXFP4_BYTES = 17 / 32
DENSE_BYTES = {"ossgpt": 1.5, "ossgpt-bf16": 2.0, "transformers": 2.0, "llama.cpp": 2.0}


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (clean pages only; root only): whether it could."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def run_worker(engine: str, job: dict[str, Any], cold: bool = False) -> dict[str, Any]:
    """Run one engine in a fresh Python process (`cold`: after emptying the page cache); its
    last stdout line is the result."""
    emptied = cold and drop_page_cache()
    print(f"[{engine}] running{' (page cache emptied)' if emptied else ''}", flush=True)
    env = dict(os.environ)
    if job.get("isa"):
        env.update(OSSGPT_ISA=job["isa"], **ISA_ENV.get(job["isa"], {}))
    if engine == "llama.cpp" and job.get("llama_cpp_path"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [job["llama_cpp_path"], env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", engine], input=json.dumps(job),
                          capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"[{engine}] failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"skipped": f"failed (exit {proc.returncode}): {tail.splitlines()[-1] if tail else ''}"}
    return json.loads(lines[-1][len(RESULT_TAG):])


# -- report --------------------------------------------------------------------------------------

def print_table(results: dict[str, dict[str, Any]]) -> None:
    gpu = any(r.get("peak_gpu_gib") for r in results.values())
    head = f"{'engine':<13}{'load s':>8}{'prefill tok/s':>15}{'TTFT s':>9}{'decode b1':>11}" \
           f"{'decode b8':>11}{'peak RSS GiB':>14}{'b1 % of BW limit':>18}{'  peak GPU GiB' if gpu else ''}"
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<13}skipped: {r['skipped']}")
            continue
        d = r["decode_tok_s"]
        cell = lambda b: f"{d[b]:>11.2f}" if b in d else f"{'n/a':>11}"  # noqa: E731
        print(f"{name:<13}{r['load_s']:>8.2f}{r['prefill_tok_s']:>15.1f}{r['ttft_s']:>9.3f}{cell('1')}"
              f"{cell('8')}{r['peak_rss_gib']:>14.2f}{100 * r.get('b1_fraction_of_bw_limit', 0):>17.1f}%"
              + (f"{r.get('peak_gpu_gib', float('nan')):>14.2f}" if gpu else ""))


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ossgpt / other for each figure (speeds: > 1 means ossgpt is faster; times: < 1)."""
    ours, out = results.get("ossgpt", {}), {}
    for name, r in results.items():
        if name == "ossgpt" or "skipped" in r or "skipped" in ours or not ours:
            continue
        rr = {k: ours[k] / r[k] for k in ("load_s", "prefill_tok_s", "ttft_s")}
        rr.update({f"decode_b{b}": ours["decode_tok_s"][b] / v for b, v in r["decode_tok_s"].items()
                   if b in ours["decode_tok_s"]})
        if "best_decode_tok_s" in ours and "best_decode_tok_s" in r:
            rr.update({f"decode_b{b}_best": ours["best_decode_tok_s"][b] / v
                       for b, v in r["best_decode_tok_s"].items() if b in ours["best_decode_tok_s"]})
        # Each round's ratio pairs the two engines minutes apart, the likeliest to be one phase of
        # the machine's drift; their median is the check on the ratio of medians.
        if len(ours.get("runs", [])) == len(r.get("runs", [])) > 1:
            rr.update({f"decode_b{b}_rounds_median": statistics.median(
                a["decode_tok_s"][b] / o["decode_tok_s"][b] for a, o in zip(ours["runs"], r["runs"]))
                for b in r["decode_tok_s"] if b in ours["decode_tok_s"]})
        out[f"ossgpt/{name}"] = {k: round(v, 3) for k, v in rr.items()}
    return out


def drift(results: dict[str, dict[str, Any]], limit: float = 0.1) -> list[str]:
    """A line for each engine whose batch-1 decode moved by more than `limit` between rounds: the
    machine's speed changed during the run, and a ratio of medians may pair unequal phases."""
    lines = []
    for name, r in results.items():
        speeds = [run["decode_tok_s"]["1"] for run in r.get("runs", []) if "1" in run["decode_tok_s"]]
        if len(speeds) > 1 and max(speeds) > (1 + limit) * min(speeds):
            lines.append(f"warning: {name}'s decode b1 moved {min(speeds):.2f}-{max(speeds):.2f} tok/s between "
                         f"rounds ({max(speeds) / min(speeds) - 1:.0%}): this machine's speed changed during "
                         "the run; compare the rounds' ratios, or run again")
    return lines


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's rounds -> its figures as medians (peak RSS: the largest; decode also its best
    round), with every round kept under "runs"."""
    out = dict(runs[-1])
    for key in ("load_s", "prefill_tok_s", "ttft_s", "bw_limit_tok_s", "b1_fraction_of_bw_limit"):
        out[key] = round(statistics.median(r[key] for r in runs), 4)
    out["decode_tok_s"] = {b: round(statistics.median(r["decode_tok_s"][b] for r in runs), 2)
                           for b in runs[0]["decode_tok_s"]}
    # The best round: the one least slowed by the bandwidth's drift (what other engines share the
    # memory bus with), as timeit's minimum; medians can pair one engine's fast phase with
    # another's slow one.
    out["best_decode_tok_s"] = {b: max(r["decode_tok_s"][b] for r in runs) for b in runs[0]["decode_tok_s"]}
    # batch 8 over batch 1 within each round (seconds apart, one bandwidth phase), then the median:
    # batch 1 is bound by the bandwidth and batch 8 largely by arithmetic, so a ratio of medians
    # from different rounds would mostly measure the drift
    if {"1", "8"} <= set(runs[0]["decode_tok_s"]):
        out["b8_over_b1"] = round(statistics.median(r["decode_tok_s"]["8"] / r["decode_tok_s"]["1"]
                                                    for r in runs), 3)
    out["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    if "peak_gpu_gib" in runs[0]:
        out["peak_gpu_gib"] = max(r["peak_gpu_gib"] for r in runs)
    if "huge_pages_gib" in runs[0]:
        out["huge_pages_gib"] = min(r["huge_pages_gib"] for r in runs)
    out["runs"] = [{k: r[k] for k in ("load_s", "prefill_tok_s", "ttft_s", "decode_tok_s", "peak_rss_gib",
                                      "b1_fraction_of_bw_limit", "huge_pages_gib") if k in r} for r in runs]
    return out


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")


def gpu_name(device: str) -> str | None:
    if device == "cpu":
        return None
    import torch
    return torch.cuda.get_device_name(device)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an HF layout checkpoint (default: a random --config/--layers one)")
    p.add_argument("--config", default="20b", help="20b, 120b or tiny, for the random checkpoint")
    p.add_argument("--layers", type=int, default=4, help="layers of the random checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated (e.g. 1 alone "
                   "for an engine whose batch-8 prompts would take most of an hour)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated: " + ", ".join(ENGINES + OPTIONAL_ENGINES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every engine runs")
    p.add_argument("--repeat", type=int, default=3, help="rounds of every engine; figures are medians")
    p.add_argument("--name", help="results file name part (default: the checkpoint folder's name)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--isa", choices=sorted(ISA_ENV), help="run every engine as on a CPU with at most this instruction set")
    p.add_argument("--llama-cpp-path", help="a `pip install --target` folder of llama-cpp-python to use (e.g. built for --isa)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(sys.stdin.read()))
        if "skipped" not in result:
            result["peak_rss_gib"] = round(peak_rss_gib(), 3)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(ENGINES + OPTIONAL_ENGINES):
        p.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES + OPTIONAL_ENGINES)}")

    from ossgpt.bench import random_prompts
    from ossgpt.config import ModelConfig

    if args.llama_cpp_path:
        args.llama_cpp_path = str(Path(args.llama_cpp_path).expanduser().resolve())
        sys.path.insert(0, args.llama_cpp_path)       # the converter must match this llama.cpp too
    checkpoint = prepare_checkpoint(args)
    config = ModelConfig.from_file(checkpoint / "config.json")
    load_avg = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    job = {"checkpoint": str(checkpoint), "threads": args.threads, "seed": 0, "batches": batches,
           "device": args.device, "isa": args.isa, "llama_cpp_path": args.llama_cpp_path,
           "decode_steps": args.decode_steps, "prompt": random_prompts(1, args.prompt_tokens, 0)[0],
           "decode_prompts": {str(b): random_prompts(b, min(args.prompt_tokens, DECODE_CONTEXT), 0)
                              for b in batches}}
    results: dict[str, dict[str, Any]] = {}
    if "llama.cpp" in engines:
        try:
            job["gguf"] = str(convert_to_gguf(checkpoint))
        except ImportError as e:   # the package, or one of its dependencies (--target installs lack them)
            missing = "llama-cpp-python is not installed" if e.name == "llama_cpp" else f"llama_cpp: {e}"
            results["llama.cpp"] = {"skipped": f"{missing}: {LLAMA_INSTALL}"}
        except subprocess.CalledProcessError as e:
            results["llama.cpp"] = {"skipped": f"GGUF conversion failed: {e}"}
        if "skipped" in results.get("llama.cpp", {}):
            print(f"[llama.cpp] skipped: {results['llama.cpp']['skipped']}", flush=True)
    # Rounds of every engine in turn: this machine's memory bandwidth drifts over minutes, so
    # one run each can compare a fast moment with a slow one; the medians of rounds do not.
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines if e not in results}
    bandwidths, cold = [], drop_page_cache()
    for round_ in range(args.repeat):
        bandwidth = memory_bandwidth_gbs(args.threads, args.device)
        where = args.device if args.device != "cpu" else f"{args.threads} threads"
        bandwidths.append(bandwidth)
        print(f"round {round_ + 1}/{args.repeat}: memory read bandwidth {bandwidth:.1f} GB/s "
              f"({where}); load average {os.getloadavg()[0]:.2f}", flush=True)
        for engine in [e for e in runs if e not in results]:
            r = run_worker(engine, job, cold)
            if "skipped" in r:
                results[engine] = r
                print(f"[{engine}] skipped: {r['skipped']}", flush=True)
                continue
            per_token = decode_bytes_per_token(config, 2.0 if r.get("experts") == "dense" else MXFP4_BYTES,
                                               min(args.prompt_tokens, DECODE_CONTEXT),
                                               DENSE_BYTES[engine] if r.get("packed_dense", True) else 2.0)
            r["decode_bytes_per_token"] = round(per_token)
            r["bw_limit_tok_s"] = round(bandwidth * 1e9 / per_token, 2)
            r["b1_fraction_of_bw_limit"] = round(r["decode_tok_s"]["1"] / r["bw_limit_tok_s"], 4)
            runs[engine].append(r)
            print(f"[{engine}] {json.dumps(r)}", flush=True)
    for engine, rs in runs.items():
        if engine not in results:
            results[engine] = median_of_runs(rs)
    bandwidth = statistics.median(bandwidths)

    print(f"\n{checkpoint.name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_experts} experts; prompt {args.prompt_tokens} tokens, {args.decode_steps} decode "
          f"steps after {min(args.prompt_tokens, DECODE_CONTEXT)}-token prompts; {args.threads} threads; "
          f"bandwidth {bandwidth:.1f} GB/s; medians of {args.repeat} rounds\n")
    print_table(results)
    for name, r in results.items():
        if "best_decode_tok_s" in r:
            print(f"{name}: best round's decode " + ", ".join(f"b{b} {v:.2f}" for b, v in r["best_decode_tok_s"].items()))
        if "b8_over_b1" in r:
            print(f"{name}: batch 8 decodes {r['b8_over_b1']:.2f}x batch 1's tokens/s (median of rounds)")
    rat = ratios(results)
    for name, rr in rat.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rr.items()))
    warnings = drift(results)
    for line in warnings:
        print(line)
    suffix = ("" if args.device == "cpu" else f"-{args.device.split(':')[0]}") + (f"-{args.isa}" if args.isa else "")
    out = ROOT / "benchmarks" / "results" / f"compare_{args.name or checkpoint.name}{suffix}.json"
    write_json(out, {
        "checkpoint": str(checkpoint), "config": config.to_dict(), "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps, "decode_context": min(args.prompt_tokens, DECODE_CONTEXT),
        "threads": args.threads, "cpu_count": os.cpu_count(), "load_average_before": load_avg,
        "device": args.device, "gpu": gpu_name(args.device),
        "memory_bandwidth_gbs": round(bandwidth, 2), "bandwidth_per_round_gbs": [round(b, 2) for b in bandwidths],
        "repeat": args.repeat, "cold_page_cache": cold, "note": args.note, "isa": args.isa,
        "isa_env": ISA_ENV.get(args.isa or "", {}), "cpu": cpu_name(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results, "ratios": rat, "drift": warnings})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
