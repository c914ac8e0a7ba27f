"""The `ossgpt merge` command (cli.py reads its signature and docstring)."""

from __future__ import annotations

import sys

from ..errors import OssgptError


def merge(config: str, /, output: str, layout: str = "original", experts_dtype: str = "mxfp4",
          seed: int = 0) -> None:
    """Merge gpt-oss checkpoints and LoRA adapters as a mergekit-style YAML config says
    (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp), expert by expert, streaming
    tensor by tensor into a new checkpoint.

    config: the merge config: merge_method, base_model, models (checkpoints, hub ids, nano or LoRA adapter directories) with their parameters (weight, density), and the method's parameters (t, lambda, normalize)
    output: directory for the merged checkpoint (must not exist; written beside it, renamed when complete)
    layout: original or hf
    experts_dtype: mxfp4 (re-quantized, the error reported per tensor) or bf16
    seed: seed of DARE's random drops"""
    from .driver import REPORT, run

    if layout not in ("original", "hf"):
        raise OssgptError(f"--layout must be original or hf, got {layout!r}")
    if experts_dtype not in ("mxfp4", "bf16"):
        raise OssgptError(f"--experts-dtype must be mxfp4 or bf16, got {experts_dtype!r}")
    report = run(config, output, layout, experts_dtype, seed)
    errors = report["requantization_error"]
    worst = f"; MXFP4 re-quantization error at most {report['requantization_error_max']:.2e} " \
            f"(relative, per tensor in {output}/{REPORT})" if errors else ""
    print(f"merged {len(report['models'])} model(s) with {report['merge_method']} into {output} "
          f"({layout} layout, {experts_dtype} experts){worst}", file=sys.stderr)
