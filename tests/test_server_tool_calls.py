"""Every tool call `ossgpt serve` reports is valid: auto-mode requests with several tools offered
(openai/gpt-oss's six compatibility tools and nano's two), through the real `openai` client, in
both APIs, streamed and not, sampled; a call cut short by the token budget comes back as text;
`tool_choice: "none"` keeps the reply from calling while the tools stay in the prompt."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest

from ossgpt.demo_tools import DEMO_TOOLS

from conftest import PEER_DATA

WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
COMPAT = PEER_DATA / "gpt-oss"
needs_compat = pytest.mark.skipif(not COMPAT.is_dir(),
                                  reason=f"gpt-oss compatibility cases not found at {COMPAT}")


def as_responses_tools(tools: list[dict]) -> list[dict]:
    return [{"type": "function", **t["function"]} for t in tools]


def compatibility() -> tuple[list[dict], list[str]]:
    """-> chat tools (the six of gpt-oss's compatibility test, then nano's demo tools), prompts
    (the test's 30 cases, then two that nano answers with a call)."""
    tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description",
                                                                 "parameters")}}
             for t in json.loads((COMPAT / "compatibility_tools.json").read_text())]
    lines = (COMPAT / "compatibility_cases.jsonl").read_text().splitlines()
    cases = [json.loads(line) for line in lines]
    return tools + DEMO_TOOLS, [c["input"] for c in cases] + ["What's the weather in Lima?",
                                                               "Convert 5 kg to pounds."]


def ask(client: openai.OpenAI, tools: list[dict], prompt: str, i: int) -> tuple[list, str]:
    """Request i of the sweep: Chat Completions or Responses, streamed or not, by i; seed i; a
    token budget of 40, 80 or 160. -> ([(name, arguments)] of the reported calls, finish)."""
    api, stream, budget = ("chat", "responses")[i % 2], bool(i // 2 % 2), (40, 80, 160)[i % 3]
    if api == "chat":
        kw = dict(model="nano", messages=[{"role": "user", "content": prompt}], tools=tools,
                  temperature=1, seed=i, max_tokens=budget)
        if not stream:
            choice = client.chat.completions.create(**kw).choices[0]
            calls = choice.message.tool_calls or []
            return [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason
        calls, finish = {}, None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for tc in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(tc.index, ["", ""])
                call[0] += tc.function.name or ""
                call[1] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        return [tuple(c) for c in calls.values()], finish
    kw = dict(model="nano", input=prompt, tools=as_responses_tools(tools), temperature=1,
              max_output_tokens=budget, extra_body={"seed": i})
    response = ([e for e in client.responses.create(stream=True, **kw)][-1].response if stream
                else client.responses.create(**kw))
    return ([(o.name, o.arguments) for o in response.output if o.type == "function_call"],
            response.status)


@needs_compat
def test_every_reported_tool_call_is_valid(client: openai.OpenAI) -> None:
    tools, prompts = compatibility()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    n = 64
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: ask(client, tools, prompts[i % len(prompts)], i),
                                range(n)))
    calls = [call for reported, _ in results for call in reported]
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
    cut = sum(finish in ("length", "incomplete") for _, finish in results)
    print(f"\n{n} requests, {len(calls)} tool calls reported, all valid; {cut} cut by max_tokens")
    assert len(calls) >= 10 and cut >= 5, (len(calls), cut)


def test_a_call_cut_short_by_the_token_budget_is_text(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="nano", messages=WEATHER, tools=DEMO_TOOLS,
                                          temperature=0)
    arguments = full.choices[0].message.tool_calls[0].function.arguments
    budget = full.usage.completion_tokens - 3   # stops inside the arguments
    r = client.chat.completions.create(model="nano", messages=WEATHER, tools=DEMO_TOOLS,
                                       temperature=0, max_tokens=budget)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and not msg.tool_calls
    assert msg.content and arguments.startswith(msg.content) and msg.content != arguments
    chunks = list(client.chat.completions.create(model="nano", messages=WEATHER, tools=DEMO_TOOLS,
                                                 temperature=0, max_tokens=budget, stream=True))
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"
    r = client.responses.create(model="nano", input=WEATHER[0]["content"], temperature=0,
                                tools=as_responses_tools(DEMO_TOOLS), max_output_tokens=budget)
    assert r.status == "incomplete" and r.output_text == msg.content
    assert not any(o.type == "function_call" for o in r.output)


def test_stop_strings_never_cut_a_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="nano", messages=WEATHER, tools=DEMO_TOOLS,
                                       temperature=0, stop=["Paris", '"}'])
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_tool_choice_none(client: openai.OpenAI) -> None:
    auto = client.chat.completions.create(model="nano", messages=WEATHER, tools=DEMO_TOOLS,
                                          temperature=0)
    assert auto.choices[0].finish_reason == "tool_calls"   # nano calls get_weather for this
    for seed, stream in ((0, False), (1, True), (2, False), (3, True)):
        kw = dict(model="nano", messages=WEATHER, tools=DEMO_TOOLS, tool_choice="none",
                  temperature=1, seed=seed, max_tokens=120)
        if stream:
            chunks = list(client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw))
            assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
            finish, usage = chunks[-2].choices[0].finish_reason, chunks[-1].usage
        else:
            r = client.chat.completions.create(**kw)
            assert not r.choices[0].message.tool_calls
            finish, usage = r.choices[0].finish_reason, r.usage
        assert finish in ("stop", "length")
        assert usage.prompt_tokens == auto.usage.prompt_tokens   # the tools are still in the prompt
    tools = as_responses_tools(DEMO_TOOLS)
    auto = client.responses.create(model="nano", input=WEATHER[0]["content"], tools=tools,
                                   temperature=0)
    for seed, stream in ((0, False), (1, True)):
        kw = dict(model="nano", input=WEATHER[0]["content"], tools=tools, tool_choice="none",
                  temperature=1, max_output_tokens=120, extra_body={"seed": seed})
        r = ([e for e in client.responses.create(stream=True, **kw)][-1].response if stream
             else client.responses.create(**kw))
        assert r.tool_choice == "none" and r.status in ("completed", "incomplete")
        assert not any(o.type == "function_call" for o in r.output)
        assert r.usage.input_tokens == auto.usage.input_tokens
