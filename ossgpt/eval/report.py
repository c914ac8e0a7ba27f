"""What a run's records add up to: summary.json (scores by effort with bootstrap 95% intervals),
report.html (the table, accuracy and reasoning tokens by effort as plots, every sample with
its reasoning) and the table printed at the end.

Everything here is a function of the records alone (the bootstrap is seeded), so a rerun
writes the same bytes; the plots are SVG from matplotlib with its date and ids pinned.
"""

from __future__ import annotations

import html
import io
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

from ..files import write_atomic
from .runner import EFFORTS


def bootstrap_ci(groups: list[list[float]], rounds: int = 1000, seed: int = 0
                 ) -> tuple[float, float]:
    """95% percentile interval of the mean score, resampling samples (each sample's repeats
    stay together: they are not independent questions)."""
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(statistics.fmean(s for g in rng.choices(groups, k=len(groups)) for s in g)
                   for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def summarize(records: list[dict], meta: dict) -> dict:
    by_effort: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_effort[r["effort"]].append(r)
    efforts = {}
    for effort in sorted(by_effort, key=lambda e: EFFORTS.index(e) if e in EFFORTS else 9):
        rs = by_effort[effort]
        groups: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            groups[r["id"]].append(r["score"])
        low, high = bootstrap_ci(list(groups.values()))
        statuses: dict[str, int] = defaultdict(int)
        for r in rs:
            statuses[r["status"]] += 1
        efforts[effort] = {
            "n": len(rs), "samples": len(groups), "score": statistics.fmean(r["score"] for r in rs),
            "ci95": [low, high], "no_answer": statuses.get("no answer", 0),
            "statuses": dict(sorted(statuses.items())),
            "mean_tokens": statistics.fmean(r["tokens"] for r in rs),
            "mean_reasoning_tokens": statistics.fmean(r["reasoning_tokens"] for r in rs),
            "truncated": sum(r["finish_reason"] == "length" for r in rs)}
    return {**meta, "efforts": efforts}


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for effort, s in summary["efforts"].items():
        rows.append([effort, str(s["n"]), f"{s['score']:.1%}",
                     f"{s['ci95'][0]:.1%} – {s['ci95'][1]:.1%}", str(s["no_answer"]),
                     f"{s['mean_reasoning_tokens']:.0f}", f"{s['mean_tokens']:.0f}"])
    return rows


HEADERS = ["effort", "n", "score", "95% CI", "no answer", "reasoning tok", "tokens"]


def print_table(summary: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['suite']} · {summary['model']}")
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "effort" else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"report: {out_dir / 'report.html'}")


def _plots(summary: dict) -> str:
    """Accuracy (with its interval) and mean reasoning tokens by effort, side by side, as
    inline SVG."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    efforts = list(summary["efforts"])
    s = [summary["efforts"][e] for e in efforts]
    fig = Figure(figsize=(8, 3))
    acc, tok = fig.subplots(1, 2)
    scores = [x["score"] * 100 for x in s]
    errors = [[max(0.0, (x["score"] - x["ci95"][0]) * 100) for x in s],
              [max(0.0, (x["ci95"][1] - x["score"]) * 100) for x in s]]
    acc.bar(efforts, scores, yerr=errors, capsize=4, color="#4c72b0")
    acc.set_ylim(0, 100)
    acc.set_ylabel("score (%)")
    acc.set_title("score by reasoning effort (95% CI)")
    tok.plot(efforts, [x["mean_reasoning_tokens"] for x in s], marker="o", color="#dd8452")
    tok.set_ylabel("mean reasoning tokens")
    tok.set_title("reasoning tokens by effort")
    tok.set_ylim(bottom=0)
    fig.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "ossgpt", "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
details{margin:4px 0;border:1px solid #eee;padding:4px}
summary{cursor:pointer}.ok{color:#2a7}.bad{color:#c33}pre{white-space:pre-wrap;background:#f7f7f7;
padding:6px;margin:4px 0}.r{color:#777}"""


def _sample_html(r: dict) -> str:
    e = html.escape
    mark = "ok" if r["score"] >= 1 else "bad"
    prompt = "\n\n".join(f"[{m.get('role')}] {m.get('content')}" for m in r["prompt"])
    return (f"<details><summary><span class='{mark}'>{r['score']:.2f}</span> {e(r['id'])} · "
            f"{e(r['effort'])} · repeat {r['repeat']} · {e(r['status'])} · answer "
            f"<b>{e(str(r['answer']))}</b> (reference {e(str(r['reference']))}) · "
            f"{r['tokens']} tokens</summary>"
            f"<b>prompt</b><pre>{e(prompt)}</pre><b>reasoning</b>"
            f"<pre class='r'>{e(r['reasoning'])}</pre><b>answer</b><pre>{e(r['content'])}</pre>"
            f"<b>harmony reply</b><pre class='r'>{e(r['reply'])}</pre>"
            + (f"<b>grading</b><pre>{e(json.dumps(r['detail'], ensure_ascii=False))}</pre>"
               if r.get("detail") else "") + "</details>")


def render_html(summary: dict, records: list[dict]) -> str:
    e = html.escape
    head = "".join(f"<th>{h}</th>" for h in HEADERS)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                   for row in table_rows(summary))
    settings = ", ".join(f"{k}={v}" for k, v in summary["config"].items() if v is not None)
    by_effort = "".join(f"<h3>{e(effort)}</h3>" + "".join(_sample_html(r) for r in records
                                                          if r["effort"] == effort)
                        for effort in summary["efforts"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ossgpt eval: "
            f"{e(summary['suite'])}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{e(summary['suite'])} · {e(summary['model'])}</h1><p>{e(settings)}</p>"
            f"<table><tr>{head}</tr>{rows}</table>{_plots(summary)}"
            f"<h2>Samples</h2>{by_effort}</body></html>\n")


def write_reports(out: Path, summary: dict, records: list[dict]) -> None:
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "report.html", render_html(summary, records))
