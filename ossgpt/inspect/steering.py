"""Steering vectors: built from two contrasting sets of prompts (the difference of the means of
their residual streams at a layer, as in Rimsky et al. 2024, "Steering Llama 2 via Contrastive
Activation Addition", and Arditi et al. 2024's refusal direction), saved and loaded as
safetensors, and applied with `--steer FILE:LAYER:SCALE` (generate, chat, serve)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..files import write_atomic
from ..model import Transformer
from .interventions import steer
from .trace import InspectError, Trace, check_layers, run

POSITIONS = ("mean", "last")


@dataclass
class SteeringVector:
    vector: torch.Tensor                 # (C,) float32
    layer: int                           # added to the residual stream after this block
    info: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: the tensor `vector`, the layer and `info` in its metadata."""
        meta = {"layer": str(self.layer), "info": json.dumps(self.info)}
        write_atomic(path, save_bytes({"vector": self.vector.float().contiguous()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        path = Path(path)
        try:
            data = path.read_bytes()
            tensors = load_bytes(data)
            meta = _metadata(data)
        except FileNotFoundError:
            raise InspectError(f"{path}: no such steering vector file") from None
        except (SafetensorError, ValueError, OSError) as e:
            raise InspectError(f"{path}: not a safetensors steering vector ({e})") from None
        if "vector" not in tensors or tensors["vector"].ndim != 1:
            raise InspectError(f"{path}: a steering vector file holds one 1-D tensor named 'vector'")
        try:
            layer = int(meta.get("layer", ""))
            info = json.loads(meta.get("info", "{}"))
        except ValueError:
            raise InspectError(f"{path}: its metadata has no integer 'layer'") from None
        return cls(tensors["vector"].float(), layer, info)


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file's header (8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def prompt_residuals(model: Transformer, prompts: Sequence[Sequence[int]], layer: int,
                     position: str = "mean") -> torch.Tensor:
    """Each prompt's residual stream after block `layer`, at its last token (`position="last"`)
    or averaged over its tokens ("mean"). -> (N, C) float64, on the CPU."""
    if position not in POSITIONS:
        raise InspectError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    (layer,) = check_layers(model, layer)
    rows = []
    for start in range(0, len(prompts), 8):             # batches of 8 bound the memory
        with Trace(model, layers=[layer], record=("residual",)) as trace:
            _, positions = run(model, prompts[start:start + 8])
        h = trace["residual", layer].double()                               # (B, T, C)
        real = (positions >= 0).to(h.device)
        rows.append(h[:, -1] if position == "last" else (h * real[..., None]).sum(1) / real.sum(1, keepdim=True))
    return torch.cat(rows)


def mean_residual(model: Transformer, prompts: Sequence[Sequence[int]], layer: int,
                  position: str = "mean") -> torch.Tensor:
    """The mean over prompts of prompt_residuals. -> (C,) float32."""
    return prompt_residuals(model, prompts, layer, position).mean(0).float()


def difference_of_means(model: Transformer, positive: Sequence[Sequence[int]],
                        negative: Sequence[Sequence[int]], layer: int,
                        position: str = "mean") -> torch.Tensor:
    """mean_residual(positive) - mean_residual(negative): the direction from the second set's
    activations towards the first's. -> (C,) float32."""
    if not positive or not negative:
        raise InspectError("a steering vector needs at least one prompt on each side")
    return (mean_residual(model, positive, layer, position)
            - mean_residual(model, negative, layer, position))


def parse_spec(spec: str) -> tuple[Path, int | None, float]:
    """`FILE:LAYER:SCALE`; an empty or missing LAYER is the file's own, SCALE defaults to 1."""
    path, layer, scale = (spec.rsplit(":", 2) + ["", ""])[:3]
    try:
        return Path(path), (int(layer) if layer else None), (float(scale) if scale else 1.0)
    except ValueError:
        raise InspectError(f"--steer {spec!r}: expected FILE:LAYER:SCALE, e.g. "
                           "refusal.safetensors:12:-4") from None


@dataclass
class Steer:
    """One `--steer` spec, read: add `scale * vector.vector` after block `layer`."""
    vector: SteeringVector
    layer: int
    scale: float
    name: str

    def __str__(self) -> str:
        return f"steering: {self.name} x {self.scale:g} after block {self.layer}"


def read_specs(specs: Sequence[str]) -> list[Steer]:
    """Parse and load `--steer` specs (before a model loads, so a bad one fails fast)."""
    steers = []
    for spec in specs:
        path, layer, scale = parse_spec(spec)
        vec = SteeringVector.load(path)
        steers.append(Steer(vec, vec.layer if layer is None else layer, scale, path.name))
    return steers


@contextmanager
def steering(model: Transformer, specs: Sequence[str | Steer]) -> Iterator[list[Steer]]:
    """Apply every `--steer` spec (or read Steer) for the duration; yields them."""
    steers = [s for s in specs if isinstance(s, Steer)] + read_specs([s for s in specs if isinstance(s, str)])
    with ExitStack() as stack:
        for s in steers:
            stack.enter_context(steer(model, s.vector.vector, s.layer, s.scale))
        yield steers
