"""Run a merge tensor by tensor into a new checkpoint.

The checkpoint writer asks for one output tensor at a time (checkpoint/save.py streams them to
disk), and each is merged as it is asked for, in float32, in units (methods.py):
- MoE experts one expert at a time: its dequantized mlp1 or mlp2 matrix is one unit, and the
  merged expert is re-quantized to MXFP4 (or kept bf16), the error measured as it goes;
- each expert's router row, and each expert's bias row, is a unit of its own: an expert's
  routing key moves with the expert, never mixed into other experts' statistics;
- the vocabulary tables a token row at a time (read 8192 rows at a time);
- every other tensor (attention, norms, sinks, router bias) whole.
Memory is therefore set by one expert or one block of vocabulary rows per model, plus the
output tensor being written: the same for gpt-oss-120b as for gpt-oss-20b.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from .. import mxfp4
from ..checkpoint.formats import ORIGINAL
from ..checkpoint.load import VOCAB_TABLES
from ..checkpoint.save import write_checkpoint
from ..files import atomic_directory, write_atomic
from . import methods
from .config import Plan, read
from .sources import Index

REPORT = "merge_report.json"
VOCAB_ROWS = 8192      # vocabulary rows read at a time (20b: 8192 x 2880 float32 = 94 MB a model)


def _row_units(name: str) -> bool:
    """Tensors merged row by row: vocabulary tables, router rows, expert bias rows."""
    return name in VOCAB_TABLES or name.endswith("mlp.router.weight") or (
        ".experts." in name and name.endswith("_bias"))


class Merger:
    """`get(name)`: the merged tensor for the checkpoint writer, by the output model's names."""

    def __init__(self, plan: Plan, seed: int = 0, out_dtype: torch.dtype = torch.bfloat16,
                 progress: bool = True):
        self.plan, self.seed, self.out_dtype, self.progress = plan, seed, out_dtype, progress
        self.requantization: dict[str, float] = {}   # expert tensor -> relative error
        self._pending: dict[str, torch.Tensor] = {}

    # -- one unit --------------------------------------------------------------------------------

    def merge(self, name: str, index: Index = None) -> torch.Tensor:
        """Model tensor `name` (or its `index` along dim 0) merged, float32."""
        plan = self.plan
        if plan.method == "linear":
            inputs = [m.tensor(name, index) for m in plan.models]
            shape = inputs[0].shape
            out = methods.linear(self._units(name, inputs), plan.weights(name),
                                 bool(plan.value(plan.parameters["normalize"], name)))
        elif plan.method == "slerp":
            a, b = plan.base.tensor(name, index), plan.models[0].tensor(name, index)
            shape = a.shape
            out = methods.slerp(plan.value(plan.parameters["t"], name), *self._units(name, [a, b]))
        else:
            base = plan.base.tensor(name, index)
            shape = base.shape
            deltas = self._units(name, [m.delta_over(plan.base, base, name, index) for m in plan.models])
            base, = self._units(name, [base])
            weights = plan.weights(name)
            lam = plan.value(plan.parameters["lambda"], name)
            normalize = bool(plan.value(plan.parameters["normalize"], name))
            if plan.method == "task_arithmetic":
                out = methods.task_arithmetic(base, deltas, weights, lam, normalize)
            elif plan.method == "ties":
                out = methods.ties(base, deltas, weights, plan.densities(name), lam, normalize)
            else:
                generators = [self._generator(name, index, i) for i in range(len(deltas))]
                out = methods.dare(base, deltas, weights, plan.densities(name), generators, lam,
                                   sign_consensus=plan.method == "dare_ties", normalize=normalize)
        return out.reshape(shape)

    @staticmethod
    def _units(name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        rows = _row_units(name) and tensors[0].dim() > 1
        return [t.reshape(t.shape[0] if rows else 1, -1) for t in tensors]

    def _generator(self, name: str, index: Index, model: int) -> torch.Generator:
        """DARE's random drops: seeded by (seed, tensor, expert or first row, model) alone, so
        a merge is reproducible whatever order or machine it runs in."""
        where = index.start if isinstance(index, slice) else index
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{name}/{where}/{model}".encode()))

    # -- whole tensors, as the writer asks for them ---------------------------------------------

    def get(self, name: str) -> torch.Tensor:
        if name in self._pending:
            return self._pending.pop(name)
        if name.endswith(("_blocks", "_scales")):      # both made at once; the other kept
            stem = name.rsplit("_", 1)[0]
            self._pending[f"{stem}_blocks"], self._pending[f"{stem}_scales"] = self._experts_mxfp4(stem)
            return self._pending.pop(name)
        config = self.plan.config
        if ".experts." in name and name.endswith("_weight"):
            out = torch.empty(self._shape(name), dtype=self.out_dtype)
            for e in range(config.num_experts):
                out[e] = self.merge(name, e)
            return out
        if name in VOCAB_TABLES:
            out = torch.empty(self._shape(name), dtype=self.out_dtype)
            for r in range(0, config.vocab_size, VOCAB_ROWS):
                rows = slice(r, min(r + VOCAB_ROWS, config.vocab_size))
                out[rows] = self.merge(name, rows)
            return out
        return self.merge(name)

    def _shape(self, name: str) -> tuple[int, ...]:
        C, I, E = self.plan.config.hidden_size, self.plan.config.intermediate_size, self.plan.config.num_experts
        if name in VOCAB_TABLES:
            return (self.plan.config.vocab_size, C)
        return (E, 2 * I, C) if "mlp1" in name else (E, C, I)

    def _experts_mxfp4(self, stem: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert of `stem` (blocks.N.mlp.experts.mlp1) merged and re-quantized; the
        relative error ||Q(W) - W|| / ||W|| over all of them is recorded and reported."""
        name = f"{stem}_weight"
        shape = self._shape(name)
        blocks = torch.empty(shape[:-1] + (shape[-1] // mxfp4.BLOCK, mxfp4.BLOCK // 2), dtype=torch.uint8)
        scales = torch.empty(shape[:-1] + (shape[-1] // mxfp4.BLOCK,), dtype=torch.uint8)
        err2 = norm2 = 0.0
        for e in range(shape[0]):
            w = self.merge(name, e)
            blocks[e], scales[e] = mxfp4.quantize(w)
            back = mxfp4.dequantize(blocks[e], scales[e], torch.float32)
            err2 += float((back - w).double().square().sum())
            norm2 += float(w.double().square().sum())
        error = math.sqrt(err2 / norm2) if norm2 else 0.0
        self.requantization[name] = error
        if self.progress:
            tqdm.write(f"  {stem}: MXFP4 re-quantization error {error:.2e} (relative)")
        return blocks, scales


def run(config_path: str | os.PathLike, output: str | os.PathLike, layout: str = ORIGINAL,
        experts_dtype: str = "mxfp4", seed: int = 0, progress: bool = True) -> dict:
    """Merge as the config says into a new checkpoint at `output` (written beside it and renamed
    when complete); -> the report also saved as output/merge_report.json."""
    plan = read(config_path)
    merger = Merger(plan, seed, progress=progress)
    with atomic_directory(output) as tmp:
        write_checkpoint(tmp, plan.config, merger.get, layout, packed=experts_dtype == "mxfp4",
                         progress=progress, desc=f"Merging ({plan.method})")
        errors = merger.requantization
        report = {"merge_method": plan.method, "config": plan.raw, "seed": seed, "layout": layout,
                  "experts": experts_dtype, "models": [str(m) for m in plan.models],
                  "base_model": str(plan.base) if plan.base else None,
                  "requantization_error": errors,
                  "requantization_error_max": max(errors.values(), default=0.0)}
        write_atomic(Path(tmp) / REPORT, json.dumps(report, indent=2) + "\n")
    return report
