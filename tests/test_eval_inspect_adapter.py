"""The inspect_ai model provider `ossgpt` (ossgpt/eval/inspect_adapter.py) on the bundled nano
model: inspect's messages and tools as harmony, replies with reasoning, tool calls and the
GenerateConfig, and `inspect eval` on a small task file written here, offline."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("inspect_ai", reason="inspect_ai is not installed: pip install -e '.[eval]'")

from inspect_ai.model import (ChatMessageAssistant, ChatMessageSystem,  # noqa: E402
                              ChatMessageTool, ChatMessageUser, ContentReasoning, ContentText,
                              GenerateConfig, get_model)
from inspect_ai.tool import ToolCall, ToolCallError, ToolInfo, ToolParams  # noqa: E402

from ossgpt.demo_tools import DEMO_TOOLS  # noqa: E402
from ossgpt.eval.inspect_adapter import to_openai_messages, to_openai_tools  # noqa: E402
from ossgpt.harmony import render_prompt  # noqa: E402

# inspect_ai's own retry set-up, on tenacity's newer releases.
pytestmark = pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated")

GREEDY = GenerateConfig(temperature=0, max_tokens=300)
# nano's demo tools exactly as it was trained on them.
TOOLS = [ToolInfo(name=t["function"]["name"], description=t["function"]["description"],
                  parameters=ToolParams.model_validate(t["function"]["parameters"]))
         for t in DEMO_TOOLS]


@pytest.fixture(scope="module")
def model():
    return get_model("ossgpt/nano", reasoning_effort="low", memoize=False)


def _run(coro):
    return asyncio.run(coro)


def test_messages_and_tools_translate_to_harmony(model):
    call = ToolCall(id="call_7", function="get_weather", arguments={"city": "Paris"})
    messages = [
        ChatMessageSystem(content="Answer briefly."),
        ChatMessageUser(content=[ContentText(text="What's the weather in Paris?")]),
        ChatMessageAssistant(content=[ContentReasoning(reasoning="I will call get_weather."),
                                      ContentText(text="")], tool_calls=[call]),
        ChatMessageTool(content='{"temperature_c": 18}', tool_call_id="call_7",
                        function="get_weather"),
        ChatMessageAssistant(content="It is 18°C."),
        ChatMessageUser(content="And in Atlantis?"),
        ChatMessageAssistant(content="", tool_calls=[
            ToolCall(id="call_8", function="get_weather", arguments={"city": "Atlantis"})]),
        ChatMessageTool(content="", tool_call_id="call_8", function="get_weather",
                        error=ToolCallError("unknown", "no such city")),
    ]
    expected = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning": "I will call get_weather.",
         "tool_calls": [{"id": "call_7", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temperature_c": 18}', "name": "get_weather",
         "tool_call_id": "call_7"},
        {"role": "assistant", "content": "It is 18°C."},
        {"role": "user", "content": "And in Atlantis?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_8", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Atlantis"}'}}]},
        {"role": "tool", "content": "Error: no such city", "name": "get_weather",
         "tool_call_id": "call_8"},
    ]
    assert to_openai_messages(messages) == expected
    assert to_openai_tools(TOOLS)[0]["function"]["parameters"]["required"] == ["city"]
    # The prompt is ossgpt's own rendering of those messages, with the config's effort.
    prompt = model.api.prompt(messages, TOOLS, GenerateConfig(reasoning_effort="high"))
    assert prompt == render_prompt(expected, reasoning_effort="high", tools=to_openai_tools(TOOLS),
                                   date="")
    # inspect's efforts beyond harmony's three map onto them; none set: the -M default (low).
    for given, effort in (("minimal", "low"), ("xhigh", "high"), (None, "low")):
        assert model.api.prompt(messages[:2], [], GenerateConfig(reasoning_effort=given)) == \
            render_prompt(expected[:2], reasoning_effort=effort, date="")


def test_reply_has_reasoning_and_the_final_answer(model):
    output = _run(model.generate("What is the capital of France?", config=GREEDY))
    message = output.choices[0].message
    reasoning = [c for c in message.content if isinstance(c, ContentReasoning)]
    assert reasoning and "France" in reasoning[0].reasoning
    assert "Paris" in output.completion and "<|" not in output.completion
    assert output.choices[0].stop_reason == "stop"
    assert output.usage.reasoning_tokens > 0
    assert output.usage.output_tokens > output.usage.reasoning_tokens
    # max_tokens: the reply stops there.
    short = _run(model.generate("What is the capital of France?",
                                config=GenerateConfig(temperature=0, max_tokens=4)))
    assert short.choices[0].stop_reason == "max_tokens" and short.usage.output_tokens == 4


def test_tool_call_round_trip(model):
    async def conversation():
        messages = [ChatMessageUser(content="What's the weather in Paris?")]
        first = await model.generate(messages, tools=TOOLS, config=GREEDY)
        messages.append(first.message)
        (call,) = first.message.tool_calls
        messages.append(ChatMessageTool(
            content='{"city": "Paris", "temperature_c": 18, "condition": "cloudy"}',
            tool_call_id=call.id, function=call.function))
        return first, await model.generate(messages, tools=TOOLS, config=GREEDY)

    first, second = _run(conversation())
    assert first.choices[0].stop_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.function == "get_weather" and call.arguments == {"city": "Paris"}
    assert call.parse_error is None
    assert "18" in second.completion and not second.message.tool_calls
    # tool_choice none: the reply may not call a tool.
    refused = _run(model.generate("What's the weather in Paris?", tools=TOOLS, tool_choice="none",
                                  config=GREEDY))
    assert not refused.message.tool_calls and refused.choices[0].stop_reason != "tool_calls"


def test_seeded_samples_do_not_depend_on_the_batch(model):
    config = GenerateConfig(temperature=1.0, seed=11, max_tokens=60)
    question = "What is 345 + 278?"

    async def alone():
        return (await model.generate(question, config=config)).message.text

    async def among_others():
        others = [model.generate(f"What is {i} + {i}?",
                                 config=GenerateConfig(temperature=1.0, seed=i, max_tokens=60))
                  for i in range(5)]
        results = await asyncio.gather(model.generate(question, config=config), *others)
        return results[0].message.text

    assert _run(alone()) == _run(among_others())


TASK = '''
import json

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, use_tools
from inspect_ai.tool import ToolDef, ToolParams

from ossgpt.demo_tools import DEMO_TOOLS, run_tool


def demo_tool(spec):
    fn = json.loads(json.dumps(spec["function"]))
    for name, param in fn["parameters"]["properties"].items():
        param.setdefault("description", name.replace("_", " "))  # inspect wants one for each

    async def execute(**arguments) -> str:
        return run_tool(fn["name"], json.dumps(arguments))

    return ToolDef(execute, name=fn["name"], description=fn["description"],
                   parameters=ToolParams.model_validate(fn["parameters"]))


@task
def nano_questions():
    return Task(dataset=[Sample(input="What is the capital of France?", target="Paris"),
                         Sample(input="What is 12 + 30?", target="42"),
                         Sample(input="What is the capital of Japan?", target="Tokyo")],
                solver=[generate()], scorer=includes())


@task
def nano_weather():
    return Task(dataset=[Sample(input="What's the weather in Paris?", target="18")],
                solver=[use_tools(*[demo_tool(t) for t in DEMO_TOOLS]), generate()],
                scorer=includes())
'''


def test_inspect_eval_command_line(tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    inspect = Path(sys.executable).parent / "inspect"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([str(inspect), "eval", "task.py", "--model", "ossgpt/nano",
                          "-M", "reasoning_effort=low", "--temperature", "0", "--limit", "3",
                          "--log-dir", str(tmp_path / "logs"), "--display", "none",
                          "--log-format", "json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    logs = {}
    for f in (tmp_path / "logs").glob("*.json"):
        log = json.loads(f.read_text())
        logs[log["eval"]["task"]] = log
    assert set(logs) == {"nano_questions", "nano_weather"}
    for name, log in logs.items():
        assert log["status"] == "success", log.get("error")
        assert log["eval"]["model"] == "ossgpt/nano"
        for sample in log["samples"]:
            assert "includes" in sample["scores"]
            replies = [m for m in sample["messages"] if m["role"] == "assistant"]
            assert any(c["type"] == "reasoning" and c["reasoning"]
                       for m in replies for c in m["content"] if isinstance(c, dict))
    questions = logs["nano_questions"]
    assert len(questions["samples"]) == 3
    accuracy = questions["results"]["scores"][0]["metrics"]["accuracy"]["value"]
    assert accuracy >= 2 / 3   # nano knows these (it was trained on such questions)
    (weather,) = logs["nano_weather"]["samples"]
    calls = [c for m in weather["messages"] if m["role"] == "assistant"
             for c in m.get("tool_calls") or []]
    assert [c["function"] for c in calls] == ["get_weather"]
    assert calls[0]["arguments"] == {"city": "Paris"}
    assert any(m["role"] == "tool" and "18" in m["content"] for m in weather["messages"])
