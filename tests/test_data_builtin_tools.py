"""The built-in tool families (ossgpt/data/builtin_tools.py): browser over the bundled corpus and
python. They render as `ossgpt chat --tools browser,python` renders, their splits never leak,
and every tool output in them is what the real tool returns."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from ossgpt.data import examples, is_test_key, render_example, score, trained_turns
from ossgpt.data.builtin_tools import CORPUS_DIR, corpus_files, new_browser, run_python
from ossgpt.data.tasks import chat_record, mixture
from ossgpt.finetune import _example
from ossgpt.harmony import parse_reply
from ossgpt.tokenizer import get_tokenizer

NEW = ("browser", "python")


def take(family: str, split: str = "train", n: int = 40, seed: int = 0) -> list:
    return list(itertools.islice(examples(family, split, seed), n))


def test_bundled_corpus_is_the_generated_one():
    files = corpus_files()
    on_disk = {p.relative_to(CORPUS_DIR).as_posix(): p.read_text(encoding="utf-8")
               for p in CORPUS_DIR.rglob("*.md")}
    assert on_disk == files
    assert 20 <= len(files) <= 40 and sum(len(t.encode()) for t in files.values()) < 100_000


@pytest.mark.parametrize("family", NEW)
def test_render_with_builtin_tools_declared(family):
    for ex in take(family, n=20) + take(family, "test", 10):
        tokens, mask = render_example(ex)  # checks prefixes and that each turn parses back
        text = get_tokenizer().decode(tokens)
        assert ex.builtin_tools and family in ex.builtin_tools
        for b in ("browser", "python"):
            assert (f"## {b}" in text) == (b in ex.builtin_tools)
        # three trained turns (search, open, answer) or two (run, answer), all on the mask
        assert len(trained_turns(ex.messages)) == (3 if family == "browser" else 2)
        assert f"to={'browser.search' if family == 'browser' else 'python'}<|channel|>analysis code" in text
        # what finetune reads from the JSONL line renders to the same tokens
        again = _example(json.loads(json.dumps(chat_record(ex))))
        assert render_example(again, check=False) == (tokens, mask)


@pytest.mark.parametrize("family", NEW)
def test_splits_never_leak(family):
    test = list(examples(family, "test", 0))
    assert len(test) >= 100 and all(is_test_key(ex.key) for ex in test)
    test_keys = {ex.key for ex in test}
    train = take(family, n=400, seed=1)
    assert not test_keys & {ex.key for ex in train}
    assert all(not is_test_key(ex.key) for ex in train)
    # not in nano's default mixture
    assert not {ex.family for ex in itertools.islice(mixture(0), 300)} & set(NEW)


def test_browser_outputs_are_the_real_tool():
    for ex in take("browser", n=15) + take("browser", "test", 5):
        browser = new_browser()
        for m in ex.messages:
            for c in m.get("tool_calls") or []:
                i = ex.messages.index(m)
                result = ex.messages[i + 1]
                assert result["role"] == "tool" and result["name"] == c["function"]["name"]
                assert browser.call(c["function"]["name"], c["function"]["arguments"]) == result["content"]
        # the answer's citation points at the fact's file and line
        answer = ex.messages[-1]["content"]
        (cite,) = browser.citations(answer)
        want = ex.expected["cite"]
        assert cite.location.endswith(want["path"]) and cite.source_first == want["line"]
        assert all(v in answer for v in ex.expected["final_contains"])
        text = (CORPUS_DIR / want["path"]).read_text().split("\n")[want["line"] - 1]
        assert all(v in text for v in ex.expected["final_contains"])


def test_python_outputs_are_the_real_tool():
    from ossgpt.tools.python import PythonTool
    from ossgpt.tools.sandbox import unavailable_reason
    exs = take("python", n=15) + take("python", "test", 5)
    with PythonTool(unsandboxed=unavailable_reason() is not None) as tool:
        for ex in exs:
            call, result = ex.messages[-3]["tool_calls"][0], ex.messages[-2]
            code = call["function"]["arguments"]
            assert call["function"]["name"] == "python" and result["name"] == "python"
            assert tool.run("t", code) == result["content"] == run_python(code)
            assert result["content"].strip() in ex.messages[-1]["content"]
            assert str(eval(code.removeprefix("print(")[:-1])) == result["content"].strip()
            if ex.expected["kind"] == "digits":  # the code measures the question's power
                a, b = map(int, re.findall(r"\d+", ex.messages[-4]["content"]))
                assert result["content"].strip() == str(len(str(a ** b)))


def test_score_right_tool_and_call():
    py, br = take("python", n=1)[0], take("browser", n=1)[0]
    tok = get_tokenizer()

    def reply(text: str):
        return parse_reply(tok.encode(text, allow_special=True), tools={"python", "browser.search"})

    code = py.expected["code"]
    good = reply(f" to=python<|channel|>analysis code<|message|>{code}<|call|>")
    assert score(py, good) == {"well_formed": True, "correct": True, "right_tool": True}
    other = reply(" to=python<|channel|>analysis code<|message|>print(1)<|call|>")
    assert score(py, other)["right_tool"] and not score(py, other)["correct"]
    args = json.dumps(br.expected["arguments"])
    search = reply(f" to=browser.search<|channel|>analysis code<|message|>{args}<|call|>")
    assert score(br, search) == {"well_formed": True, "correct": True, "right_tool": True}
    assert not score(py, search)["right_tool"] and not score(br, good)["right_tool"]


@pytest.mark.parametrize("family", NEW)
def test_tool_loop_on_the_gold_replies_reproduces_the_data(family):
    """The evaluation loop, fed the data's own assistant turns, runs the real tools, sees the
    same prompts as training did, and scores every check right."""
    from ossgpt.data.examples import _turn_tokens, render_options
    from ossgpt.data.tool_loop import _Conversation, summarize
    from ossgpt.harmony import render_prompt

    results = []
    for ex in take(family, "test", 5):
        conv = _Conversation(ex)
        for start, end in trained_turns(ex.messages):
            prompt = render_prompt(conv.messages, **render_options(ex))
            assert prompt == render_prompt(ex.messages[:start], **render_options(ex))
            going = conv.add_reply(_turn_tokens(ex.messages[start:end], prompt, ex.builtin_tools))
            assert going == (end < len(ex.messages))
        results.append(conv.result())
    summary = summarize(results)[family]
    by_kind = summary.pop("by_kind")
    assert all(v == 1.0 for k, v in summary.items() if k != "n"), summary
    assert sum(k["n"] for k in by_kind.values()) == 5 and all(k["final"] == 1.0 for k in by_kind.values())
    assert all(r["answer"] and r["calls"] for r in results)
