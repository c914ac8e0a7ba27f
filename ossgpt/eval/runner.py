"""Running a suite: every (sample, effort, repeat) task through a backend, graded, one line of
samples.jsonl each as it finishes; `resume` skips the tasks already there.

Reproducibility: a task's seed is a stable hash of (seed, sample id, repeat, effort) and
nothing else (`task_seed`), and the backends decode each request independently of the batch
(backends.py), so a task's reply does not depend on --batch, on concurrency or on order.
samples.jsonl is rewritten in task order when the run ends, so two runs of a command give the
same bytes; wall-clock seconds, which never repeat, go to timings.jsonl beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import OssgptError
from ..files import write_atomic
from . import grading
from .backends import Generation, Request
from .sandbox import grade_humaneval
from .suites import Sample, stable_int

EFFORTS = ("low", "medium", "high")
SAMPLES, TIMINGS, RUN = "samples.jsonl", "timings.jsonl", "run.json"


@dataclass
class EvalConfig:
    suite: str = "nano"
    data: str | None = None
    efforts: list[str] = field(default_factory=lambda: ["medium"])
    repeats: int = 1
    limit: int | None = None
    seed: int = 0
    max_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    grading: str = "exact"
    date: str | None = None
    model: str = "nano"

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues (not limit, repeats or
        efforts: those may grow)."""
        return {k: v for k, v in asdict(self).items() if k not in ("limit", "repeats", "efforts")}


def task_seed(seed: int, sample_id: str, repeat: int, effort: str) -> int:
    """A task's sampling seed: a function of these four alone, never of batch position."""
    return stable_int("ossgpt-eval", seed, sample_id, repeat, effort)


def task_key(sample_id: str, effort: str, repeat: int) -> str:
    return f"{sample_id}|{effort}|{repeat}"


def parse_efforts(text: str) -> list[str]:
    efforts = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in efforts if e not in EFFORTS]
    if not efforts or bad:
        raise OssgptError(f"--reasoning-effort takes low, medium, high separated by commas, got "
                          f"{text!r}")
    return list(dict.fromkeys(efforts))


# -- the output folder -------------------------------------------------------------------------

def read_done(path: Path) -> list[dict]:
    """The complete records of a samples.jsonl; a line cut short by a kill is dropped."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "key" in record:
                records.append(record)
    return records


def prepare_out(out: Path, config: EvalConfig, resume: bool) -> list[dict]:
    """Check the folder against --resume; -> the records already done."""
    samples = out / SAMPLES
    run_file = out / RUN
    if not resume:
        if samples.exists():
            raise OssgptError(f"{out} already holds a run: pass --resume to continue it, or "
                              f"choose another --out")
        return []
    if not run_file.is_file():
        return []
    try:
        before = json.loads(run_file.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OssgptError(f"{run_file}: unreadable; remove {out} to start over") from None
    for k, v in config.identity().items():
        if before.get(k) != v:
            raise OssgptError(f"--resume: {out} was run with {k}={before.get(k)!r}, not {v!r}")
    return read_done(samples)


# -- grading -----------------------------------------------------------------------------------

def grade_task(sample: Sample, g: Generation) -> grading.Grade:
    if g.error:
        return grading.Grade(None, 0.0, grading.ERROR, {"error": g.error})
    if sample.grading == "nano":
        return grading.grade_nano(sample, g.reply())
    content = g.content if g.content.strip() else None
    if sample.grading == "humaneval":
        return grade_humaneval(sample, content)
    return grading.grade(sample, content)


def rubric_requests(sample: Sample, key: str, g: Generation, seed: int, max_tokens: int
                    ) -> list[Request]:
    """One grader request per rubric item; greedy, so a grade is the grader's best reading."""
    return [Request(f"{key}#{i}", grading.grader_messages(sample.messages, g.content, item),
                    "low", stable_int("ossgpt-grader", seed, key, i), max_tokens, 0.0, 1.0)
            for i, item in enumerate(sample.meta["rubrics"])]


def record(sample: Sample, effort: str, repeat: int, seed: int, g: Generation,
           grade: grading.Grade) -> dict:
    out = {"key": task_key(sample.id, effort, repeat), "id": sample.id, "effort": effort,
           "repeat": repeat, "seed": seed, "prompt": sample.messages, "reply": g.harmony,
           "reasoning": g.reasoning, "content": g.content, "answer": grade.answer,
           "reference": sample.answer, "score": grade.score, "status": grade.status,
           "tokens": g.tokens, "reasoning_tokens": g.reasoning_tokens,
           "finish_reason": g.finish_reason}
    if g.tool_calls:
        out["tool_calls"] = g.tool_calls
    if grade.detail:
        out["detail"] = grade.detail
    return out


# -- the run -----------------------------------------------------------------------------------

Progress = Callable[[dict], None]


def run_tasks(samples: list[Sample], config: EvalConfig, backend, out: Path, done: list[dict],
              grader=None, progress: Progress | None = None) -> list[dict]:
    """Run every task not in `done`, appending each record to out/samples.jsonl (and its
    seconds to timings.jsonl) as it is graded; -> every record, in task order. A grader
    (rubric suites) gets the same --max-tokens per verdict as the replies it grades."""
    by_id = {s.id: s for s in samples}
    finished = {r["key"]: r for r in done}
    tasks = [(s, effort, rep) for effort in config.efforts for s in samples
             for rep in range(config.repeats)]
    todo = [t for t in tasks if task_key(t[0].id, t[1], t[2]) not in finished]
    requests = [Request(task_key(s.id, e, r), s.messages, e, task_seed(config.seed, s.id, r, e),
                        config.max_tokens, config.temperature, config.top_p,
                        s.meta.get("tools"), s.meta.get("date") or config.date)
                for s, e, r in todo]
    started = {r.key: time.perf_counter() for r in requests}
    with (out / SAMPLES).open("a", encoding="utf-8") as lines, \
            (out / TIMINGS).open("a", encoding="utf-8") as timings:

        def write(rec: dict) -> None:
            lines.write(json.dumps(rec, ensure_ascii=False) + "\n")
            lines.flush()   # a kill loses at most the line being written
            seconds = round(time.perf_counter() - started[rec["key"]], 3)
            timings.write(json.dumps({"key": rec["key"], "seconds": seconds}) + "\n")
            timings.flush()
            finished[rec["key"]] = rec
            if progress:
                progress(rec)

        def generated(req: Request, g: Generation) -> None:
            sample_id, effort, rep = req.key.rsplit("|", 2)
            sample = by_id[sample_id]
            write(record(sample, effort, int(rep), req.seed, g, grade_task(sample, g)))

        rubric = any(s.grading == "rubric" for s in samples)
        if not rubric:
            backend.run(requests, generated)
        else:
            # Rubric grading needs a second model pass: generate a chunk, grade it, write it,
            # so a killed run keeps what was graded (a grader in this process cannot run
            # inside the generating engine's loop).
            chunk = max(8, 4 * getattr(backend, "batch", 8))
            for i in range(0, len(requests), chunk):
                replies: dict[str, Generation] = {}
                backend.run(requests[i:i + chunk], lambda r, g: replies.__setitem__(r.key, g))
                _grade_rubrics(requests[i:i + chunk], replies, by_id, grader, config.seed,
                               config.max_tokens, write)
    order = [task_key(s.id, e, r) for s, e, r in tasks]
    # tasks of an earlier, larger run (a bigger --limit) stay, after this run's
    return ([finished[k] for k in order if k in finished]
            + [r for k, r in finished.items() if k not in set(order)])


def _grade_rubrics(requests: list[Request], replies: dict[str, Generation], by_id: dict,
                   grader, seed: int, max_tokens: int, write: Callable[[dict], None]) -> None:
    verdicts: dict[str, grading.Grade] = {}
    asks: list[Request] = []
    for req in requests:
        g = replies[req.key]
        sample = by_id[req.key.rsplit("|", 2)[0]]
        if g.error or not g.content.strip():
            verdicts[req.key] = grade_task(sample, g) if g.error else grading.Grade(
                None, 0.0, grading.NO_ANSWER)
        else:
            asks += rubric_requests(sample, req.key, g, seed, max_tokens)
    answers: dict[str, Generation] = {}
    grader.run(asks, lambda r, g: answers.__setitem__(r.key, g))
    for req in requests:
        sample_id, effort, rep = req.key.rsplit("|", 2)
        sample, g = by_id[sample_id], replies[req.key]
        grade = verdicts.get(req.key)
        if grade is None:
            rubrics = sample.meta["rubrics"]
            met = [grading.parse_verdict(answers[f"{req.key}#{i}"].content)
                   for i in range(len(rubrics))]
            grade = grading.Grade(g.content, grading.rubric_score(rubrics, met), grading.OK,
                                  {"criteria_met": met,
                                   "unreadable_verdicts": sum(m is None for m in met)})
        write(record(sample, effort, int(rep), req.seed, g, grade))


def finish_files(out: Path, records: list[dict]) -> None:
    """samples.jsonl in task order (lines were appended as they finished), atomically."""
    write_atomic(out / SAMPLES, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in records))
