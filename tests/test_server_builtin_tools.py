"""The Responses API's built-in tools run on the server: web_search_preview (gpt-oss's browser
over `ossgpt serve --corpus`) and code_interpreter (its python tool).

What is real here: the browser over a real folder, the sandboxed python tool, `ossgpt serve` on
loopback and the `openai` client. The bundled nano model has not learned to call these tools,
so the end-to-end tool round is made with `tool_choice: {"type": "web_search_preview"}` (OpenAI's
own option to force the hosted tool), which constrains nano's first round into a real
browser.search call; the server runs it over the corpus and goes on generating. No end-to-end
test makes nano call python (no grammar forces its code): the python tool's round is tested on
the server's own step (BuiltinTools.run + call_item) and through a replayed
code_interpreter_call item."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from openai.types.responses import (ResponseOutputItemAddedEvent, ResponseOutputItemDoneEvent,
                                    ResponseWebSearchCallCompletedEvent,
                                    ResponseWebSearchCallInProgressEvent,
                                    ResponseWebSearchCallSearchingEvent)

from ossgpt.harmony import ToolCall, render_prompt
from ossgpt.server.builtin_tools import BuiltinTools, Citations, call_item
from ossgpt.server.protocol import APIError, ResponsesTool
from ossgpt.server.responses import input_messages

from conftest import run_server

pytest.importorskip("bm25s")

SINKS = "# Attention sinks\n\nEach head has a learned sink logit.\nIt takes probability mass and adds no value.\n"
ROPE = "# RoPE\n\nYaRN stretches the context to 131,072 tokens.\n"
QUESTION = "What is an attention sink?"
WEB_SEARCH = [{"type": "web_search_preview"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "sinks.md").write_text(SINKS)
    (root / "rope.md").write_text(ROPE)
    return root


def _backend(corpus: Path, tmp_path: Path):
    from ossgpt.tools.browser import LocalCorpus
    return LocalCorpus(corpus, index_root=tmp_path / "index")


def _python_tool():
    from ossgpt.tools.python import PythonTool
    from ossgpt.tools.sandbox import unavailable_reason
    if (reason := unavailable_reason()) is not None:
        pytest.skip(f"this platform cannot sandbox: {reason}")
    return PythonTool()


# -- the server's step: a parsed built-in call -> its output item and the tool's text -------------

def test_browser_calls_become_web_search_call_items(corpus: Path, tmp_path: Path) -> None:
    tools = BuiltinTools(_backend(corpus, tmp_path))
    session = tools.session(tools.chain("resp_1", None))
    search = ToolCall("browser.search", json.dumps({"query": "attention sink"}), "analysis", "code")
    text = tools.run(session, search)
    assert "sinks.md" in text
    assert call_item(search, session, "completed", text) | {"id": "x"} == {
        "type": "web_search_call", "id": "x", "status": "completed",
        "action": {"type": "search", "query": "attention sink"}}

    opened = ToolCall("browser.open", json.dumps({"id": 0}), "analysis", "code")
    item = call_item(opened, session, "completed", tools.run(session, opened))
    assert item["action"] == {"type": "open_page", "url": (corpus / "sinks.md").resolve().as_uri()}

    find = ToolCall("browser.find", json.dumps({"pattern": "probability"}), "analysis", "code")
    item = call_item(find, session, "completed", tools.run(session, find))
    assert item["action"]["type"] == "find_in_page" and item["action"]["pattern"] == "probability"

    # the next response of the chain sees the same pages (its citations point into them)
    assert tools.session(tools.chain("resp_2", "resp_1")) is session
    assert tools.session(tools.chain("resp_3", None)) is not session


def test_python_calls_keep_state_per_chain_and_sessions_are_bounded() -> None:
    python = _python_tool()
    tools = BuiltinTools(python=python, max_sessions=1)
    try:
        first = tools.session(tools.chain("resp_a", None))
        run = ToolCall("python", "x = 6 * 7\nprint(x)", "analysis", "code")
        item = call_item(run, first, "completed", tools.run(first, run))
        assert item["type"] == "code_interpreter_call" and item["code"] == run.arguments
        assert item["outputs"] == [{"type": "logs", "logs": "42\n"}]
        assert item["container_id"].startswith("cntr_")
        again = tools.session(tools.chain("resp_b", "resp_a"))
        assert tools.run(again, ToolCall("python", "x + 1", "analysis", "code")).strip() == "43"
        # a new chain evicts the old one (max_sessions=1): its interpreter is gone
        other = tools.session(tools.chain("resp_c", None))
        assert "NameError" in tools.run(other, ToolCall("python", "x", "analysis", "code"))
        assert "resp_a" not in python._sessions
    finally:
        tools.close()


def test_citations_become_links_with_url_citation_annotations(corpus: Path, tmp_path: Path) -> None:
    from ossgpt.tools.browser import BrowserTool
    browser = BrowserTool(_backend(corpus, tmp_path))
    browser.call("search", json.dumps({"query": "attention sink"}))
    browser.call("open", json.dumps({"id": 0}))                # cursor 1: sinks.md
    raw = "Sinks take mass 【1†L2-L3】 and 【9†L1】 is unknown."
    whole, annotations = Citations(browser).push(raw)
    url = (corpus / "sinks.md").resolve().as_uri() + "#L3-L4"   # lines of the file, 1-based
    link = f"([Attention sinks]({url}))"
    assert whole == f"Sinks take mass {link} and 【9†L1】 is unknown."
    [a] = annotations
    assert a["type"] == "url_citation" and a["title"] == "Attention sinks"
    assert whole[a["start_index"]:a["end_index"]] == link and a["url"] == url
    # streamed in pieces that split the marker: the same text and indexes
    cite, text, streamed = Citations(browser), "", []
    for piece in [raw[:17], raw[17:20], raw[20:]]:
        out, anns = cite.push(piece)
        text, streamed = text + out, streamed + anns
    out, anns = cite.flush()
    assert (text + out, streamed + anns) == (whole, annotations)


def test_unconfigured_tools_are_refused_naming_the_flag() -> None:
    with pytest.raises(APIError) as e:
        BuiltinTools().requested([ResponsesTool(type="function", name="f"),
                                  ResponsesTool(type="web_search_preview")])
    assert e.value.status == 400 and "--corpus" in e.value.message
    assert e.value.param == "tools[1].type"
    with pytest.raises(APIError, match="code_interpreter"):
        BuiltinTools().requested([ResponsesTool(type="code_interpreter")])


def test_replayed_call_items_render_the_call_and_its_result() -> None:
    items = [{"role": "user", "content": "compute"},
             {"type": "code_interpreter_call", "id": "ci_1", "status": "completed",
              "code": "print(6 * 7)", "container_id": "cntr_1",
              "outputs": [{"type": "logs", "logs": "42\n"}]},
             {"type": "web_search_call", "id": "ws_1", "status": "completed",
              "action": {"type": "search", "query": "sinks"}}]
    from ossgpt.tokenizer import get_tokenizer
    text = get_tokenizer().decode(render_prompt(input_messages(items),
                                                builtin_tools=("python", "browser"), date=""))
    assert ("<|start|>assistant to=python<|channel|>analysis code<|message|>print(6 * 7)<|call|>"
            "<|start|>python to=assistant<|channel|>analysis<|message|>42\n<|end|>") in text
    assert 'to=browser.search<|channel|>analysis code<|message|>{"query": "sinks"}<|call|>' in text
    # once a final answer follows, the calls (analysis) are dropped, as openai-harmony drops them
    done = items + [{"role": "assistant", "content": "It is 42."}]
    text = get_tokenizer().decode(render_prompt(input_messages(done),
                                                builtin_tools=("python", "browser"), date=""))
    assert "to=python" not in text and "It is 42." in text


# -- a real server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_client(corpus: Path) -> openai.OpenAI:
    with run_server("--dtype", "float32", "--max-model-len", "4096", "--store", ":memory:",
                    "--corpus", str(corpus)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_a_server_without_corpus_refuses_web_search(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="nano", input=QUESTION, tools=WEB_SEARCH)
    assert "web_search_preview" in e.value.message and "--corpus" in e.value.message


def test_requested_tools_are_declared_and_others_are_not(tools_client: openai.OpenAI) -> None:
    def input_tokens(**kw) -> tuple[int, list[str]]:
        r = tools_client.responses.create(model="nano", input=QUESTION, max_output_tokens=1,
                                          temperature=0, **kw)
        return r.usage.input_tokens, [o.type for o in r.output]

    messages = [{"role": "user", "content": QUESTION}]
    assert input_tokens() == (len(render_prompt(messages)), input_tokens()[1])
    declared, types = input_tokens(tools=WEB_SEARCH + [{"type": "code_interpreter",
                                                        "container": {"type": "auto"}}])
    assert declared == len(render_prompt(messages, builtin_tools=("browser", "python")))
    # without tools nothing runs, even with a corpus: no call items, one round
    _, types = input_tokens()
    assert not {"web_search_call", "code_interpreter_call"} & set(types)


def test_forced_web_search_runs_on_the_server_and_the_reply_goes_on(
        tools_client: openai.OpenAI) -> None:
    r = tools_client.responses.create(model="nano", input=QUESTION, tools=WEB_SEARCH,
                                      tool_choice={"type": "web_search_preview"},
                                      temperature=0, max_output_tokens=300)
    calls = [o for o in r.output if o.type == "web_search_call"]
    assert calls and calls[0].status == "completed" and calls[0].action.type == "search"
    assert calls[0].action.query
    # the call is not the end: a second round was generated (prompt = first + call + result)
    first = len(render_prompt([{"role": "user", "content": QUESTION}], builtin_tools=("browser",)))
    assert r.usage.input_tokens > 2 * first
    assert r.output.index(calls[0]) < len(r.output) - 1 or r.status == "incomplete"
    # stored: the chain continues (the search round, analysis, is dropped once answered)
    follow = tools_client.responses.create(model="nano", input="Thanks.", tools=WEB_SEARCH,
                                           previous_response_id=r.id, max_output_tokens=1)
    assert follow.usage.input_tokens > first


def test_streamed_web_search_call_events_in_openai_order(tools_client: openai.OpenAI) -> None:
    events = list(tools_client.responses.create(
        model="nano", input=QUESTION, tools=WEB_SEARCH, tool_choice={"type": "web_search_preview"},
        temperature=0, max_output_tokens=300, stream=True))
    added = next(i for i, e in enumerate(events) if isinstance(e, ResponseOutputItemAddedEvent)
                 and e.item.type == "web_search_call")
    item_id = events[added].item.id
    kinds = [type(e) for e in events[added:added + 5]]
    assert kinds == [ResponseOutputItemAddedEvent, ResponseWebSearchCallInProgressEvent,
                     ResponseWebSearchCallSearchingEvent, ResponseWebSearchCallCompletedEvent,
                     ResponseOutputItemDoneEvent]
    assert all(e.item_id == item_id for e in events[added + 1:added + 4])
    done = events[added + 4].item
    assert done.id == item_id and done.status == "completed" and done.action.query
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output[events[added].output_index].model_dump() == done.model_dump()
