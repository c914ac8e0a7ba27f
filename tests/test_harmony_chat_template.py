"""ossgpt/harmony/chat_template.jinja (the chat template GGUF files carry) renders what
openai-harmony renders, under both Jinja whitespace settings runtimes use (transformers,
llama-cpp-python and llama.cpp trim blocks; plain Jinja does not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ossgpt.harmony import render_prompt
from ossgpt.tokenizer import get_tokenizer

TEMPLATE = Path(__file__).resolve().parents[1] / "ossgpt" / "harmony" / "chat_template.jinja"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "The city"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
            "days": {"type": "array", "items": {"type": "integer"}},
            "exact": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "get_location", "description": "Gets the location.",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"name": "noop", "description": "Does nothing."},
]
TOOL_TURN = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Need the weather.", "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp": 20}'},
]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "reasoning": "A greeting.", "content": "Hello!"},    # reasoning dropped
    {"role": "user", "content": "Bye"},
]
CASES = {"question": ([{"role": "user", "content": "What is 348 + 275?"}], None, "", "medium"),
         "tool call and result": (TOOL_TURN, TOOLS, "", "medium"),
         "two turns": (TWO_TURNS, None, "2025-01-02", "low"),
         "two turns with tools": (TWO_TURNS, TOOLS, "2025-01-02", "high")}


@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_template_renders_as_harmony(case, trim):
    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    messages, tools, date, effort = CASES[case]
    ours = env.from_string(TEMPLATE.read_text()).render(
        messages=messages, tools=tools, add_generation_prompt=True, date=date, reasoning_effort=effort)
    assert ours == get_tokenizer().decode(render_prompt(messages, tools=tools, date=date, reasoning_effort=effort))
