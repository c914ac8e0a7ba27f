"""GGUF, the file llama.cpp, llama-cpp-python, Ollama and LM Studio run, written through the
`gguf` package that llama.cpp maintains and read back by gguf_file (its header; the tensors'
values are still dequantized by the package).

What a gpt-oss GGUF holds, as llama.cpp's own converter (`conversion/gpt_oss.py`) makes it:
architecture "gpt-oss"; the experts' mlp1 split into `ffn_gate_exps` (its even rows: the gate)
and `ffn_up_exps` (odd rows), mlp2 as `ffn_down_exps`, each kept MXFP4; norms, biases, sinks
and the router in float32; attention and the vocabulary tables in bf16 or Q8_0. ggml's MXFP4
block is 17 bytes, the E8M0 scale first, then 16 bytes whose low nibbles are elements 0-15 and
high nibbles 16-31 (ours pair neighbours: element 2j low, 2j+1 high), so the bytes are repacked,
the values untouched. The tokenizer is o200k_harmony as a GPT-2-style BPE with llama.cpp's
"gpt-4o" pre-tokenizer, and the chat template is harmony's (ossgpt/harmony/chat_template.jinja).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .. import mxfp4
from .. import tokenizer as tok
from ..checkpoint.formats import hf_table
from ..checkpoint.hf_tokenizer import NAMED_SPECIAL, cached_tokenizer_json
from ..checkpoint.tensors import Checkpoint
from ..config import ModelConfig
from ..errors import OssgptError
from ..files import atomic_file
from ..model import Transformer
from .gguf_file import GGUFFile

ARCH = "gpt-oss"
OUTTYPES = ("bf16", "q8_0")
CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "harmony" / "chat_template.jinja"


# -- MXFP4 blocks: ours <-> ggml's ---------------------------------------------------------------

def to_ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks (..., G, 16), scales (..., G) -> ggml's block_mxfp4 bytes (..., G * 17)."""
    codes = mxfp4.unpack_nibbles(blocks)                      # (..., G, 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)              # element j low, j + 16 high
    return torch.cat([scales.unsqueeze(-1), qs], dim=-1).flatten(-2)


def from_ggml_mxfp4(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's block_mxfp4 bytes (..., G * 17) -> (blocks (..., G, 16), scales (..., G))."""
    data = data.reshape(*data.shape[:-1], -1, 17)
    qs = data[..., 1:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)            # (..., G, 32)
    return mxfp4.pack_nibbles(codes), data[..., 0].contiguous()


# -- names ------------------------------------------------------------------------------------

def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    if not hf_name.endswith((".weight", ".bias")):
        hf_name += ".weight"    # the sinks: llama.cpp names them blk.N.attn_sinks.weight
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    assert found is not None, hf_name
    return found


def tensor_plan(config: ModelConfig) -> list[tuple[str, str, str, int | None]]:
    """(GGUF name, our model tensor, kind, mlp1 rows: 0 gate / 1 up / None) for every tensor.
    kind: "dense" (the --outtype), "f32" or "experts" (MXFP4, or the --outtype when dense)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, config.num_hidden_layers)
    plan = []
    for ours, src in hf_table(config, packed=False).items():
        if ".experts." in ours:
            layer, m = ours.split(".")[1], ours.split(".")[4]
            kind = "f32" if m.endswith("_bias") else "experts"
            suffix = "bias" if kind == "f32" else "weight"
            hf = f"model.layers.{layer}.mlp.experts"
            if m.startswith("mlp1"):
                plan.append((_gguf_name(name_map, f"{hf}.gate_proj.{suffix}"), ours, kind, 0))
                plan.append((_gguf_name(name_map, f"{hf}.up_proj.{suffix}"), ours, kind, 1))
            else:
                plan.append((_gguf_name(name_map, f"{hf}.down_proj.{suffix}"), ours, kind, None))
            continue
        # llama.cpp keeps 1-d tensors, norms and the router in float32 (its converter's rule)
        small = ours.endswith(("bias", "norm.weight", "sinks")) or ".router." in ours
        plan.append((_gguf_name(name_map, src.name), ours, "f32" if small else "dense", None))
    return plan


# -- writing ------------------------------------------------------------------------------------

def _add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, name: str, packed: bool,
                  outtype: str) -> None:
    """The hyperparameters under llama.cpp's gpt-oss keys, the tokenizer, the chat template."""

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling_factor != 1:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(config.rope_scaling_factor)
        writer.add_rope_scaling_orig_ctx_len(config.initial_context_length)
        writer.add_rope_scaling_yarn_beta_fast(config.rope_ntk_beta)
        writer.add_rope_scaling_yarn_beta_slow(config.rope_ntk_alpha)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.experts_per_token)
    writer.add_sliding_window(config.sliding_window)
    file_type = (gguf.LlamaFileType.MOSTLY_MXFP4_MOE if packed else
                 gguf.LlamaFileType.MOSTLY_BF16 if outtype == "bf16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # o200k_harmony from the tokenizer.json ossgpt builds (hf_tokenizer.py), in the form
    # llama.cpp's converter gives a GPT-2-style BPE: byte-level token texts, specials as CONTROL.
    spec = json.loads(cached_tokenizer_json().read_text())
    tokens = [""] * tok.VOCAB_SIZE
    types = [gguf.TokenType.NORMAL] * tok.VOCAB_SIZE
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    for added in spec["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in spec["model"]["merges"]])
    writer.add_bos_token_id(tok.STARTOFTEXT)
    writer.add_eos_token_id(tok.RETURN)
    writer.add_pad_token_id(tok.ENDOFTEXT)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE.read_text())


def _rows(t: torch.Tensor, rows: int | None) -> torch.Tensor:
    """mlp1's gate (even rows) or linear half (odd rows) of every expert (dim 1 of its weight,
    blocks, scales and bias)."""
    return t if rows is None else t[:, rows::2]


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The inverse of `_rows`: rows gate 0, up 0, gate 1, ..."""
    return torch.stack([gate, up], dim=2).flatten(1, 2)


def _split_shape(shape: tuple[int, ...], rows: int | None) -> tuple[int, ...]:
    return shape if rows is None else shape[:1] + (shape[1] // 2,) + shape[2:]


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float tensor as GGUF bytes of `qtype` (F32, BF16 or Q8_0)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return t.float().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    # Q8_0 through gguf's quantizer, a block of rows at a time (its temporaries are large)
    flat = t.reshape(-1, t.shape[-1])
    parts = [gguf.quants.quantize(flat[r:r + 8192].float().numpy(), qtype) for r in range(0, len(flat), 8192)]
    return np.concatenate(parts).reshape(*t.shape[:-1], -1)


def write_gguf(src: Checkpoint, path: str | os.PathLike, outtype: str = "bf16",
               progress: bool = True) -> Path:
    """`src` as one GGUF file at `path` (written beside it and renamed when complete),
    streamed a tensor at a time: the header first, from the shapes, then each tensor's bytes."""
    if outtype not in OUTTYPES:
        raise OssgptError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    Q = gguf.GGMLQuantizationType
    config, path = src.config, Path(path)
    if config.vocab_size != tok.VOCAB_SIZE:
        raise OssgptError(f"{src}: vocab_size {config.vocab_size}, where a GGUF carries the "
                          f"o200k_harmony tokenizer's {tok.VOCAB_SIZE} tokens")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config, packed_experts=False).state_dict().items()}

    def qtype(kind: str) -> gguf.GGMLQuantizationType:
        if kind == "experts" and src.packed:
            return Q.MXFP4
        return Q.F32 if kind == "f32" else Q.BF16 if outtype == "bf16" else Q.Q8_0

    def produce(ours: str, kind: str, rows: int | None) -> np.ndarray:
        if qtype(kind) == Q.MXFP4:
            stem = ours.removesuffix("_weight")
            blocks, scales = src.get(f"{stem}_blocks"), src.get(f"{stem}_scales")
            return to_ggml_mxfp4(_rows(blocks, rows), _rows(scales, rows)).numpy()
        return _encode(_rows(src.get(ours), rows), qtype(kind))

    plan = tensor_plan(config)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _add_metadata(writer, config, src.directory.name, src.packed, outtype)
        # the header holds every tensor's type and shape, before any data
        for name, ours, kind, rows in plan:
            shape = _split_shape(shapes[ours], rows)
            q = qtype(kind)
            if q == Q.F32:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape), raw_dtype=q)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, q)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, ours, kind, rows in tqdm(plan, desc=f"Writing {path.name}", unit="tensor",
                                           disable=not progress, leave=False):
            writer.write_tensor_data(produce(ours, kind, rows))
        writer.close()
    return path


# -- reading ------------------------------------------------------------------------------------

class GGUFModel:
    """A gpt-oss GGUF read back by the model's tensor names (`get`, as Checkpoint.get), for
    writing as a checkpoint: MXFP4 experts keep their bytes (repacked), every other tensor is
    dequantized by the `gguf` package (F32, F16, BF16, Q8_0 and its other quantizations)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        reader = GGUFFile(self.path)
        arch = reader.fields.get("general.architecture")
        if arch != ARCH:
            raise OssgptError(f"{self.path}: a GGUF of architecture {arch!r}; ossgpt converts "
                              f"only {ARCH!r} (gpt-oss) models")
        self.tensors = {t.name: t for t in reader.tensors}
        self.config = self._config(reader)
        self._check_tokenizer(reader)
        self.plan = {(ours, rows): name for name, ours, _, rows in tensor_plan(self.config)}
        wanted = set(self.plan.values())
        if missing := sorted(wanted - set(self.tensors)):
            raise OssgptError(f"{self.path}: missing tensor {missing[0]} ({len(missing)} missing) "
                              f"for a {self.config.num_hidden_layers}-layer gpt-oss")
        if unexpected := sorted(set(self.tensors) - wanted):
            raise OssgptError(f"{self.path}: unexpected tensor {unexpected[0]} (not part of a gpt-oss GGUF)")
        gate = self.tensors[self.plan["blocks.0.mlp.experts.mlp1_weight", 0]]
        self.packed = gate.tensor_type == gguf.GGMLQuantizationType.MXFP4
        with torch.device("meta"):
            shapes = Transformer(self.config, packed_experts=False).state_dict()
        for (ours, rows), name in self.plan.items():
            shape = _split_shape(tuple(shapes[ours].shape), rows)
            t = self.tensors[name]
            stored = tuple(int(n) for n in reversed(t.shape))
            if stored != shape:
                raise OssgptError(f"{self.path}: tensor {name} has shape {stored}, expected {shape} "
                                  f"from the GGUF's metadata")
            if (ours.endswith("_weight") and ".experts." in ours) and self.packed != (
                    t.tensor_type == gguf.GGMLQuantizationType.MXFP4):
                raise OssgptError(f"{self.path}: tensor {name} is {t.tensor_type.name}, but the "
                                  f"experts must be all MXFP4 or none")

    def _config(self, reader: GGUFFile) -> ModelConfig:
        K, field = gguf.Keys.LLM, reader.fields.get
        key = lambda k: k.format(arch=ARCH)  # noqa: E731
        try:
            embd = self.tensors["token_embd.weight"]
            fields = {
                "num_hidden_layers": field(key(K.BLOCK_COUNT)),
                "num_experts": field(key(K.EXPERT_COUNT)),
                "experts_per_token": field(key(K.EXPERT_USED_COUNT)),
                "vocab_size": int(embd.shape[1]),
                "hidden_size": field(key(K.EMBEDDING_LENGTH)),
                "intermediate_size": field(key(K.EXPERT_FEED_FORWARD_LENGTH),
                                 field(key(K.FEED_FORWARD_LENGTH))),
                "head_dim": field(key(gguf.Keys.Attention.KEY_LENGTH)),
                "num_attention_heads": field(key(gguf.Keys.Attention.HEAD_COUNT)),
                "num_key_value_heads": field(key(gguf.Keys.Attention.HEAD_COUNT_KV)),
                "sliding_window": field(key(gguf.Keys.Attention.SLIDING_WINDOW)),
                "rms_norm_eps": field(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
                "rope_theta": field(key(gguf.Keys.Rope.FREQ_BASE)),
                "rope_scaling_factor": field(key(gguf.Keys.Rope.SCALING_FACTOR), 1.0),
                "initial_context_length": field(key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)),
                "rope_ntk_beta": field(key(gguf.Keys.Rope.SCALING_YARN_BETA_FAST)),
                "rope_ntk_alpha": field(key(gguf.Keys.Rope.SCALING_YARN_BETA_SLOW)),
            }
        except KeyError as e:
            raise OssgptError(f"{self.path}: missing tensor {e} (not a gpt-oss GGUF)") from None
        # float32 metadata (eps 1e-5 is stored as 9.99999974e-06): back to the decimal it was
        fields = {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in fields.items()
                  if v is not None}
        try:
            return ModelConfig.from_dict(fields)
        except OssgptError as e:
            raise OssgptError(f"{self.path}: {e}") from None

    def _check_tokenizer(self, reader: GGUFFile) -> None:
        """Only o200k_harmony can be converted: ossgpt writes its own tokenizer.json."""
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        pre = reader.fields.get("tokenizer.ggml.pre")
        ok = isinstance(tokens, list) and pre == "gpt-4o" and len(tokens) == tok.VOCAB_SIZE and all(
            tokens[i] == text for i, text in NAMED_SPECIAL.items())
        if not ok:
            raise OssgptError(f"{self.path}: its tokenizer is not o200k_harmony (pre-tokenizer "
                              f"{pre!r}), the only one a gpt-oss checkpoint ships")

    def dtypes(self) -> dict[str, torch.dtype]:
        """float32 for the tensors the GGUF stores in float32 (norms, biases, sinks, router),
        so they come back exactly; the rest is written in bf16."""
        return {ours: torch.float32 for (ours, _), name in self.plan.items()
                if self.tensors[name].tensor_type == gguf.GGMLQuantizationType.F32}

    def _read(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise OssgptError(f"{self.path}: tensor {name} is {t.tensor_type.name}, which the "
                              f"gguf package cannot dequantize") from None
        return torch.from_numpy(np.array(values.reshape(shape)))     # a copy: the file is read-only

    def get(self, ours: str) -> torch.Tensor:
        """Model tensor `ours` (packed-experts names where the GGUF's experts are MXFP4)."""
        if ours.endswith(("_blocks", "_scales")):
            stem = ours.rsplit("_", 1)[0]
            halves = [from_ggml_mxfp4(torch.from_numpy(np.array(self.tensors[self.plan[f"{stem}_weight", r]].data)))
                      for r in ((0, 1) if "mlp1" in stem else (None,))]
            part = 0 if ours.endswith("_blocks") else 1
            return halves[0][part] if len(halves) == 1 else _interleave(halves[0][part], halves[1][part])
        if (ours, 0) in self.plan:
            return _interleave(self._read(self.plan[ours, 0]), self._read(self.plan[ours, 1]))
        return self._read(self.plan[ours, None])
