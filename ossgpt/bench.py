"""`ossgpt bench`: load time, prefill and decode speed, time to first token and peak memory of
any checkpoint, measured here and now (no comparison with other engines: see benchmarks/)."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import torch

from . import kernels
from .checkpoint import hugepages
from .generate import decode_step, prefill
from .model import Transformer
from .packed_bf16 import PackedLinear


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    threads: int
    load_s: float
    prompt_tokens: int
    prefill_tok_s: float
    ttft_s: float
    decode_tok_s: dict[int, float]     # batch size -> aggregate tokens/s
    peak_rss_gib: float
    packed_dense: bool = False         # dense weights held in packed_bf16's 12-bit form
    huge_pages_gib: float = 0.0        # weights in huge pages after loading (Linux; see hugepages.py)
    experts: str = "mxfp4"             # how the experts were held: mxfp4 or dense
    peak_gpu_gib: float = 0.0          # peak GPU memory allocated (on a GPU)
    cpu_kernels: str = ""              # the CPU kernels' instruction-set level (kernels.isa()), on the CPU
    expert_decode_inputs: str = ""     # kernels.expert_decode_inputs: exact, int16 or int9 (a scale a block) or plain
    expert_prefill_inputs: str = ""    # kernels.expert_prefill_inputs: the same for prefill
    placement: str = ""                # experts apart from the device, or the process split

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decode_tok_s"] = {str(k): v for k, v in self.decode_tok_s.items()}
        return d


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` seeded random prompts of `length` ordinary (non-special) token ids; the same ids
    for the same arguments, so other engines can be timed on exactly these prompts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 199_998, (batch, length), generator=g).tolist()


@torch.inference_mode()
def decode_speed(model: Transformer, batch: int, context: int, steps: int, seed: int = 0) -> float:
    """Aggregate tokens/s of `steps` greedy decode steps for `batch` rows after `context`-token
    prompts (the prefill is not timed)."""
    prompts = random_prompts(batch, context, seed)
    cache = model.make_cache()
    logits = prefill(model, prompts, cache)
    positions = torch.full((batch,), context, device=model.device)
    tokens = logits.argmax(-1)
    logits = decode_step(model, tokens, positions, cache)          # warm-up step
    _sync(model.device)
    t0 = time.perf_counter()
    for i in range(steps):
        tokens = logits.argmax(-1)
        logits = decode_step(model, tokens, positions + 1 + i, cache)
    _sync(model.device)
    return batch * steps / (time.perf_counter() - t0)


def _touch(model: Transformer) -> None:
    """Read a byte of every page of the weights. Loading maps the checkpoint lazily; without
    this its reads from disk would land in the first prefill instead of the load time."""
    packed = [t for m in model.modules() if isinstance(m, PackedLinear) for t in m.packed.parts()]
    for t in [*model.parameters(), *model.buffers(), *packed]:
        if t.device.type == "cpu" and t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


@torch.inference_mode()
def run(ref: str, prompt_tokens: int = 512, decode_steps: int = 32, batches: tuple[int, ...] = (1, 8),
        device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
        pack_dense: bool = True, experts: str = "auto", **placement) -> BenchResult:
    """`placement`: load's experts_device, experts_layers and shard."""
    from .checkpoint import load

    t0 = time.perf_counter()
    model = load(ref, device=device, dtype=dtype, progress=False, pack_dense=pack_dense,
                 experts=experts, **placement)
    _touch(model)
    load_s = time.perf_counter() - t0
    huge = hugepages.huge_bytes() / 2**30
    prompt = random_prompts(1, prompt_tokens, seed)[0]
    prefill(model, [prompt[:16]], model.make_cache())              # warm-up
    _sync(model.device)
    t0 = time.perf_counter()
    cache = model.make_cache()
    logits = prefill(model, [prompt], cache)
    _sync(model.device)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1)                                      # the first token
    ttft = time.perf_counter() - t0
    del cache, token
    decode = {b: decode_speed(model, b, min(prompt_tokens, 128), decode_steps, seed)
              for b in batches}
    return BenchResult(str(ref), str(model.device), str(dtype).removeprefix("torch."),
                       torch.get_num_threads(), round(load_s, 3), prompt_tokens,
                       round(prompt_tokens / prefill_s, 2), round(ttft, 4),
                       {b: round(v, 2) for b, v in decode.items()}, round(_peak_rss_gib(), 3),
                       any(isinstance(m, PackedLinear) for m in model.modules()), round(huge, 3),
                       "mxfp4" if model.blocks[0].mlp.experts.packed else "dense",
                       round(torch.cuda.max_memory_allocated(model.device) / 2**30, 3)
                       if model.device.type == "cuda" else 0.0,
                       kernels.isa() if model.device.type == "cpu" else "",
                       kernels.expert_decode_inputs(model.dtype) if model.device.type == "cpu" else "",
                       kernels.expert_prefill_inputs(model.dtype) if model.device.type == "cpu" else "",
                       _placement(model))


def _placement(model: Transformer) -> str:
    shard = getattr(model, "shard", None)
    if shard is not None:
        return shard.describe(model)
    apart = [i for i, b in enumerate(model.blocks) if b.mlp.experts.mlp1_bias.device != model.device]
    return f"experts of {len(apart)} layers on the cpu" if apart else ""
