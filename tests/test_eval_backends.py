"""ossgpt eval against an endpoint: a real `ossgpt serve --batch-invariant` on loopback, through
the real `openai` client, gives the in-process run's replies for the same seed; and the CLI's
errors for bad input and an unreachable --base-url."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ossgpt.eval
from conftest import run_server

COMPARED = ("reasoning", "content", "answer", "score", "status", "tokens", "reasoning_tokens",
            "seed", "finish_reason")

QUESTIONS = [("What is 348 + 275?", "623"), ("What is the capital of Peru?", "Lima"),
             ("What is 905 - 318?", "587"), ("How many items are in this list: cat, dog, sun?",
                                             "3"), ("Compute 44 plus 58.", "102"),
             ("Name the capital of Kenya.", "Nairobi")]


def write_suite(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "answer": a,
                                        "grading": "regex"}) + "\n"
                            for i, (q, a) in enumerate(QUESTIONS)))
    return path


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def invariant_server():
    with run_server("--batch-invariant", "--max-batch", "8") as url:
        yield url


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_endpoint_equals_in_process(invariant_server: str, tmp_path: Path, api: str) -> None:
    data = write_suite(tmp_path / "mine.jsonl")
    # The server renders today's date into the prompt; the in-process run's default is today too.
    common = dict(suite="jsonl", data=str(data), reasoning_effort="low,high", max_tokens=100,
                  temperature=1.0, seed=11, progress=False)
    local = ossgpt.eval.run(**common, batch=4, out=tmp_path / "local")
    remote = ossgpt.eval.run(**common, batch=8, out=tmp_path / "remote",
                             base_url=invariant_server + "/v1", api=api)
    assert remote["model"] == "nano" and "at http://127.0.0.1" in remote["backend"]
    a, b = lines(tmp_path / "local"), lines(tmp_path / "remote")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert {k: x[k] for k in COMPARED} == {k: y[k] for k in COMPARED}, x["key"]
    assert local["efforts"].keys() == remote["efforts"].keys()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ossgpt", "eval", "--no-progress", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_bad_input(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"problem": "p", "answer": "1"}\n{"problem": \n')
    (tmp_path / "gpqa.csv").write_text("Question,Correct Answer\nq,a\n")
    cases = [
        (["--suite", "aime", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--suite", "aime", "--data", "bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (["--suite", "gpqa", "--data", "gpqa.csv"], "gpqa.csv:1: no column 'Incorrect Answer 1'"),
        (["--suite", "mmlu"], "--suite mmlu reads a data file"),
        (["--reasoning-effort", "low,extreme"], "--reasoning-effort"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--base-url", f"http://127.0.0.1:{free_port()}/v1"], "cannot reach http://127.0.0.1:"),
    ]
    for args, message in cases:
        done = cli(*args, "--out", "out", cwd=tmp_path)
        assert done.returncode == 1, (args, done.stderr)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists(), args       # nothing half-written
