"""ossgpt.eval.report: the bootstrap interval, the summary by effort and the HTML report, from
records made here (no model)."""

from __future__ import annotations

import json
from pathlib import Path

from ossgpt.eval.report import bootstrap_ci, render_html, summarize, write_reports


def records() -> list[dict]:
    out = []
    for effort, right in (("high", 9), ("low", 5)):
        for i in range(10):
            for rep in range(2):
                ok = i < right
                out.append({"key": f"s{i}|{effort}|{rep}", "id": f"s{i}", "effort": effort,
                            "repeat": rep, "score": float(ok), "status": "ok" if ok or i % 2
                            else "no answer", "tokens": 100 if effort == "high" else 40,
                            "reasoning_tokens": 80 if effort == "high" else 20,
                            "finish_reason": "stop", "prompt": [{"role": "user", "content": "q<"}],
                            "reasoning": "think <b>", "content": "A", "reply": "<|channel|>",
                            "answer": "A", "reference": "A" if ok else "B"})
    return out


def test_bootstrap_interval() -> None:
    low, high = bootstrap_ci([[1.0]] * 8 + [[0.0]] * 2)
    assert 0.5 <= low < 0.8 < high <= 1.0
    assert bootstrap_ci([[1.0, 1.0]] * 5) == (1.0, 1.0)
    assert bootstrap_ci([[1.0], [0.0]]) == bootstrap_ci([[1.0], [0.0]])   # seeded


def test_summary_orders_efforts_and_counts(tmp_path: Path) -> None:
    meta = {"suite": "mmlu", "model": "m", "backend": "b", "config": {"seed": 0}}
    summary = summarize(records(), meta)
    assert list(summary["efforts"]) == ["low", "high"]
    high, low = summary["efforts"]["high"], summary["efforts"]["low"]
    assert (high["n"], high["samples"], high["score"]) == (20, 10, 0.9)
    assert low["no_answer"] == 4 and low["mean_reasoning_tokens"] == 20
    write_reports(tmp_path, summary, records())
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    html = (tmp_path / "report.html").read_text()
    assert html.count("<details>") == 40 and html.count("<svg") == 1
    assert "think &lt;b&gt;" in html and "think <b>" not in html     # escaped
    assert render_html(summary, records()) == html                   # deterministic
