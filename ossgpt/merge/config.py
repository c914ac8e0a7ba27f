"""The merge config, in mergekit's shape, read and checked before anything is merged:

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, slerp
    base_model: openai/gpt-oss-20b
    models:
      - model: runs/math/adapter  # a checkpoint, a hub id, nano, or a LoRA adapter directory
        parameters: {weight: 0.7, density: 0.5}
      - model: ~/models/gpt-oss-20b-chem
        parameters: {weight: 0.3, density: 0.5}
    parameters: {lambda: 1.0, normalize: true}   # defaults for every model, and the method's own

A parameter is a number; a list of numbers, a gradient spread over the layers (first layer to
last, as mergekit reads it); or a list of `{filter: TEXT, value: ...}`, the first whose filter
is part of the tensor's Hugging Face name (`self_attn`, `mlp.experts`, `mlp.router`, ...)
applying, and one without a filter as the default.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import formats
from ..checkpoint.tensors import Checkpoint
from ..config import ModelConfig
from ..errors import OssgptError
from .sources import Adapter, Model, is_adapter

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
# Per method: parameters each model must have, and the method's own with their defaults
# (None: required). `normalize` defaults as in mergekit.
MODEL_PARAMETERS = {"linear": ("weight",), "task_arithmetic": ("weight",),
                    "ties": ("weight", "density"), "dare_linear": ("weight", "density"),
                    "dare_ties": ("weight", "density"), "slerp": ()}
METHOD_PARAMETERS = {"linear": {"normalize": True},
                     "task_arithmetic": {"lambda": 1.0, "normalize": False},
                     "ties": {"lambda": 1.0, "normalize": True},
                     "dare_linear": {"lambda": 1.0, "normalize": False},
                     "dare_ties": {"lambda": 1.0, "normalize": False},
                     "slerp": {"t": None}}
# The fields that fix a tensor's shape: models must agree on them.
SHAPE_FIELDS = ("num_hidden_layers", "num_experts", "vocab_size", "hidden_size",
                "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")


class MergeConfigError(OssgptError):
    pass


@dataclass
class Plan:
    method: str
    models: list[Model]                  # the models merged (the base model excluded)
    base: Model | None
    model_parameters: list[dict[str, Any]]   # per model: name -> raw value
    parameters: dict[str, Any]               # the method's own: name -> raw value
    config: ModelConfig                      # of the output (the base's, else the first model's)
    raw: dict = field(default_factory=dict)

    @functools.cached_property
    def hf_names(self) -> dict[str, str]:
        """Model tensor name -> its transformers name, which filters match."""
        return {ours: src.name for ours, src in formats.hf_table(self.config, packed=False).items()}

    def value(self, raw: Any, name: str) -> float:
        """A parameter's value for model tensor `name` (filters, layer gradients)."""
        return resolve(raw, name, self.hf_names[name], self.config.num_hidden_layers)

    def weights(self, name: str) -> list[float]:
        return [self.value(p["weight"], name) for p in self.model_parameters]

    def densities(self, name: str) -> list[float]:
        return [self.value(p["density"], name) for p in self.model_parameters]


def resolve(raw: Any, name: str, hf_name: str, layers: int) -> float:
    """A checked parameter (`_check_value`) for model tensor `name` of a `layers`-layer model."""
    if isinstance(raw, (int, float)):
        return raw
    if all(isinstance(item, dict) for item in raw):
        for item in raw:
            if "filter" not in item or item["filter"] in hf_name:
                return resolve(item["value"], name, hf_name, layers)
        raise AssertionError("checked: a filtered parameter has a default")
    # a gradient: the layers spread evenly from its first value to its last; the embedding
    # takes the first, the final norm and unembedding the last
    parts = name.split(".")
    where = (int(parts[1]) / max(1, layers - 1) if parts[0] == "blocks"
             else 0.0 if name.startswith("embedding") else 1.0)
    x = where * (len(raw) - 1)
    i = min(int(x), len(raw) - 2)
    return raw[i] + (x - i) * (raw[i + 1] - raw[i])


def _check_value(raw: Any, where: str) -> None:
    """A number, a non-empty list of numbers, or filtered entries with one default."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if number(raw) or isinstance(raw, bool):
        return
    if isinstance(raw, list) and raw and all(number(v) for v in raw):
        if len(raw) == 1:
            raise MergeConfigError(f"{where}: a gradient needs at least two values, got {raw}")
        return
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        for i, item in enumerate(raw):
            if set(item) - {"filter", "value"} or "value" not in item:
                raise MergeConfigError(f"{where}[{i}]: expected {{filter: TEXT, value: ...}}, got {item}")
            _check_value(item["value"], f"{where}[{i}].value")
        if all("filter" in item for item in raw):
            raise MergeConfigError(f"{where}: filtered values need a default (an entry without a filter)")
        return
    raise MergeConfigError(f"{where}: expected a number, a list of numbers or filtered values, got {raw!r}")


def _check_range(name: str, raw: Any, where: str) -> None:
    """density and t are fractions: every value they can take must be in [0, 1]."""
    if name not in ("density", "t"):
        return
    values = [raw] if not isinstance(raw, list) else raw
    for v in values:
        if isinstance(v, dict):
            _check_range(name, v["value"], where)
        elif not 0 <= v <= 1 or (name == "density" and v == 0):
            raise MergeConfigError(f"{where}: {name} must be in {'(0, 1]' if name == 'density' else '[0, 1]'}, got {v}")


def read(path: str | Path) -> Plan:
    """Read and check a merge config: the method, every parameter, and that every model opens
    and has the base's shape. Raises MergeConfigError (one line, naming the file) otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise MergeConfigError(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise MergeConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{path}: expected a mapping with merge_method and models")
    if "slices" in raw:
        raise MergeConfigError(f"{path}: slices are not supported; list the models under `models`")
    # mergekit's dtype and tokenizer keys mean nothing here (merges compute in float32; every
    # gpt-oss model has the o200k_harmony tokenizer), so configs written for it still read
    if unknown := sorted(set(raw) - {"merge_method", "base_model", "models", "parameters", "dtype",
                                     "tokenizer_source", "tokenizer"}):
        raise MergeConfigError(f"{path}: unknown key {unknown[0]!r}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise MergeConfigError(f"{path}: merge_method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeConfigError(f"{path}: `models` must be a list of {{model: PATH, parameters: ...}}")
    defaults = raw.get("parameters") or {}
    if not isinstance(defaults, dict):
        raise MergeConfigError(f"{path}: parameters: expected a mapping")
    allowed = set(MODEL_PARAMETERS[method]) | set(METHOD_PARAMETERS[method])
    for key, value in defaults.items():
        if key not in allowed:
            raise MergeConfigError(f"{path}: parameters.{key} is not a parameter of {method} "
                                   f"(it takes {', '.join(sorted(allowed))})")
        _check_value(value, f"{path}: parameters.{key}")
        _check_range(key, value, f"{path}: parameters.{key}")

    base_ref = raw.get("base_model")
    if method != "linear" and base_ref is None:
        raise MergeConfigError(f"{path}: {method} needs a base_model")
    opened: dict[str, Model] = {}

    def open_model(ref: Any, where: str) -> Model:
        if not isinstance(ref, str) or not ref:
            raise MergeConfigError(f"{path}: {where}: expected a path, hub id or nano, got {ref!r}")
        if ref not in opened:
            try:
                opened[ref] = Model(Checkpoint(ref))
            except OssgptError as e:
                raise MergeConfigError(f"{path}: {where}: {e}") from None
        return opened[ref]

    base = open_model(base_ref, "base_model") if base_ref is not None else None
    models, model_parameters = [], []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise MergeConfigError(f"{path}: {where}: expected {{model: PATH, parameters: ...}}, got {entry!r}")
        ref = entry["model"]
        if ref == base_ref and method != "linear":
            continue        # the base's own task vector is zero (mergekit skips it too)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeConfigError(f"{path}: {where}.parameters: expected a mapping")
        for key, value in params.items():
            if key not in MODEL_PARAMETERS[method]:
                raise MergeConfigError(f"{path}: {where}.parameters.{key} is not a per-model parameter "
                                       f"of {method} (it takes {', '.join(MODEL_PARAMETERS[method]) or 'none'})")
            _check_value(value, f"{path}: {where}.parameters.{key}")
            _check_range(key, value, f"{path}: {where}.parameters.{key}")
        params = {**{k: v for k, v in defaults.items() if k in MODEL_PARAMETERS[method]}, **params}
        for key in MODEL_PARAMETERS[method]:
            if key not in params:
                raise MergeConfigError(f"{path}: {where} ({ref}) is missing parameter {key!r}, "
                                       f"which {method} needs")
        if isinstance(ref, str) and is_adapter(ref):
            adapter_base = base if base is not None else open_model(_adapter_base(ref, path), f"{where}'s base model")
            try:
                model = Adapter(adapter_base, ref)
            except OssgptError as e:
                raise MergeConfigError(f"{path}: {where}: {e}") from None
        else:
            model = open_model(ref, where)
        models.append(model)
        model_parameters.append(params)
    if method == "slerp" and (base is None or len(models) != 1):
        raise MergeConfigError(f"{path}: slerp interpolates between base_model and exactly one other model, "
                               f"got {len(models)} besides the base")
    if not models:
        raise MergeConfigError(f"{path}: no models to merge besides the base model")
    parameters = {k: defaults.get(k, d) for k, d in METHOD_PARAMETERS[method].items()}
    for key, value in parameters.items():
        if value is None:
            raise MergeConfigError(f"{path}: {method} is missing parameter {key!r} (under `parameters`)")

    reference = base or models[0]
    for model in models:
        for f in SHAPE_FIELDS:
            ours, theirs = getattr(model.config, f), getattr(reference.config, f)
            if ours != theirs:
                raise MergeConfigError(
                    f"{path}: models of different shapes: {model} has {f} {ours}, "
                    f"{'base_model' if base else 'models[0]'} {reference} has {theirs}")
    return Plan(method, models, base, model_parameters, parameters, reference.config, raw)


def _adapter_base(ref: str, path: Path) -> str:
    """An adapter's base model when the config names none: its adapter_config.json's."""
    from ..lora import read_adapter_config

    base = read_adapter_config(ref).extra.get("base_model_name_or_path")
    if not base:
        raise MergeConfigError(f"{path}: {ref} is a LoRA adapter whose adapter_config.json names no "
                               f"base model: give base_model in the merge config")
    return base
