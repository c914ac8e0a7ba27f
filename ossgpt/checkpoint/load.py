"""Find a checkpoint (directory, repo root holding both layouts, or hub id), check it against
the format's name table, and load it memory-mapped onto a model built on the meta device.

MXFP4 experts stay packed (uint8), so a 20b checkpoint needs far less RAM than its 42 GB bf16
form; they stay memory-mapped (pages read as experts are used) unless the machine has room for
the whole checkpoint, when hugepages.py moves them, as it does the dense weights decode reads.
With `pack_dense`, the dense bf16 weights of the products go straight from the file into
packed_bf16's lossless 12-bit form instead (inference on the CPU)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .. import kernels, packed_bf16
from ..compact_vocab import CompactVocab
from ..config import ConfigError, ModelConfig
from ..errors import OssgptError
from ..model import Linear, SharedRowsLinear, Transformer, unpack_experts
from ..parallel.sharding import Shard
from . import formats, hugepages
from .formats import HF, ORIGINAL, Source


class CheckpointError(OssgptError):
    """A checkpoint that cannot be found or read; the message is one line for the user."""


# -- finding a checkpoint ----------------------------------------------------------------------

def detect(path: Path) -> tuple[Path, str]:
    """A local directory -> (directory holding the weights, format)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    # A hub snapshot holds both layouts; take the official one (one file, no index to trust).
    if (path / "original" / "config.json").is_file():
        path = path / "original"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a gpt-oss checkpoint in the "
                              f"original/ or Hugging Face layout)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    fmt = HF if config.get("model_type") == "gpt_oss" or "num_local_experts" in config else ORIGINAL
    if not list(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no *.safetensors weights beside config.json")
    return path, fmt


def resolve(ref: str | os.PathLike) -> tuple[Path, str]:
    """A directory or a Hugging Face hub id -> (weights directory, format)."""
    if str(ref) == "nano":
        from ..nano import bundled_path
        path = bundled_path()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"the bundled nano model is missing from {path}; "
                                  f"rebuild it with: ossgpt train-nano")
        return detect(path)
    path = Path(ref).expanduser()
    if path.exists():
        return detect(path)
    ref = str(ref)
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise CheckpointError(f"{ref}: no such directory (and not a hub id like openai/gpt-oss-20b)")
    return detect(_from_hub(ref))


def _from_hub(repo_id: str) -> Path:
    """Through huggingface_hub: its cache first, then a download of the original/ layout
    unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    patterns = ["original/*"]
    hint = f"hf download {repo_id} --include 'original/*'"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if HF_HUB_OFFLINE:
        raise CheckpointError(f"{repo_id} is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
                              f"HF_HUB_OFFLINE is set; on a machine with network run: {hint}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{repo_id}: could not download from the Hugging Face hub "
                              f"({first}); download it with: {hint}") from None


# -- reading tensors ---------------------------------------------------------------------------

class TensorFiles:
    """All tensors of a checkpoint directory, by name, memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Path] = {}
        self._handles = {}
        paths = sorted(directory.glob("*.safetensors"))
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            paths = sorted({directory / f for f in weight_map.values()})
            for p in paths:
                if not p.is_file():
                    raise CheckpointError(f"{index}: lists {p.name}, which is missing")
        for p in paths:
            try:
                handle = safe_open(str(p), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{p}: unreadable safetensors file "
                                      f"(truncated or corrupt?): {e}") from None
            self._handles[p] = handle
            for name in handle.keys():
                self.files[name] = p

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it ("BF16", "U8", ...)."""
        return self._handles[self.files[name]].get_slice(name).get_dtype()

    def get(self, name: str, index: int | slice | None = None) -> torch.Tensor:
        """The tensor, or only its `index` along dim 0 (one expert, some rows: read alone)."""
        path = self.files[name]
        try:
            if index is None:
                return self._handles[path].get_tensor(name)
            return self._handles[path].get_slice(name)[index]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name}: {e}") from None


def _stored_shape(shape: tuple[int, ...], src: Source, fused_rows: dict[str, int]) -> tuple[int, ...]:
    """The shape the checkpoint must store for a model tensor of `shape`."""
    if src.rows is not None:
        return (fused_rows[src.name],) + shape[1:]
    return shape[:-2] + (shape[-1], shape[-2]) if src.transpose else shape


_LOADABLE_DTYPES = {"U8", "BF16", "F16", "F32", "F64"}
COMPACT_IDS = "vocab.ids"
COMPACT_SHARED = "unembedding.shared"
VOCAB_TABLES = ("embedding.weight", "unembedding.weight")


def expand_vocab(files: TensorFiles, table: dict[str, Source], config: ModelConfig):
    ids = files.get(COMPACT_IDS)
    emb, unemb = files.get(table["embedding.weight"].name), files.get(table["unembedding.weight"].name)
    shared = files.get(COMPACT_SHARED)
    C = config.hidden_size
    if (ids.dim() != 1 or emb.shape != (len(ids), C) or unemb.shape != (len(ids), C)
            or shared.shape != (C,) or len(ids) == 0 or int(ids.max()) >= config.vocab_size):
        raise CheckpointError(f"{files.files[COMPACT_IDS]}: compact vocabulary tensors do not "
                              f"match each other or config.json")
    full_emb, full_unemb = CompactVocab(ids, config.vocab_size).expand(emb, unemb, shared)
    return {"embedding.weight": full_emb, "unembedding.weight": full_unemb}


def shared_row_index(files: TensorFiles, config: ModelConfig) -> torch.Tensor:
    """A compact checkpoint's row of each id: its own for the stored ids, one shared row after
    them for every other id."""
    ids = files.get(COMPACT_IDS).long()
    row_of = torch.full((config.vocab_size,), len(ids), dtype=torch.long)
    row_of[ids] = torch.arange(len(ids))
    return row_of


def _keep_float32(name: str) -> bool:
    # Norm scales and sinks are tiny and enter float32 softmax/normalisation: keep full precision.
    return name.endswith("norm.weight") or name.endswith(".sinks")


def is_packed(files: TensorFiles, fmt: str) -> bool:
    return any(n.endswith(formats.packed_marker(fmt)) for n in files.names())


def check_tensors(files: TensorFiles, fmt: str, config: ModelConfig,
                  wanted: dict[str, torch.Tensor]) -> dict[str, Source]:
    """Check `files` against the format's name table for a model whose state dict (real or
    meta) is `wanted`: strict both ways (a missing or an unexpected tensor is an error), every
    stored shape and dtype as config.json implies. -> the table."""
    directory = files.directory
    names = files.names()
    table = formats.table(fmt, config, is_packed(files, fmt))
    assert set(wanted) == set(table), "model and name table disagree"

    # A compact vocabulary (the bundled nano model): only the used ids' rows are stored, plus
    # one row shared by every unused id (see compact_vocab.py); expanded on reading.
    compact = COMPACT_IDS in names
    stored_names = {s.name for s in table.values()} | ({COMPACT_IDS, COMPACT_SHARED} if compact else set())
    missing = sorted(stored_names - names)
    if missing:
        raise CheckpointError(f"{directory}: missing tensor{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} "
                              f"({fmt} layout, {config.num_hidden_layers} layers in config.json)")
    unused = sorted(names - stored_names)
    if unused:
        raise CheckpointError(f"{directory}: unexpected tensor{'s' if len(unused) > 1 else ''} "
                              f"{', '.join(unused[:5])}{' …' if len(unused) > 5 else ''} "
                              f"(not part of a {config.num_hidden_layers}-layer gpt-oss {fmt} checkpoint)")
    fused_rows: dict[str, int] = {}
    for src in table.values():
        if src.rows is not None:
            fused_rows[src.name] = max(fused_rows.get(src.name, 0), src.rows[1])
    for ours, src in table.items():
        if compact and ours in VOCAB_TABLES:
            continue    # checked against the ids when expanded
        stored = _stored_shape(tuple(wanted[ours].shape), src, fused_rows)
        if files.shape(src.name) != stored:
            raise CheckpointError(f"{files.files[src.name]}: tensor {src.name} has shape "
                                  f"{files.shape(src.name)}, expected {stored} from config.json")
        packed_wanted, stored_dtype = wanted[ours].dtype == torch.uint8, files.dtype(src.name)
        if packed_wanted != (stored_dtype == "U8") or stored_dtype not in _LOADABLE_DTYPES:
            expected_dtype = "U8 (MXFP4)" if packed_wanted else "a float dtype"
            raise CheckpointError(f"{files.files[src.name]}: tensor {src.name} has dtype "
                                  f"{stored_dtype}, expected {expected_dtype}")
    return table


def read_tensor(files: TensorFiles, src: Source) -> torch.Tensor:
    """A model tensor as the checkpoint stores it (its dtype), in the model's layout."""
    t = files.get(src.name)
    if src.rows is not None:
        t = t[src.rows[0]:src.rows[1]]
    return t.transpose(-1, -2) if src.transpose else t


def load_state_dict(files: TensorFiles, fmt: str, config: ModelConfig, model: Transformer,
                    dtype: torch.dtype, device: torch.device, progress: bool = True,
                    pack: frozenset[str] = frozenset(), shard: Shard | None = None,
                    experts_device: Callable[[str], torch.device] | None = None,
                    ) -> dict[str, torch.Tensor | packed_bf16.PackedBF16]:
    """Every tensor of `model`'s state dict, read from `files`, checked by `check_tensors`.
    Tensors named in `pack` come back as PackedBF16 where packing pays; with `shard`, each is
    this process's slice (parallel/sharding.py); `experts_device(name)` places expert tensors."""
    table = check_tensors(files, fmt, config, model.state_dict())
    vocab_tables = expand_vocab(files, table, config) if COMPACT_IDS in files.names() else {}
    experts_too = hugepages.move_experts(
        sum(p.stat().st_size for p in set(files.files.values())))
    state = {}
    huge_before, huge_wanted = hugepages.huge_bytes(), 0
    bar = tqdm(table.items(), desc="Loading", unit="tensor", disable=not progress, leave=False)
    for ours, src in bar:
        t = vocab_tables[ours] if ours in vocab_tables else read_tensor(files, src)
        mapped = ours not in vocab_tables    # a view of the file mapping
        if shard is not None:
            whole, t = t, shard.select(ours, t, config)
            mapped = mapped and t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        stored = t
        if t.dtype != torch.uint8:
            t = t.to(torch.float32 if _keep_float32(ours) else dtype)
        if ours in pack and packed_bf16.packable(t):
            p = _pack(t, mapped=mapped and t is stored)
            if packed_bf16.worth_it(p):
                state[ours] = p
                huge_wanted += sum(q.nbytes for q in p.parts() if q.nbytes >= hugepages.MIN_BYTES)
                continue
        where = experts_device(ours) if experts_device is not None else device
        if where.type == "cpu" and _streamed_by_decode(ours, t, experts_too) and hugepages.enabled():
            # the file's pages are not needed after the copy
            moved = hugepages.copy(t, release_source=mapped and t is stored)
            if mapped and t is not stored:
                hugepages.release(stored)
            t = moved
            huge_wanted += t.nbytes
        state[ours] = t.to(where)
    if huge_wanted and hugepages.enabled():
        hugepages.warn_if_short(huge_wanted, hugepages.huge_bytes() - huge_before)
    return state


def _pack(t: torch.Tensor, mapped: bool) -> packed_bf16.PackedBF16:
    """t packed into huge pages where the kernel gives them, its mapped file pages released as
    the rows are done (resident memory never holds both forms whole)."""
    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # a small tensor would take a whole 2 MiB page (and stays in cache anyway)
        big = hugepages.enabled() and math.prod(shape) * dtype.itemsize >= hugepages.MIN_BYTES
        return hugepages.empty(shape, dtype) if big else torch.empty(shape, dtype=dtype)

    release = (lambda r0, r1: hugepages.release(t[r0:r1])) if mapped else None
    return packed_bf16.pack_fast(t, empty, release)


def _streamed_by_decode(name: str, t: torch.Tensor, experts: bool) -> bool:
    """What hugepages.py moves: the dense weights each decoded token reads whole (attention,
    unembedding), and the experts if `experts`; not the embedding (one row a token)."""
    if t.numel() * t.element_size() < hugepages.MIN_BYTES or name == "embedding.weight":
        return False
    return experts if ".experts." in name else t.is_floating_point()


# -- the entry point ---------------------------------------------------------------------------

def dense_experts_fit(model: Transformer) -> bool:
    """Whether the model's MXFP4 experts, dequantized to its dtype, fit in its GPU's free
    memory with a tenth of the GPU left for the KV cache and activations (gpt-oss-20b's take
    38 GB in bf16: yes on an 80 GB GPU, no on a 24 GB one; gpt-oss-120b's 229 GB: no)."""
    packed = [b.mlp.experts for b in model.blocks
              if b.mlp.experts.packed and b.mlp.experts.mlp1_bias.device == model.device]
    dense = sum((e.mlp1_blocks.numel() + e.mlp2_blocks.numel()) * 2 * model.dtype.itemsize
                for e in packed)
    free, total = torch.cuda.mem_get_info(model.device)
    return dense + total // 10 <= free


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but no CUDA GPU is available")
    return device


EXPERT_FORMATS = ("auto", "mxfp4", "dense")


def _experts_placement(device: torch.device, experts_device: str | None,
                       layers: int | None) -> Callable[[str], torch.device] | None:
    """name -> the device of that tensor, where some experts live apart from `device`."""
    if experts_device is None:
        if layers is not None:
            raise CheckpointError("experts_layers needs experts_device (e.g. cpu)")
        return None
    where = resolve_device(experts_device)
    if layers is not None and layers < 0:
        raise CheckpointError(f"experts_layers must be >= 0, got {layers}")

    def place(name: str) -> torch.device:
        if ".experts." not in name:
            return device
        layer = int(name.split(".")[1])          # blocks.<layer>.mlp.experts.<tensor>
        return where if layers is None or layer < layers else device
    return place


def load(ref: str | os.PathLike, device: str | torch.device = "auto",
         dtype: torch.dtype = torch.bfloat16, progress: bool = True,
         pack_dense: bool = False, experts: str = "auto", experts_device: str | None = None,
         experts_layers: int | None = None, shard: Shard | None = None) -> Transformer:
    """Load a gpt-oss checkpoint: a directory in the original/ or Hugging Face layout, a repo
    root holding both, or a hub id such as `openai/gpt-oss-20b`.

    pack_dense: for inference on the CPU in bf16, hold the attention, router and unembedding
    weights in packed_bf16's lossless 12-bit form (the same logits; a quarter less memory and
    faster decode; read-only: no training, no moving to another device).
    experts: how MXFP4 experts are held: "mxfp4" packed (a quarter of bf16's memory; the CPU
    kernels and GPUs dequantize the routed ones as they go), "dense" dequantized to `dtype` at
    load (the same values), "auto" dense on a GPU where they fit (dense_experts_fit), else mxfp4.
    experts_device: where the experts live if not on `device` ("cpu" beside a GPU: the CPU
    kernels run them, the hidden states cross once a layer); `experts_layers`: only the first
    that many layers' (llama.cpp's --n-cpu-moe), all when None.
    shard: this process's part of a model split over processes (ossgpt.parallel)."""
    if experts not in EXPERT_FORMATS:
        raise CheckpointError(f"experts must be one of {', '.join(EXPERT_FORMATS)}, got {experts!r}")
    directory, fmt = resolve(ref)
    device = resolve_device(device)
    place = _experts_placement(device, experts_device, experts_layers)
    try:
        config = ModelConfig.from_file(directory / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = TensorFiles(directory)
    with torch.device("meta"):
        model = Transformer(config, packed_experts=is_packed(files, fmt))
    if device.type == "cpu" or place is not None:
        kernels.cpu_kernels()    # compiled on first use: its notice comes before the load bar
    pack = frozenset()
    compact = COMPACT_IDS in files.names()
    if pack_dense and device.type == "cpu" and dtype == torch.bfloat16:
        pack = frozenset(f"{name}.weight" for name, m in model.named_modules()
                         if type(m) is Linear and not (compact and name == "unembedding"))
    state = load_state_dict(files, fmt, config, model, dtype, device, progress, pack, shard, place)
    if shard is not None:
        shard.apply(model)
    for name in [n for n, t in state.items() if isinstance(t, packed_bf16.PackedBF16)]:
        packed_bf16.swap_in(model, name.removesuffix(".weight"), state.pop(name))
    model.load_state_dict(state, assign=True, strict=True)
    del state
    if compact:      # the unused ids' logits from their one shared row (model.SharedRowsLinear)
        model.unembedding = SharedRowsLinear(model.unembedding.weight, shared_row_index(files, config))
    if experts == "dense" or experts == "auto" and device.type == "cuda" and dense_experts_fit(model):
        unpack_experts(model, device)
    model.eval()
    model.source = (directory, fmt)
    return model
