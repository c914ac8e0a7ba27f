"""Model configuration: one dataclass whose field names are those of the official
`original/config.json`, plus a reader for the Hugging Face `config.json` of the same model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OssgptError


class ConfigError(OssgptError, ValueError):
    """A config.json that cannot describe a gpt-oss model."""


_INT_FIELDS = {"num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
               "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
               "num_key_value_heads", "sliding_window", "initial_context_length"}
_FLOAT_FIELDS = {"swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
                 "rope_ntk_beta", "rms_norm_eps"}


@dataclass
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5
    # Not in the official config: gpt-oss alternates sliding (even) and full (odd) layers.
    # Kept explicit so a config can say otherwise, as HF's `layer_types` can.
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _INT_FIELDS:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    problems.append(f"{f.name} must be a positive integer, got {value!r}")
            elif f.name in _FLOAT_FIELDS:
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value <= 0):
                    problems.append(f"{f.name} must be a positive number, got {value!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.experts_per_token > self.num_experts:
            problems.append("experts_per_token must not exceed num_experts")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            problems.append("hidden_size and intermediate_size must be multiples of 32 (MXFP4 blocks)")
        if self.head_dim % 2:
            problems.append("head_dim must be even (rotary embedding)")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            problems.append("layer_types must have one entry per layer")
        elif any(t not in ("sliding_attention", "full_attention") for t in self.layer_types):
            problems.append("layer_types entries must be 'sliding_attention' or 'full_attention'")
        if problems:
            raise ConfigError("; ".join(problems))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an official or a Hugging Face config dict; unknown keys are ignored."""
        if d.get("model_type") == "gpt_oss" or "num_local_experts" in d:
            d = _hf_to_original(d)
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """`20b`, `120b`, or `tiny` (a small config of the same architecture, for tests)."""
        if name == "20b":
            return cls()
        if name == "120b":
            return cls(num_hidden_layers=36, num_experts=128)
        if name == "tiny":
            return cls(num_hidden_layers=4, num_experts=4, experts_per_token=2, vocab_size=201088,
                       hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                       num_key_value_heads=2)
        raise ConfigError(f"unknown preset {name!r}; choose 20b, 120b or tiny")

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The official `original/config.json` contents."""
        d = dataclasses.asdict(self)
        if d["layer_types"] == ModelConfig(num_hidden_layers=self.num_hidden_layers).layer_types:
            del d["layer_types"]
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` contents (as in the openai/gpt-oss-* repositories)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "truncate": False,
                "original_max_position_embeddings": self.initial_context_length,
            },
            "max_position_embeddings": int(self.initial_context_length * self.rope_scaling_factor),
            "initial_context_length": self.initial_context_length,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router",
                    "model.embed_tokens", "lm_head",
                ],
            },
        }

    @property
    def context_length(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)


def _hf_to_original(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    renames = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}
    for hf, ours in renames.items():
        if hf in d:
            out[ours] = d[hf]
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside) instead.
    rs = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise ConfigError("rope_scaling must be an object")
    rope_type = rs.get("rope_type", rs.get("type", "yarn"))
    if rope_type not in ("yarn", "default"):
        raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported (gpt-oss uses yarn)")
    for hf, ours in (("factor", "rope_scaling_factor"), ("beta_fast", "rope_ntk_beta"),
                     ("beta_slow", "rope_ntk_alpha"),
                     ("original_max_position_embeddings", "initial_context_length")):
        if hf in rs:
            out[ours] = rs[hf]
    if "rope_theta" in rs and "rope_theta" not in d:
        out["rope_theta"] = rs["rope_theta"]
    if rope_type != "yarn" or "factor" not in rs:
        out["rope_scaling_factor"] = 1.0
    return out
