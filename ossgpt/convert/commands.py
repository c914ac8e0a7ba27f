"""The `ossgpt convert` command (cli.py reads its signature and docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OssgptError

TARGETS = ("original", "hf", "gguf")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def convert(source: str, /, to: str, output: str, from_: str | None = None,
            outtype: str = "bf16") -> None:
    """Convert a gpt-oss checkpoint between the original/ and Hugging Face layouts (losslessly:
    every tensor keeps its bytes), to GGUF for llama.cpp, Ollama and LM Studio, or a gpt-oss
    GGUF back to a checkpoint.

    source: checkpoint directory (either layout), hub id, nano, or a .gguf file
    to: original, hf or gguf
    output: the checkpoint directory (must not exist) or .gguf file to write; written beside it and renamed when complete
    from_: gguf to read SOURCE as a GGUF file (the default when it is one)
    outtype: for GGUF: bf16 or q8_0, the attention and vocabulary tables (experts stay MXFP4; norms, biases, sinks and router float32)"""
    from ..checkpoint.tensors import Checkpoint
    from .gguf import OUTTYPES, GGUFModel, write_gguf
    from .layouts import convert_layout, from_gguf

    if to not in TARGETS:
        raise OssgptError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if from_ not in (None, "gguf"):
        raise OssgptError(f"--from must be gguf (or left out for a checkpoint), got {from_!r}")
    if outtype not in OUTTYPES:
        raise OssgptError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if from_ == "gguf" or _is_gguf(Path(source)):
        if to == "gguf":
            raise OssgptError(f"{source} is already a GGUF")
        src = GGUFModel(source)
        from_gguf(src, output, to)
        what = f"{src.config.num_hidden_layers}-layer gpt-oss GGUF"
    else:
        src = Checkpoint(source)
        if to == "gguf":
            write_gguf(src, output, outtype)
        else:
            convert_layout(src, output, to)
        what = f"{src.fmt} layout checkpoint"
    print(f"converted {source} ({what}) to {to}: {output}", file=sys.stderr)
