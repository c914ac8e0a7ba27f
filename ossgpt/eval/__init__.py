"""`ossgpt eval`: a suite of questions through a model, by reasoning effort, graded, with a
report; offline and reproducible (see runner.py for the rule).

    import ossgpt.eval
    summary = ossgpt.eval.run(suite="nano", reasoning_effort="low,high", out="runs/nano")

suites.py reads the data formats, grading.py extracts and grades answers, sandbox.py runs
HumanEval programs, backends.py produces replies (in-process engine or an OpenAI-compatible
endpoint), runner.py runs and records tasks, report.py writes summary.json and report.html.
lm_eval_adapter.py and inspect_adapter.py (with _adapters.py) are the `ossgpt` model through
which lm-evaluation-harness and inspect_ai drive ossgpt models.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path

from ..errors import OssgptError
from ..files import write_atomic
from .runner import EvalConfig, parse_efforts, task_seed
from .suites import SUITES, DataError, Sample, load_suite

__all__ = ["SUITES", "DataError", "EvalConfig", "Sample", "load_suite", "run", "task_seed"]


def _check(name: str, value, ok: bool, text: str) -> None:
    if not ok:
        raise OssgptError(f"--{name.replace('_', '-')} must be {text}, got {value}")


def _local(model: str, batch: int, device: str, dtype: str):
    import torch

    from ..checkpoint import load, resolve
    from .backends import LocalBackend

    if dtype not in ("bfloat16", "float32", "float16"):
        raise OssgptError(f"--dtype must be bfloat16, float32 or float16, got {dtype!r}")
    directory, _ = resolve(model)
    print(f"Loading {directory}", file=sys.stderr, flush=True)
    net = load(directory, device=device, dtype=getattr(torch, dtype), progress=False,
               pack_dense=dtype == "bfloat16")
    return LocalBackend(net, batch, model)


def run(suite: str = "nano", data: str | None = None, model: str = "nano",
        reasoning_effort: str | list[str] = "medium", repeats: int = 1, limit: int | None = None,
        seed: int = 0, max_tokens: int = 4096, temperature: float = 1.0, top_p: float = 1.0,
        batch: int = 8, out: str | Path = "eval-out", resume: bool = False,
        base_url: str | None = None, api: str = "chat", api_key: str | None = None,
        grader_model: str | None = None, grader_base_url: str | None = None,
        grading: str = "exact", date: str | None = None, device: str = "auto",
        dtype: str = "bfloat16", progress: bool = True, print_table: bool = False) -> dict:
    """Run a suite and write OUT/samples.jsonl, timings.jsonl, summary.json, report.html;
    -> the summary. Bad data, options or an unreachable endpoint raise OssgptError before
    anything is written."""
    from . import report, runner

    efforts = (parse_efforts(reasoning_effort) if isinstance(reasoning_effort, str)
               else parse_efforts(",".join(reasoning_effort)))
    for name, value in (("repeats", repeats), ("batch", batch), ("max_tokens", max_tokens)):
        _check(name, value, isinstance(value, int) and value >= 1, ">= 1")
    if limit is not None:
        _check("limit", limit, limit >= 1, ">= 1")
    _check("temperature", temperature, 0 <= temperature < math.inf, ">= 0")
    _check("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    if date is not None:
        try:
            datetime.date.fromisoformat(date)
        except ValueError:
            raise OssgptError(f"--date must be YYYY-MM-DD, got {date!r}") from None
    samples = load_suite(suite, data, seed, grading)[:limit]
    needs_grader = any(s.grading == "rubric" for s in samples)
    if needs_grader and not (grader_model or grader_base_url):
        raise OssgptError(f"--suite {suite} is graded by a model: pass --grader-model (e.g. a "
                          f"local checkpoint) or --grader-base-url")

    from .backends import EndpointBackend
    if base_url:
        backend = EndpointBackend(base_url, api, None if model == "nano" else model, batch, api_key)
        name = backend.model
    else:
        backend = _local(model, batch, device, dtype)
        name = model
    grader = None
    if needs_grader:
        if grader_base_url:
            grader = EndpointBackend(grader_base_url, api, grader_model, batch, api_key)
        elif grader_model == model and not base_url:
            grader = backend
        else:
            grader = _local(grader_model, batch, device, dtype)

    # The conversation date is part of the prompt: pinned in run.json so a resume (or a rerun
    # with --date) renders the same prompts on another day. nano's samples carry their own.
    config = EvalConfig(suite, str(data) if data else None, efforts, repeats, limit, seed,
                        max_tokens, temperature, top_p, grading,
                        date or (None if suite == "nano" else datetime.date.today().isoformat()),
                        name)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OssgptError(f"--out {out}: exists and is not a folder")
    done = runner.prepare_out(out, config, resume)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / runner.RUN, json.dumps(
        {"config": config.identity(), "backend": backend.describe(),
         "grader": grader.describe() if grader else None}, indent=2) + "\n")
    if resume and done:
        runner.finish_files(out, done)   # drops a line a kill cut short before appending more

    todo = len(samples) * len(efforts) * repeats - len(
        {r["key"] for r in done} & {runner.task_key(s.id, e, k) for s in samples
                                    for e in efforts for k in range(repeats)})
    bar = None
    scores = [r["score"] for r in done]
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=todo, desc=f"eval {suite}", unit="sample", file=sys.stderr)

    def advance(rec: dict) -> None:
        scores.append(rec["score"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{sum(scores) / len(scores):.1%}")

    try:
        records = runner.run_tasks(samples, config, backend, out, done, grader, advance)
    finally:
        if bar is not None:
            bar.close()
    runner.finish_files(out, records)
    summary = report.summarize(records, {"suite": suite, "model": name,
                                         "backend": backend.describe(),
                                         "config": {k: v for k, v in vars(config).items()}})
    report.write_reports(out, summary, records)
    if print_table:
        report.print_table(summary, out)
    return summary
