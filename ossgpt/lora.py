"""LoRA adapters for a gpt-oss Transformer: low-rank updates on the attention projections, on
every MoE expert (per-expert factors over the MXFP4 base, which stays packed and frozen) and
optionally on the router; saved in PEFT's format under transformers' GptOss names, so
`peft.PeftModel.from_pretrained(GptOssForCausalLM...)` loads them, and merged back into a
checkpoint with the experts re-quantized to MXFP4.

PEFT's layout, for reference (peft.tuners.lora.layer.Linear and ParamWrapper):
- a Linear: lora_A.weight (r, in), lora_B.weight (out, r), delta = B @ A * alpha / r;
- a 3-d expert parameter (E, in, out) of GptOssExperts (`is_transposed`): lora_A.weight
  (r*E, in) read as (E, r, in) and lora_B.weight (out, r*E) read as (out, r, E); wrapping two
  parameters of one module nests the wrappers, so the first target (gate_up_proj) is saved
  under `experts.base_layer.lora_*` and the second (down_proj) under `experts.lora_*`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn

from . import mxfp4
from .errors import OssgptError
from .model import Experts, Transformer, swiglu
from .trainable_tokens import (PEFT_SUFFIX, PEFT_TABLES, SwitchRows, TrainableRows,
                               add_trainable_tokens, merge_tokens, trainable_ids)

TARGETS = ("attention", "experts", "router")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_PREFIX = "base_model.model.model.layers"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "experts")
    extra: dict = field(default_factory=dict)   # other adapter_config.json fields, kept as read

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise OssgptError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise OssgptError(f"LoRA targets must be among {', '.join(TARGETS)}, got {bad or 'none'}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _init_a(a: torch.Tensor) -> None:
    # PEFT's default: kaiming-uniform A (fan-in = the input width), zero B, so training starts
    # from the base model exactly.
    for row_block in a.view(-1, a.shape[-2], a.shape[-1]):
        nn.init.kaiming_uniform_(row_block, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """base(x) + scale * x A^T B^T, the base frozen."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), scale
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        _init_a(self.lora_A)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (update * self.scale).to(x.dtype)


class _FrozenProduct(torch.autograd.Function):
    """x @ W^T for a frozen W made by `make()` (an expert dequantized from MXFP4), made again in
    the backward pass instead of kept: a training step would otherwise hold every routed
    expert's dense weights from its forward to its backward (6.4 GB a layer at 20b's size in
    float32), which is what makes LoRA on the experts fit in a CPU's memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, make) -> torch.Tensor:
        ctx.make = make
        return F.linear(x, make())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.make(), None


def _low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x A^T B^T (B already scaled), in the factors' dtype, never forming B A."""
    return ((x.to(a.dtype) @ a.T) @ b.T).to(x.dtype)


class _ExpertsWrapper(nn.Module):
    """Experts over a frozen `base` Experts plus a low-rank update per expert, applied to the
    routed tokens (x A^T B^T) rather than added to the weights: no dense B A of each expert per
    step. MoE reads the biases through it."""

    def factors(self, e: int) -> tuple[torch.Tensor, ...] | None:
        """Expert e's (mlp1 A, scaled mlp1 B, mlp2 A, scaled mlp2 B), or None for the base."""
        raise NotImplementedError

    @property
    def mlp1_bias(self) -> torch.Tensor:
        return self.base.mlp1_bias

    @property
    def mlp2_bias(self) -> torch.Tensor:
        return self.base.mlp2_bias

    def mlp(self, e: int, x: torch.Tensor, limit: float) -> torch.Tensor:
        dtype, base, f = x.dtype, self.base, self.factors(e)
        h = _FrozenProduct.apply(x, lambda: base.weight(e, 0, dtype)) + self.mlp1_bias[e].to(dtype)
        if f is not None:
            h = h + _low_rank(x, f[0], f[1])
        h = swiglu(h, limit)
        y = _FrozenProduct.apply(h, lambda: base.weight(e, 1, dtype)) + self.mlp2_bias[e].to(dtype)
        return y + _low_rank(h, f[2], f[3]) if f is not None else y


class LoRAExperts(_ExpertsWrapper):
    """Experts with a trainable low-rank update per expert over the (packed, frozen) base."""

    def __init__(self, base: Experts, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), scale
        E, C = base.mlp1_bias.shape[0], base.mlp2_bias.shape[1]
        two_i = base.mlp1_bias.shape[1]
        self.mlp1_A = nn.Parameter(torch.empty(E, rank, C))
        self.mlp1_B = nn.Parameter(torch.zeros(E, two_i, rank))
        self.mlp2_A = nn.Parameter(torch.empty(E, rank, two_i // 2))
        self.mlp2_B = nn.Parameter(torch.zeros(E, C, rank))
        _init_a(self.mlp1_A)
        _init_a(self.mlp2_A)

    def deltas(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.mlp1_B[e] @ self.mlp1_A[e] * self.scale,
                self.mlp2_B[e] @ self.mlp2_A[e] * self.scale)

    def factors(self, e: int) -> tuple[torch.Tensor, ...]:
        return self.mlp1_A[e], self.mlp1_B[e] * self.scale, self.mlp2_A[e], self.mlp2_B[e] * self.scale


def add_lora(model: Transformer, config: LoraConfig) -> list[nn.Parameter]:
    """Freeze the model and wrap its targets with zero-initialised adapters; -> the adapter
    parameters (what to train)."""
    model.requires_grad_(False)
    for block in model.blocks:
        if "attention" in config.targets:
            for name in _ATTN:
                setattr(block.attn, name, LoRALinear(getattr(block.attn, name), config.rank,
                                                     config.scale))
        if "router" in config.targets:
            block.mlp.router = LoRALinear(block.mlp.router, config.rank, config.scale)
        if "experts" in config.targets:
            block.mlp.experts = LoRAExperts(block.mlp.experts, config.rank, config.scale)
    return [p for p in model.parameters() if p.requires_grad]


# -- PEFT format ---------------------------------------------------------------------------------

def _peft_names(model: Transformer) -> dict[str, tuple[nn.Parameter, str]]:
    """PEFT tensor name -> (our parameter, how to convert: "linear" or "experts")."""
    names: dict[str, tuple[nn.Parameter, str]] = {}
    for i, block in enumerate(model.blocks):
        for name in _ATTN:
            module = getattr(block.attn, name)
            if isinstance(module, LoRALinear):
                base = f"{_PREFIX}.{i}.self_attn.{name}"
                names[f"{base}.lora_A.weight"] = (module.lora_A, "linear")
                names[f"{base}.lora_B.weight"] = (module.lora_B, "linear")
        if isinstance(block.mlp.router, LoRALinear):
            names[f"{_PREFIX}.{i}.mlp.router.lora_A.weight"] = (block.mlp.router.lora_A, "linear")
            names[f"{_PREFIX}.{i}.mlp.router.lora_B.weight"] = (block.mlp.router.lora_B, "linear")
        experts = block.mlp.experts
        if isinstance(experts, LoRAExperts):
            base = f"{_PREFIX}.{i}.mlp.experts"
            names[f"{base}.base_layer.lora_A.weight"] = (experts.mlp1_A, "experts_A")
            names[f"{base}.base_layer.lora_B.weight"] = (experts.mlp1_B, "experts_B")
            names[f"{base}.lora_A.weight"] = (experts.mlp2_A, "experts_A")
            names[f"{base}.lora_B.weight"] = (experts.mlp2_B, "experts_B")
    for table, (_, prefix) in PEFT_TABLES.items():
        if isinstance(getattr(model, table), TrainableRows):
            names[prefix + PEFT_SUFFIX] = (getattr(model, table).rows, "rows")
    return names


def _to_peft(p: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "experts_A":                       # (E, r, in) -> (E*r, in)
        return p.reshape(-1, p.shape[-1])
    if kind == "experts_B":                       # (E, out, r) -> (out, r*E), read as (out, r, E)
        return p.permute(1, 2, 0).reshape(p.shape[1], -1)
    return p


def _from_peft(t: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "experts_A":
        return t.reshape(like.shape)
    if kind == "experts_B":
        E, out, r = like.shape
        return t.reshape(out, r, E).permute(2, 0, 1)
    return t


def save_adapter(model: Transformer, config: LoraConfig, directory: str | os.PathLike,
                 base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: _to_peft(p.detach(), kind).contiguous().float()
               for name, (p, kind) in _peft_names(model).items()}
    target_modules = list(_ATTN) if "attention" in config.targets else []
    target_parameters = ((["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
                          if "experts" in config.targets else [])
                         + (["mlp.router.weight"] if "router" in config.targets else []))
    adapter = {**config.extra, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank,
               "lora_alpha": config.alpha, "lora_dropout": 0.0, "bias": "none",
               "fan_in_fan_out": False, "init_lora_weights": True,
               "target_modules": target_modules, "target_parameters": target_parameters,
               "base_model_name_or_path": base_model, "inference_mode": True}
    adapter.pop("trainable_token_indices", None)
    if tokens := trainable_ids(model):
        adapter["trainable_token_indices"] = {PEFT_TABLES[t][0]: ids for t, ids in tokens.items()}
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    tmp = directory / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(adapter, indent=2))
    os.replace(tmp, directory / ADAPTER_CONFIG)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OssgptError(f"{path}: cannot read the adapter config ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise OssgptError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    modules = set(raw.get("target_modules") or [])
    params = set(raw.get("target_parameters") or [])
    targets = tuple(t for t, present in (
        ("attention", bool(modules & set(_ATTN))),
        ("experts", any("experts" in p for p in params)),
        ("router", any("router" in p for p in params) or "router" in modules)) if present)
    extra = {k: v for k, v in raw.items() if k not in ("r", "lora_alpha")}
    return LoraConfig(rank=int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),
                      targets=targets, extra=extra)


def load_adapter(model: Transformer, directory: str | os.PathLike) -> LoraConfig:
    """Wrap `model` with the adapter saved in `directory` (PEFT format)."""
    config = read_adapter_config(directory)
    add_lora(model, config)
    if tokens := config.extra.get("trainable_token_indices"):
        add_trainable_tokens(model, _token_tables(tokens, Path(directory) / ADAPTER_CONFIG))
    path = Path(directory) / ADAPTER_WEIGHTS
    names = _peft_names(model)
    try:
        with safe_open(str(path), "pt") as f:
            stored = set(f.keys())
            if missing := sorted(set(names) - stored):
                raise OssgptError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing)")
            if unexpected := sorted(stored - set(names)):
                raise OssgptError(f"{path}: unexpected tensor {unexpected[0]} (does the adapter "
                                  f"fit this model?)")
            with torch.no_grad():
                for name, (p, kind) in names.items():
                    t = f.get_tensor(name)
                    value = _from_peft(t, p, kind) if t.numel() == p.numel() else None
                    if value is None or value.shape != p.shape:
                        raise OssgptError(f"{path}: {name} has shape {tuple(t.shape)}, which does "
                                          f"not fit a rank-{config.rank} adapter of this model")
                    p.copy_(value)
    except OSError as e:
        raise OssgptError(f"{path}: cannot read the adapter weights ({e})") from None
    return config


def _token_tables(indices: object, path: Path) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices (a list: the input embedding's; or {module name: ids})
    -> {"embedding"|"unembedding": ids}."""
    by_module = {peft_name: table for table, (peft_name, _) in PEFT_TABLES.items()}
    if isinstance(indices, list):
        indices = {"embed_tokens": indices}
    if not isinstance(indices, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) for i in v) for v in indices.values()):
        raise OssgptError(f"{path}: trainable_token_indices must be a list of token ids or "
                          f"{{module: [ids]}}")
    if unknown := [k for k in indices if k.rpartition(".")[2] not in by_module]:
        raise OssgptError(f"{path}: trainable tokens of {unknown[0]!r}: only embed_tokens and "
                          f"lm_head are supported")
    return {by_module[k.rpartition(".")[2]]: v for k, v in indices.items()}


# -- merging -------------------------------------------------------------------------------------

@torch.no_grad()
def merge(model: Transformer) -> dict[str, float]:
    """Fold every adapter into its base weights and unwrap it. Packed experts are dequantized,
    updated and re-quantized to MXFP4; -> the re-quantization error (relative Frobenius norm of
    re-quantized minus merged weights, over all experts) and the update's relative size."""
    err2 = norm2 = delta2 = 0.0
    for block in model.blocks:
        for name in _ATTN:
            module = getattr(block.attn, name)
            if isinstance(module, LoRALinear):
                module.base.weight += module.delta().to(module.base.weight.dtype)
                setattr(block.attn, name, module.base)
        if isinstance(block.mlp.router, LoRALinear):
            router = block.mlp.router
            router.base.weight += router.delta().to(router.base.weight.dtype)
            block.mlp.router = router.base
        experts = block.mlp.experts
        if isinstance(experts, LoRAExperts):
            base = experts.base
            for e in range(base.mlp1_bias.shape[0]):
                for m, (w, d) in zip(("mlp1", "mlp2"),
                                     zip(base.weights(e, torch.float32), experts.deltas(e))):
                    merged = w + d.float()
                    delta2 += float(d.float().square().sum())
                    if base.packed:
                        blocks, scales = mxfp4.quantize(merged)
                        getattr(base, f"{m}_blocks")[e] = blocks
                        getattr(base, f"{m}_scales")[e] = scales
                        back = mxfp4.dequantize(blocks, scales, torch.float32)
                        err2 += float((back - merged).square().sum())
                    else:
                        getattr(base, f"{m}_weight")[e] = merged.to(getattr(base, f"{m}_weight").dtype)
                    norm2 += float(merged.square().sum())
            block.mlp.experts = base
    merge_tokens(model)
    model.requires_grad_(False)
    return {"requantization_error": math.sqrt(err2 / norm2) if norm2 else 0.0,
            "expert_update_norm": math.sqrt(delta2 / norm2) if norm2 else 0.0}


# -- serving several adapters on one base ---------------------------------------------------------

class _SwitchLinear(nn.Module):
    """A frozen Linear with several named adapters; `active` picks one (None: the base)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base, self.active = base, None
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, lora: LoRALinear) -> None:
        self.factors[name] = (lora.lora_A.detach(), (lora.lora_B * lora.scale).detach())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active in self.factors:
            a, b = self.factors[self.active]
            y = y + ((x.to(a.dtype) @ a.T) @ b.T).to(y.dtype)
        return y


class _SwitchExperts(_ExpertsWrapper):
    """Packed experts with several named adapters; `active` picks one (None: the base)."""

    def __init__(self, base: Experts) -> None:
        super().__init__()
        self.base, self.active = base, None
        self.factors_by_name: dict[str, tuple[torch.Tensor, ...]] = {}

    def add(self, name: str, lora: LoRAExperts) -> None:
        self.factors_by_name[name] = tuple(t.detach() for t in (
            lora.mlp1_A, lora.mlp1_B * lora.scale, lora.mlp2_A, lora.mlp2_B * lora.scale))

    def factors(self, e: int) -> tuple[torch.Tensor, ...] | None:
        if self.active not in self.factors_by_name:
            return None
        return tuple(t[e] for t in self.factors_by_name[self.active])


def _adapted_slots(model: Transformer):
    yield model, "embedding"
    yield model, "unembedding"
    for block in model.blocks:
        for name in _ATTN:
            yield block.attn, name
        yield block.mlp, "router"
        yield block.mlp, "experts"


def load_adapters(model: Transformer, adapters: dict[str, str | os.PathLike]) -> None:
    """Attach several PEFT adapters to one base model, to be switched per forward pass with
    `set_adapter` (the server does it per batch); the base is shared, not copied."""
    switches: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for name, path in adapters.items():
        load_adapter(model, path)
        for parent, attr in _adapted_slots(model):
            module = getattr(parent, attr)
            if isinstance(module, (LoRALinear, LoRAExperts, TrainableRows)):
                kind = (_SwitchLinear if isinstance(module, LoRALinear) else
                        _SwitchExperts if isinstance(module, LoRAExperts) else SwitchRows)
                switch = switches.setdefault((id(parent), attr), (parent, attr, kind(module.base)))[2]
                switch.add(name, module)
                setattr(parent, attr, module.base)   # plain again for the next adapter
    for parent, attr, switch in switches.values():
        setattr(parent, attr, switch)
    model.adapters = list(adapters)


def set_adapter(model: Transformer, name: str | None) -> None:
    for module in model.modules():
        if isinstance(module, (_SwitchLinear, _SwitchExperts, SwitchRows)):
            module.active = name
