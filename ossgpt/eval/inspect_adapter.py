"""inspect_ai model provider `ossgpt`: `inspect eval task.py --model ossgpt/nano` (or
`ossgpt/DIR`, `ossgpt/openai/gpt-oss-20b`).

inspect_ai finds it through the `inspect_ai` entry point that ossgpt's package metadata declares
(`ossgpt = "ossgpt.eval.inspect_adapter"`), which imports this module and so registers the
provider.

inspect's messages become a harmony conversation (system messages are the developer's
instructions, as in gpt-oss's chat template; an assistant message's reasoning is its analysis;
tool calls and results are commentary messages to and from `functions.NAME`), the tools are
declared in the developer message, and the reply is read by ossgpt's harmony parser: the analysis
channel comes back as inspect's ContentReasoning, the final channel as text, calls to the tools
as ToolCalls (their arguments held to each tool's JSON schema while they are generated, as
`ossgpt serve` does). Every pending request decodes together in ossgpt's batching engine.

GenerateConfig: max_tokens (the whole reply, reasoning included), temperature (default 1.0, as
gpt-oss recommends), top_p, top_k, seed, stop_seqs (on the final channel) and reasoning_effort
(none and minimal are low; xhigh and max are high) are honoured.

Model args (`-M`): reasoning_effort (default medium, when the config sets none), dtype
(bfloat16 | float32 | float16), device (auto), batch_size (how many requests decode together;
also inspect's default max_connections; 16), max_tokens (default for the reply, 16384), date
(the conversation date in the system message; "" for none).
"""

from __future__ import annotations

import json
from typing import Any

from inspect_ai.model import (ChatCompletionChoice, ChatMessage, ChatMessageAssistant,
                              ChatMessageSystem, ChatMessageTool, ChatMessageUser,
                              ContentReasoning, ContentText, GenerateConfig, ModelAPI,
                              ModelOutput, ModelUsage, modelapi)
from inspect_ai.tool import ToolCall, ToolChoice, ToolFunction, ToolInfo

from ..harmony import render_prompt
from ..sampling import SamplingParams
from ..server.generation import make_constraint
from ..server.protocol import APIError
from . import _adapters

# inspect's reasoning efforts onto harmony's three.
EFFORT_MAP = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
              "xhigh": "high", "max": "high"}
STOP_REASONS = {"stop": "stop", "length": "max_tokens", "tool_calls": "tool_calls"}


def to_openai_messages(messages: list[ChatMessage]) -> list[dict]:
    """inspect ChatMessages -> the OpenAI-style messages that ossgpt.harmony renders."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessageSystem):
            out.append({"role": "system", "content": _text(m.content, i)})
        elif isinstance(m, ChatMessageUser):
            out.append({"role": "user", "content": _text(m.content, i)})
        elif isinstance(m, ChatMessageAssistant):
            msg: dict[str, Any] = {"role": "assistant", "content": _text(m.content, i)}
            reasoning = _reasoning(m.content)
            if reasoning:
                msg["reasoning"] = reasoning
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function,
                                  "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                    for c in m.tool_calls]
            out.append(msg)
        elif isinstance(m, ChatMessageTool):
            content = _text(m.content, i)
            if m.error is not None:
                content = f"Error: {m.error.message}" + (f"\n{content}" if content else "")
            msg = {"role": "tool", "content": content}
            if m.function:
                msg["name"] = m.function
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        else:
            raise ValueError(f"messages[{i}]: unsupported message role {m.role!r}")
    return out


def to_openai_tools(tools: list[ToolInfo]) -> list[dict]:
    return [{"type": "function",
             "function": {"name": t.name, "description": t.description,
                          "parameters": t.parameters.model_dump(exclude_none=True)}}
            for t in tools]


def _text(content: str | list, index: int) -> str:
    """The text of a message; reasoning parts go elsewhere, and gpt-oss reads only text."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, ContentText):
            parts.append(part.text)
        elif isinstance(part, ContentReasoning):
            continue
        else:
            raise ValueError(f"messages[{index}]: gpt-oss reads text only, not {part.type} content")
    return "\n".join(parts)


def _reasoning(content: str | list) -> str:
    if isinstance(content, str):
        return ""
    return "\n".join(p.reasoning for p in content
                     if isinstance(p, ContentReasoning) and not p.redacted and p.reasoning)


def _tool_choice(choice: ToolChoice | None) -> str:
    """inspect's tool_choice -> ossgpt server's: auto, required, none or a function name."""
    if isinstance(choice, ToolFunction):
        return choice.name
    return {"any": "required", "none": "none"}.get(str(choice), "auto")


def _tool_call(index: int, name: str, arguments: str) -> ToolCall:
    try:
        parsed, error = json.loads(arguments or "{}"), None
        if not isinstance(parsed, dict):
            parsed, error = {}, f"tool arguments are not a JSON object: {arguments}"
    except json.JSONDecodeError as e:
        parsed, error = {}, f"tool arguments are not valid JSON ({e}): {arguments}"
    return ToolCall(id=f"call_{index}", function=name, arguments=parsed, parse_error=error,
                    type="function")


@modelapi(name="ossgpt")
class OssgptAPI(ModelAPI):
    """A gpt-oss model run in-process by ossgpt."""

    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig = GenerateConfig(), reasoning_effort: str = "medium",
                 dtype: str = "bfloat16", device: str = "auto", batch_size: int = 16,
                 max_tokens: int = 16384, date: str = "", **model_args: Any) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key,
                         config=config)
        if model_args:
            raise ValueError(f"ossgpt: unknown model args {', '.join(sorted(model_args))}")
        self.reasoning_effort = _adapters.effort(reasoning_effort)
        self.model = _adapters.load_model(model_name, _adapters.dtype(dtype), device)
        self.batch_size = int(batch_size)
        self.default_max_tokens = int(max_tokens)
        self.date = "" if date is None else str(date)
        self.engine = _adapters.make_engine(self.model, self.batch_size)
        self._calls = 0

    def max_connections(self) -> int:
        return self.batch_size

    def max_tokens(self) -> int | None:
        return self.default_max_tokens

    def close(self) -> None:
        self.engine.shutdown()

    def prompt(self, input: list[ChatMessage], tools: list[ToolInfo],
               config: GenerateConfig) -> list[int]:
        """The harmony prompt tokens of a request, ending in `<|start|>assistant`."""
        effort = EFFORT_MAP.get(config.reasoning_effort or "", self.reasoning_effort)
        return render_prompt(to_openai_messages(input), reasoning_effort=effort,
                             tools=to_openai_tools(tools) or None, date=self.date)

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo],
                       tool_choice: ToolChoice, config: GenerateConfig) -> ModelOutput:
        prompt = self.prompt(input, tools, config)
        openai_tools = to_openai_tools(tools)
        room = self.model.config.context_length - len(prompt)
        if room < 1:
            return ModelOutput.from_content(self.model_name, "", stop_reason="model_length")
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in openai_tools}
        try:
            constraint = make_constraint(schemas, _tool_choice(tool_choice) if tools else "auto",
                                         None)
        except APIError as e:
            raise ValueError(e.message) from None
        sampling = SamplingParams(
            temperature=1.0 if config.temperature is None else config.temperature,
            top_p=1.0 if config.top_p is None else config.top_p,
            top_k=config.top_k or 0, seed=config.seed)
        max_tokens = min(config.max_tokens or self.default_max_tokens, room)
        run = await _adapters.reply(self.engine, prompt, max_tokens, sampling,
                                    config.stop_seqs or (), constraint)

        content: list = []
        if run.reasoning:
            content.append(ContentReasoning(reasoning=run.reasoning))
        if run.content or not content:
            content.append(ContentText(text=run.content))
        calls = []
        for call in run.calls:
            calls.append(_tool_call(self._calls, call["name"], call["arguments"]))
            self._calls += 1
        message = ChatMessageAssistant(content=content, tool_calls=calls or None,
                                       model=self.model_name, source="generate")
        return ModelOutput(
            model=self.model_name,
            choices=[ChatCompletionChoice(message=message,
                                          stop_reason=STOP_REASONS.get(run.finish_reason,
                                                                       "unknown"))],
            usage=ModelUsage(input_tokens=len(prompt), output_tokens=run.completion_tokens,
                             total_tokens=len(prompt) + run.completion_tokens,
                             reasoning_tokens=run.reasoning_tokens))
