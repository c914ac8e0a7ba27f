"""What a merge reads: checkpoints, and LoRA adapters as task vectors over their base.

Tensors are asked for by the names of a model with dense experts (`blocks.N.mlp.experts.mlp1_weight`
and so on), one expert or some vocabulary rows at a time, in float32: MXFP4 experts come back
dequantized (exactly), whatever layout or expert format the checkpoint stores."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint.tensors import Checkpoint
from ..lora import ADAPTER_CONFIG, LoRAExperts, LoRALinear, load_adapter
from ..model import Transformer

Index = int | slice | None


def expert_part(name: str) -> tuple[int, str] | None:
    """`blocks.N.mlp.experts.mlp1_weight` -> (N, "mlp1"); None for other names."""
    parts = name.split(".")
    if len(parts) == 5 and parts[3] == "experts" and parts[4].endswith("_weight"):
        return int(parts[1]), parts[4].removesuffix("_weight")
    return None


class Model:
    """A checkpoint."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.config = checkpoint.config

    def __str__(self) -> str:
        return str(self.checkpoint)

    def tensor(self, name: str, index: Index = None) -> torch.Tensor:
        expert = expert_part(name)
        if expert is not None:
            return self.checkpoint.expert(*expert, index)
        return self.checkpoint.get(name, index).float()

    def delta_over(self, base: "Model", base_value: torch.Tensor, name: str,
                   index: Index = None) -> torch.Tensor:
        """This model minus `base`, whose tensor is `base_value` (the task vector)."""
        return self.tensor(name, index) - base_value


class Adapter(Model):
    """A PEFT LoRA adapter over `base`: the base's tensors plus the adapter's low-rank updates,
    computed as `lora.merge` (merge-adapter) computes them, so a merge at weight 1 reproduces
    merge-adapter's checkpoint. Its task vector over its own base is the update itself."""

    def __init__(self, base: Model, directory: str | os.PathLike):
        super().__init__(base.checkpoint)
        self.base, self.directory = base, Path(directory)
        with torch.device("meta"):     # names and shapes only: the adapter's factors are real
            net = Transformer(base.config, packed_experts=True)
        load_adapter(net, directory)
        self.linear: dict[str, LoRALinear] = {}
        self.experts: dict[str, LoRAExperts] = {}
        for module_name, module in net.named_modules():
            if isinstance(module, LoRALinear):
                self.linear[f"{module_name}.weight"] = module
            elif isinstance(module, LoRAExperts):
                self.experts[module_name] = module

    def __str__(self) -> str:
        return f"{self.directory} (LoRA over {self.base})"

    def update(self, name: str, index: Index = None) -> torch.Tensor | None:
        """The adapter's update of tensor `name` (None where it has none)."""
        with torch.no_grad():
            if name in self.linear:
                d = self.linear[name].delta()
                return d if index is None else d[index]
            expert = expert_part(name)
            if expert is not None and (parent := f"blocks.{expert[0]}.mlp.experts") in self.experts:
                return self.experts[parent].deltas(index)[0 if expert[1] == "mlp1" else 1]
        return None

    def tensor(self, name: str, index: Index = None) -> torch.Tensor:
        t = self.base.tensor(name, index)
        d = self.update(name, index)
        return t if d is None else t + d

    def delta_over(self, base: Model, base_value: torch.Tensor, name: str,
                   index: Index = None) -> torch.Tensor:
        if base.checkpoint.directory != self.base.checkpoint.directory:
            return super().delta_over(base, base_value, name, index)
        d = self.update(name, index)
        return torch.zeros_like(base_value) if d is None else d


def is_adapter(ref: str) -> bool:
    return (Path(ref).expanduser() / ADAPTER_CONFIG).is_file()
