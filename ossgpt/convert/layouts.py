"""Checkpoints rewritten in the other official layout, or made from a GGUF.

Between the layouts nothing is recomputed: each tensor keeps its bytes and its dtype (the
original layout's float32 norm scales stay float32 in the HF layout, which transformers and
ossgpt load as they load bf16 ones), only names, the fused qkv and the dense experts'
orientation change; so original -> HF -> original gives back every tensor byte for byte. A
compact vocabulary (the bundled nano) is expanded to the full tables the layouts define."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint.save import write_checkpoint
from ..checkpoint.tensors import Checkpoint
from ..files import atomic_directory
from .gguf import GGUFModel


def convert_layout(src: Checkpoint, output: str | os.PathLike, fmt: str, progress: bool = True) -> Path:
    """`src` rewritten in layout `fmt` at `output` (written beside it, renamed when complete)."""
    dtypes = {name: src.dtype(name) for name in src.names()}
    with atomic_directory(output) as tmp:
        write_checkpoint(tmp, src.config, src.get, fmt, packed=src.packed, dtypes=dtypes,
                         progress=progress, desc=f"Converting to {fmt}")
    return Path(output)


def from_gguf(src: GGUFModel, output: str | os.PathLike, fmt: str, progress: bool = True) -> Path:
    """A gpt-oss GGUF as a checkpoint in layout `fmt`: MXFP4 experts where the GGUF's are MXFP4,
    float32 tensors float32, the rest bf16."""
    with atomic_directory(output) as tmp:
        write_checkpoint(tmp, src.config, src.get, fmt, packed=src.packed, dtypes=src.dtypes(),
                         progress=progress, desc=f"Converting to {fmt}")
    return Path(output)
