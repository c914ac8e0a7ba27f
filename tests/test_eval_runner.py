"""ossgpt.eval's runs on nano: batch 1 and batch 8 give the same replies, a rerun the same
bytes, a killed run resumes; HealthBench rubrics graded by nano in-process; the row-invariant
decode that all this rests on, at every CPU kernel level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ossgpt
import ossgpt.eval
from ossgpt import kernels
from ossgpt.errors import OssgptError
from ossgpt.eval.runner import task_seed

RUN = dict(suite="nano", limit=8, max_tokens=120, temperature=1.0, seed=3, progress=False)
TIMING_FREE = ("reasoning", "content", "reply", "answer", "score", "status", "tokens", "seed")


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def batch8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b8") / "run"
    ossgpt.eval.run(**RUN, batch=8, reasoning_effort="low,high", out=out)
    return out


def test_batch_1_and_8_give_the_same_replies(batch8: Path, tmp_path: Path) -> None:
    ossgpt.eval.run(**RUN, batch=1, reasoning_effort="low,high", out=tmp_path / "b1")
    one, eight = lines(tmp_path / "b1"), lines(batch8)
    assert len(one) == len(eight) == 16
    assert [r["key"] for r in one] == [r["key"] for r in eight]
    for a, b in zip(one, eight):
        assert {k: a[k] for k in TIMING_FREE} == {k: b[k] for k in TIMING_FREE}, a["key"]
    # sampled at temperature 1: the seeds matter, and differ by effort and sample
    assert len({r["seed"] for r in one}) == 16
    assert ((tmp_path / "b1" / "samples.jsonl").read_bytes()
            == (batch8 / "samples.jsonl").read_bytes())


def test_same_command_twice_same_bytes(batch8: Path, tmp_path: Path) -> None:
    ossgpt.eval.run(**RUN, batch=8, reasoning_effort="low,high", out=tmp_path / "again")
    for name in ("samples.jsonl", "summary.json", "report.html"):
        assert (tmp_path / "again" / name).read_bytes() == (batch8 / name).read_bytes(), name
    timings = (tmp_path / "again" / "timings.jsonl").read_text().splitlines()
    assert len(timings) == 16 and all("seconds" in json.loads(t) for t in timings)


def test_outputs_and_report(batch8: Path) -> None:
    rec = lines(batch8)[0]
    assert rec["id"] == "addition-0" and rec["effort"] == "low" and rec["repeat"] == 0
    assert rec["seed"] == task_seed(3, "addition-0", 0, "low")
    assert rec["reply"].startswith("<|channel|>analysis<|message|>")
    assert rec["reasoning"] and rec["prompt"][-1]["role"] == "user"
    summary = json.loads((batch8 / "summary.json").read_text())
    assert list(summary["efforts"]) == ["low", "high"]
    low = summary["efforts"]["low"]
    assert low["n"] == 8 and low["ci95"][0] <= low["score"] <= low["ci95"][1]
    html = (batch8 / "report.html").read_text()
    assert html.count("<details>") == 16 and "<svg" in html and "reasoning tokens" in html


def test_resume_after_a_kill(batch8: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    out.mkdir()
    full = (batch8 / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "run.json").write_text((batch8 / "run.json").read_text())
    # five whole lines and half of the sixth, as a kill -9 mid-write leaves them
    (out / "samples.jsonl").write_text("".join(full[:5]) + full[5][:40])
    with pytest.raises(OssgptError, match="already holds a run"):
        ossgpt.eval.run(**RUN, batch=8, reasoning_effort="low,high", out=out)
    ossgpt.eval.run(**RUN, batch=8, reasoning_effort="low,high", out=out, resume=True)
    assert (out / "samples.jsonl").read_bytes() == (batch8 / "samples.jsonl").read_bytes()
    assert len((out / "timings.jsonl").read_text().splitlines()) == 11   # only the 11 redone
    with pytest.raises(OssgptError, match="was run with seed=3, not 4"):
        ossgpt.eval.run(**{**RUN, "seed": 4}, batch=8, reasoning_effort="low,high", out=out,
                        resume=True)


def test_healthbench_graded_by_local_nano(tmp_path: Path) -> None:
    data = tmp_path / "healthbench.jsonl"
    rubrics = [{"criterion": "Names Lima as the capital.", "points": 5, "tags": ["axis:accuracy"]},
               {"criterion": "Is rude to the user.", "points": -2, "tags": []}]
    records = [{"prompt_id": f"hb{i}", "prompt": [{"role": "user", "content": q}],
                "rubrics": rubrics} for i, q in enumerate(["What is the capital of Peru?",
                                                           "capital of Peru?"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = ossgpt.eval.run(suite="healthbench", data=str(data), grader_model="nano",
                              max_tokens=96, out=tmp_path / "hb", progress=False, seed=0)
    assert summary["efforts"]["medium"]["n"] == 2
    for rec in lines(tmp_path / "hb"):
        met = rec["detail"]["criteria_met"]
        assert len(met) == 2 and 0 <= rec["score"] <= 1
        assert rec["status"] in ("ok", "no answer")


def test_rubric_suite_needs_a_grader(tmp_path: Path) -> None:
    data = tmp_path / "hb.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                "rubrics": [{"criterion": "x", "points": 1}]}) + "\n")
    with pytest.raises(OssgptError, match="--grader-model"):
        ossgpt.eval.run(suite="healthbench", data=str(data), out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@torch.inference_mode()
def _rows(net, prompts: list[list[int]], steps: int = 4) -> list[torch.Tensor]:
    """Each prompt's logits over `steps` decode steps: alone, and inside one batch."""
    from ossgpt.generate import decode_step, prefill

    def run(group: list[list[int]]) -> torch.Tensor:
        cache = net.make_cache()
        for p in group:                                # prefilled alone, as the engine does
            own = net.make_cache()
            prefill(net, [p], own)
            cache.extend(own)
        out, positions = [], torch.tensor([len(p) for p in group])
        tokens = torch.tensor([p[-1] for p in group])
        for i in range(steps):
            out.append(decode_step(net, tokens, positions + i, cache))
        return torch.stack(out, 1)                     # (B, steps, V)

    batched = run(prompts)
    return [(run([p])[0], batched[i]) for i, p in enumerate(prompts)]


def test_row_invariant_decode_plain_path() -> None:
    """Without kernels the products are oneDNN's, which picks its kernel by the number of rows
    too (the bundled nano's o_proj gave a row other bits in a batch of 3): within
    row_invariant() they run a row at a time as well."""
    from ossgpt.kernels import build

    net = ossgpt.load("nano", device="cpu", dtype=torch.bfloat16, pack_dense=True,
                      progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(200, 5000, (n,), generator=g).tolist() for n in (7, 12, 3)]
    with kernels.use_isa(build.PLAIN), kernels.row_invariant():
        for alone, batched in _rows(net, prompts, steps=2):
            assert torch.equal(alone, batched)


def test_row_invariant_at_every_level(isa: str) -> None:
    net = ossgpt.load("nano", device="cpu", dtype=torch.bfloat16, pack_dense=True,
                      progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(200, 5000, (n,), generator=g).tolist() for n in (9, 30, 2, 17, 5)]
    with kernels.row_invariant():
        for alone, batched in _rows(net, prompts, steps=3):
            assert torch.equal(alone, batched)
