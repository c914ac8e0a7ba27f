"""Write checkpoints in the official original/ layout or the Hugging Face layout, from a model
or from seeded random weights (for tests and benchmarks without real weights).

Tensors are produced and written one at a time, so a 20b-shaped checkpoint (~13 GB) never has
to fit in memory. Files are written to a temporary name and renamed: never half a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..model import Transformer
from . import formats
from .formats import ORIGINAL
from .hf_tokenizer import write_hf_tokenizer

_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16",
                torch.uint8: "U8", torch.int64: "I64"}


def write_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                      progress: tqdm | None = None) -> None:
    """Stream tensors into a .safetensors file: the header is written from `specs` first, then
    each tensor's bytes as `produce(name)` makes it. (safetensors' own writer wants every tensor
    in memory at once; the format is simple enough to stream.)"""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (dtype, shape) in specs.items():
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, "
                                 f"declared {dtype} {tuple(shape)}")
            f.write(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().data)
            if progress is not None:
                progress.update(1)
    os.replace(tmp, path)


def _checkpoint_specs(config: ModelConfig, fmt: str, packed: bool, dtype: torch.dtype,
                      dtypes: dict[str, torch.dtype] | None = None):
    """checkpoint name -> (dtype, shape), and -> the (model name, Source) parts it is made of.
    `dtypes` (by model name) overrides the dtype a tensor is stored in."""
    with torch.device("meta"):
        meta = Transformer(config, packed).state_dict()
    shapes = {k: tuple(v.shape) for k, v in meta.items()}
    uint8 = {k for k, v in meta.items() if v.dtype == torch.uint8}
    parts: dict[str, list[tuple[str, formats.Source]]] = {}
    for ours, src in formats.table(fmt, config, packed).items():
        parts.setdefault(src.name, []).append((ours, src))
    specs = {}
    for name, members in parts.items():
        ours, src = members[0]
        shape = shapes[ours]
        if src.transpose:
            shape = shape[:-2] + (shape[-1], shape[-2])
        if src.rows is not None:
            shape = (sum(shapes[o][0] for o, _ in members),) + shape[1:]
        if ours in uint8:
            t = torch.uint8
        elif dtypes and ours in dtypes:
            t = dtypes[ours]
        elif fmt == ORIGINAL and name.endswith("norm.scale"):
            t = torch.float32    # as OpenAI ships them
        else:
            t = dtype
        specs[name] = (t, shape)
    return specs, parts


def _assemble(parts: list[tuple[str, formats.Source]], get: Callable[[str], torch.Tensor],
              dtype: torch.dtype) -> torch.Tensor:
    pieces = []
    for ours, src in sorted(parts, key=lambda p: p[1].rows or (0, 0)):
        t = get(ours)
        pieces.append(t.transpose(-1, -2) if src.transpose else t)
    t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return t if t.dtype == torch.uint8 else t.to(dtype)


def write_checkpoint(directory: str | os.PathLike, config: ModelConfig, get: Callable[[str], torch.Tensor],
                     fmt: str = ORIGINAL, packed: bool = True, dtype: torch.dtype = torch.bfloat16,
                     shard_bytes: int = 4 << 30, progress: bool = True,
                     extra: dict[str, torch.Tensor] | None = None, stored_vocab_rows: int | None = None,
                     dtypes: dict[str, torch.dtype] | None = None, desc: str | None = None) -> Path:
    """Write a checkpoint whose model tensors come from `get(model_name)`.

    `extra` tensors are stored as they are; `stored_vocab_rows` stores embedding tables of
    that many rows (a compact vocabulary, see compact_vocab.py) under a full-vocabulary config;
    `dtypes` stores the tensors it names (by model name) in its dtype instead of `dtype`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape_config = config if stored_vocab_rows is None else dataclasses.replace(config, vocab_size=stored_vocab_rows)
    specs, parts = _checkpoint_specs(shape_config, fmt, packed, dtype, dtypes)
    extra = extra or {}
    specs.update({k: (v.dtype, tuple(v.shape)) for k, v in extra.items()})
    bar = tqdm(total=len(specs), desc=desc or f"Writing {directory.name}", unit="tensor",
               disable=not progress, leave=False)
    produce = lambda name: extra[name] if name in extra else _assemble(parts[name], get, specs[name][0])  # noqa: E731
    if fmt == ORIGINAL:
        write_safetensors(directory / "model.safetensors", specs, produce, progress=bar)
        _write_json(directory / "dtypes.json", {k: _official_dtype(k, d) for k, (d, _) in specs.items()
                                                if k not in extra})
        config_dict = config.to_dict()
    else:
        shards, current, size = [], {}, 0
        for name, spec in specs.items():
            nbytes = math.prod(spec[1]) * spec[0].itemsize
            if current and size + nbytes > shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = spec
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors"
            write_safetensors(directory / fname, shard, produce, progress=bar)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(math.prod(s) * d.itemsize for d, s in specs.values())
        _write_json(directory / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(directory / "generation_config.json",
                    {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012],
                     "pad_token_id": 199999, "do_sample": True})
        write_hf_tokenizer(directory)    # real HF repositories ship one; converters need it
        config_dict = config.to_hf_dict()
        if not packed:
            del config_dict["quantization_config"]
    _write_json(directory / "config.json", config_dict)
    bar.close()
    return directory


def _official_dtype(name: str, dtype: torch.dtype) -> str:
    if dtype == torch.uint8:
        return "UE8" if name.endswith(".scales") else "FP4"
    return _DTYPE_NAMES[dtype]


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save(model: Transformer, directory: str | os.PathLike, fmt: str = ORIGINAL,
         dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> Path:
    """Save a model in the original/ or HF layout (experts stay as the model holds them)."""
    state = model.state_dict()
    return write_checkpoint(directory, model.config, state.__getitem__, fmt,
                            packed=model.blocks[0].mlp.experts.packed, dtype=dtype, progress=progress)


def random_tensor_factory(config: ModelConfig, seed: int = 0) -> Callable[[str], torch.Tensor]:
    """Seeded random weights with roughly trained-like scales, by model tensor name; each
    tensor depends only on (seed, name), so both layouts get identical weights."""
    C = config.hidden_size
    with torch.device("meta"):
        meta = Transformer(config, packed_experts=True).state_dict()

    def get(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        shape = tuple(meta[name].shape)
        if name.endswith("_blocks"):
            # random bytes drawn 8 at a time: 5x faster than uint8 draws (a 20b's 9.6 GB of
            # blocks in half a minute instead of three on a slow CPU)
            n = math.prod(shape)
            words = torch.randint(-2**63, 2**63 - 1, (-(-n // 8),), generator=g, dtype=torch.int64)
            return words.view(torch.uint8)[:n].view(shape)
        if name.endswith("_scales"):
            # 2**-7 .. 2**-5: expert weights up to ~0.2, like trained ones
            return torch.randint(120, 123, shape, generator=g, dtype=torch.uint8)
        if name.endswith("norm.weight"):
            # on the bf16 grid, so the float32 original layout and the bf16 HF one agree
            return (1.0 + 0.1 * torch.randn(shape, generator=g)).bfloat16().float()
        if name.endswith("sinks"):
            return torch.randn(shape, generator=g)
        if name.endswith("router.weight"):
            return torch.randn(shape, generator=g) / math.sqrt(C)
        if name.endswith("bias"):
            return 0.02 * torch.randn(shape, generator=g)
        if name == "embedding.weight":
            return torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])

    return get


def write_random(directory: str | os.PathLike, config: ModelConfig, fmt: str = ORIGINAL,
                 seed: int = 0, progress: bool = True) -> Path:
    """A checkpoint of random weights in the exact official layout (MXFP4 experts)."""
    return write_checkpoint(directory, config, random_tensor_factory(config, seed), fmt,
                            packed=True, progress=progress)
