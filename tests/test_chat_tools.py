"""`ossgpt chat` with gpt-oss's built-in tools: the browser's calls run through BrowserTool and
come back as the tool's messages on the call's channel, and the model goes on. The loop's tests
script the first reply (the call), so they hold for any model; everything after it (the tool
run, the rendering, the model's continuation) is the real loop. The CLI tests at the end ask the
bundled nano, which has learned both tools on its bundled corpus, held-out questions."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console

import ossgpt
from ossgpt.chat import ChatSession, ChatTools, converse
from ossgpt.data import examples
from ossgpt.data.builtin_tools import CORPUS_DIR
from ossgpt.harmony import render_prompt
from ossgpt.sampling import SamplingParams
from ossgpt.tokenizer import get_tokenizer
from ossgpt.tools.browser import BrowserTool, LocalCorpus

CALL = ('<|channel|>analysis<|message|>I should search the notes.<|end|>'
        '<|start|>assistant<|channel|>analysis to=browser.search code<|message|>'
        '{"query": "borrow checker"}<|call|>')


@pytest.fixture(scope="module")
def nano_model():
    return ossgpt.load("nano", device="cpu", dtype=torch.bfloat16, progress=False)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "rust.md").write_text("# Borrow checker\n\nThe borrow checker enforces ownership.\n")
    (root / "gil.txt").write_text("The GIL serializes Python bytecode.\n")
    return root


class ScriptedFirstReply(ChatSession):
    """A session whose first reply is the given text (as tokens); later replies are the model's."""

    def __init__(self, *args, first: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._first: str | None = first

    def _generate(self, prompt, sampling) -> Iterator[tuple[int, str | None]]:
        if self._first is None:
            yield from super()._generate(prompt, sampling)
            return
        tokens = get_tokenizer().encode(self._first, allow_special=True)
        self._first = None
        for i, t in enumerate(tokens):
            yield t, "tool_calls" if i == len(tokens) - 1 else None


def test_browser_call_runs_and_the_model_continues(nano_model, corpus, tmp_path):
    tools = ChatTools(browser=BrowserTool(LocalCorpus(corpus, index_root=tmp_path / "index")))
    session = ScriptedFirstReply(nano_model, first=CALL, builtin_tools=tools.builtin_tools,
                                 sampling=SamplingParams(temperature=0), max_tokens=8)
    out = io.StringIO()
    converse(session, "What does the borrow checker do?", Console(file=out, width=200),
             show_reasoning=True, run_tool=tools, interactive=False)
    printed = out.getvalue()
    assert '→ browser.search({"query": "borrow checker"})' in printed
    assert "← [0] borrow checker" in printed

    user, call, result, continued = session.history
    assert call["tool_calls"][0]["function"]["name"] == "browser.search"
    assert (call["tool_calls"][0]["channel"], call["tool_calls"][0]["content_type"]) == (
        "analysis", "code")
    assert result["role"] == "tool" and result["name"] == "browser.search"
    assert result["channel"] == "analysis"
    assert result["content"].startswith("[0] borrow checker\n**viewing lines [0 - ")
    assert "【0†Borrow checker†rust.md】" in result["content"]
    assert continued["role"] == "assistant"  # the model's own reply after the tool's
    # What the model saw for its continuation: the browser declared, its call and the result
    # as the tool's message on the call's channel.
    text = get_tokenizer().decode(render_prompt(session.history[:3],
                                                **session.render_options))
    assert "## browser" in text and "## python" not in text
    assert ("<|start|>assistant to=browser.search<|channel|>analysis code<|message|>"
            '{"query": "borrow checker"}<|call|>'
            "<|start|>browser.search to=assistant<|channel|>analysis<|message|>[0] borrow checker"
            ) in text
    assert len(tools.browser.stack) == 1


def test_chat_tools_dispatch(corpus, tmp_path):
    tools = ChatTools(run_function=lambda name, args: f"fn {name} {args}",
                      browser=BrowserTool(LocalCorpus(corpus, index_root=tmp_path / "index")))
    assert tools.builtin_tools == ["browser"]
    assert tools("get_weather", "{}") == "fn get_weather {}"
    assert tools("browser.find", '{"pattern": "x"}') == "No pages to access!"
    assert tools("python", "print(1)") == "fn python print(1)"  # no python tool: a function
    assert ChatTools()("browser.search", "{}") == "error: no tool named browser.search"


def test_chat_tools_run_python_statefully(tmp_path):
    from ossgpt.tools import sandbox
    from ossgpt.tools.python import PythonTool

    if sandbox.unavailable_reason() is not None:
        pytest.skip(f"no sandbox here: {sandbox.unavailable_reason()}")
    tools = ChatTools(python=PythonTool(scratch_root=tmp_path))
    try:
        assert tools.builtin_tools == ["python"]
        tools("python", "x = 2")
        assert tools("python", "print(x * 21)").strip() == "42"
    finally:
        tools.close()


def run_cli(*args, stdin=None, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ossgpt", *args], input=stdin, text=True,
                          capture_output=True, env=full_env, timeout=300)


def test_cli_chat_with_browser_and_python(corpus, tmp_path):
    out = run_cli("chat", "--tools", "browser,python", "--corpus", str(corpus), "--temperature", "0",
                  "--max-tokens", "24", stdin="What is the capital of Peru?\n",
                  env={"OSSGPT_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert f"browser: indexed 2 documents in {corpus}" in out.stderr
    assert list((tmp_path / "cache" / "browser-index").iterdir())  # the index, in the cache


def question(family: str, i: int):
    """The i-th held-out conversation of a built-in tool family, and its last user question (the
    one that needs the tool: earlier turns are other families')."""
    ex = list(examples(family, "test", 0))[i]
    return ex, [m["content"] for m in ex.messages if m["role"] == "user"][-1]


def test_cli_nano_answers_from_the_bundled_corpus_with_a_citation(tmp_path):
    """The bundled nano has learned the browser (benchmarks/finetune_nano_tools.py): questions it
    was not trained on, asked as a user would, are searched, opened, answered and cited. nano
    gets nearly nine in ten right (88% of 50 held-out), so of the first three at least two."""
    right = []
    for i in range(3):
        ex, asked = question("browser", i)
        out = run_cli("chat", "--tools", "browser,python", "--corpus", str(CORPUS_DIR),
                      "--temperature", "0", stdin=asked + "\n",
                      env={"OSSGPT_CACHE": str(tmp_path / "cache")})
        assert out.returncode == 0, out.stderr
        assert "→ browser.search(" in out.stdout, out.stdout
        (value,), cite = ex.expected["final_contains"], ex.expected["cite"]
        # the answer, then where its citation points: the fact's file and line
        if value in out.stdout and "→ browser.open(" in out.stdout and re.search(
                rf"{re.escape(cite['path'])}:{cite['line']}$", out.stdout, re.M):
            right.append(asked)
    assert len(right) >= 2, right


def test_cli_nano_computes_with_python(tmp_path):
    """The same for python: held-out questions, a call to the sandboxed tool each, its printed
    result in the answer (94% of 50 held-out: at least two of the first three)."""
    from ossgpt.tools import sandbox

    if sandbox.unavailable_reason() is not None:
        pytest.skip(f"no sandbox here: {sandbox.unavailable_reason()}")
    right = []
    for i in range(3):
        ex, asked = question("python", i)
        # no --corpus: with nano the browser searches the bundled corpus
        out = run_cli("chat", "--tools", "browser,python", "--temperature", "0",
                      stdin=asked + "\n", env={"OSSGPT_CACHE": str(tmp_path / "cache")})
        assert out.returncode == 0, out.stderr
        assert f"browser: {'indexed' if i == 0 else 'index loaded for'} 30 documents in {CORPUS_DIR}" in out.stderr
        assert "→ python(" in out.stdout, out.stdout
        if f"The answer is {ex.expected['final_contains'][0]}." in out.stdout:
            right.append(asked)
    assert len(right) >= 2, right


def test_cli_browser_needs_a_corpus_or_search_url(tmp_path):
    # any model but nano (whose bundled corpus is the default); the error comes before loading
    out = run_cli("chat", "--model", str(tmp_path / "a-checkpoint"), "--tools", "browser", stdin="hi\n")
    assert out.returncode == 1
    assert "--tools browser needs --corpus DIR" in out.stderr
