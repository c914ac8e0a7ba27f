"""A checkpoint read one tensor (or one expert, or some rows) at a time by the model's names,
without building the model: what `ossgpt merge` and `ossgpt convert` stream through, so their
memory is set by the largest tensor, not by the checkpoint."""

from __future__ import annotations

import os

import torch

from .. import mxfp4
from ..config import ConfigError, ModelConfig
from ..model import Transformer
from .load import (COMPACT_IDS, VOCAB_TABLES, CheckpointError, TensorFiles, check_tensors,
                   expand_vocab, is_packed, read_tensor, resolve)

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
          "F64": torch.float64, "U8": torch.uint8}


class Checkpoint:
    """A gpt-oss checkpoint (either layout, MXFP4 or dense experts), checked on opening as
    `load` checks it; tensors come back in the model's layout (`formats.py`'s names and
    orientation) and in the dtype they are stored in."""

    def __init__(self, ref: str | os.PathLike):
        self.directory, self.fmt = resolve(ref)
        try:
            self.config = ModelConfig.from_file(self.directory / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.files = TensorFiles(self.directory)
        self.packed = is_packed(self.files, self.fmt)
        with torch.device("meta"):
            meta = Transformer(self.config, packed_experts=self.packed).state_dict()
        self.table = check_tensors(self.files, self.fmt, self.config, meta)
        self._vocab: dict[str, torch.Tensor] | None = None

    def __str__(self) -> str:
        return str(self.directory)

    @property
    def compact(self) -> bool:
        """Whether the vocabulary tables are stored compact (the bundled nano; compact_vocab.py)."""
        return COMPACT_IDS in self.files.names()

    def names(self) -> list[str]:
        """The model's state-dict names, in the checkpoint format's order."""
        return list(self.table)

    def dtype(self, name: str) -> torch.dtype:
        if self.compact and name in VOCAB_TABLES:
            return self._tables()[name].dtype
        return DTYPES[self.files.dtype(self.table[name].name)]

    def get(self, name: str, index: int | slice | None = None) -> torch.Tensor:
        """Model tensor `name` (or its `index` along dim 0: an expert, some vocabulary rows)."""
        if self.compact and name in VOCAB_TABLES:
            t = self._tables()[name]
            return t if index is None else t[index]
        src = self.table[name]
        if index is None or src.rows is not None:   # (original's fused qkv: small, read whole)
            t = read_tensor(self.files, src)
            return t if index is None else t[index]
        t = self.files.get(src.name, index)
        return t.transpose(-1, -2) if src.transpose else t

    def expert(self, layer: int, m: str, e: int) -> torch.Tensor:
        """Expert e's `m` ("mlp1" (2I, C) or "mlp2" (C, I)) weight in float32, dequantized
        (exactly: every MXFP4 value is a float32)."""
        base = f"blocks.{layer}.mlp.experts.{m}"
        if self.packed:
            return mxfp4.dequantize(self.get(f"{base}_blocks", e), self.get(f"{base}_scales", e),
                                    torch.float32)
        return self.get(f"{base}_weight", e).float()

    def _tables(self) -> dict[str, torch.Tensor]:
        if self._vocab is None:
            self._vocab = expand_vocab(self.files, self.table, self.config)
        return self._vocab
