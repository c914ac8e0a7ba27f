"""Rendering: OpenAI-style chat messages mapped onto harmony messages, which the
`openai-harmony` library renders to tokens exactly as in training."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort,
                            RenderConversationConfig, Role, SystemContent, ToolDescription,
                            ToolNamespaceConfig)

from ..tokenizer import harmony_encoding

_EFFORTS = {e.value.lower(): e for e in ReasoningEffort}
# Where OpenAI-style messages carry the reasoning, by client (vLLM, DeepSeek, Anthropic-style).
REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")
# The tools gpt-oss was trained with, declared in the system message (not the developer's
# `functions` namespace), and the names the model calls them by.
BUILTIN_TOOLS = {"browser": ToolNamespaceConfig.browser, "python": ToolNamespaceConfig.python}
BUILTIN_CALLS = {"browser": ("browser.search", "browser.open", "browser.find"),
                 "python": ("python",)}


def stop_tokens() -> list[int]:
    """Tokens that end an assistant reply: <|return|> (done) and <|call|> (a tool call to run).

    <|end|> (200007) is deliberately absent: inside a reply it closes one message (analysis,
    a commentary preamble) and the model goes on with <|start|>assistant... Stop on it only
    when sampling a single message, never a whole reply."""
    # sorted: the library returns them from a hash set, in a different order on each run
    return sorted(harmony_encoding().stop_tokens_for_assistant_actions())


def render_conversation(conv: Conversation, for_completion: bool = True, *,
                        auto_drop_analysis: bool = True) -> list[int]:
    """Render harmony messages; with `for_completion`, end with `<|start|>assistant` for the
    model to continue. `auto_drop_analysis` is the library's own dropping of old analysis."""
    config = RenderConversationConfig(auto_drop_analysis=auto_drop_analysis)
    if for_completion:
        return harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT, config)
    return harmony_encoding().render_conversation(conv, config)


def render_prompt(messages: Sequence[dict], *, reasoning_effort: str = "medium",
                  system: str | None = None, developer: str | None = None,
                  tools: Sequence[dict] | None = None, date: str | None = None,
                  knowledge_cutoff: str = "2024-06",
                  builtin_tools: Sequence[str] = ()) -> list[int]:
    """Render an OpenAI-style chat ready for the assistant's reply (ends in <|start|>assistant).

    `system` overrides the model identity line; `developer` are instructions (system and
    developer messages in `messages` are appended to them); `tools` are function tools, either
    {"type": "function", "function": {...}} or bare {"name", "description", "parameters"};
    `date` is the conversation start date (default today, "" for none); `builtin_tools`: "browser"
    and/or "python", declared in the system message as openai-harmony declares them.

    Calls to built-in tools are assistant tool_calls named "browser.search", "python", ...; a
    call (or a tool result) may say the `channel` it was on ("analysis" or "commentary", the
    default) and a call its `content_type` ("code", "<|constrain|>json"), so history renders
    as the model wrote it. A tool result on an unnamed channel takes its call's channel.
    """
    conv = build_conversation(messages, reasoning_effort=reasoning_effort, system=system,
                              developer=developer, tools=tools, date=date,
                              knowledge_cutoff=knowledge_cutoff, builtin_tools=builtin_tools)
    return render_conversation(conv, for_completion=True)


def build_conversation(messages: Sequence[dict], *, reasoning_effort: str = "medium",
                       system: str | None = None, developer: str | None = None,
                       tools: Sequence[dict] | None = None, date: str | None = None,
                       knowledge_cutoff: str = "2024-06",
                       builtin_tools: Sequence[str] = ()) -> Conversation:
    """The harmony Conversation that `render_prompt` renders (same arguments)."""
    effort = _EFFORTS.get(str(reasoning_effort).lower())
    if effort is None:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    unknown = [b for b in builtin_tools if b not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"builtin_tools: unknown {unknown}; known: {sorted(BUILTIN_TOOLS)}")
    sys_content = SystemContent.new().with_reasoning_effort(effort)
    sys_content = sys_content.with_knowledge_cutoff(knowledge_cutoff)
    if system is not None:
        sys_content = sys_content.with_model_identity(system)
    date = datetime.date.today().isoformat() if date is None else date
    if date:
        sys_content = sys_content.with_conversation_start_date(date)
    for name in dict.fromkeys(builtin_tools):  # once each, in the order given
        sys_content = sys_content.with_tools(BUILTIN_TOOLS[name]())
    builtin = {call for b in builtin_tools for call in BUILTIN_CALLS[b]}

    instructions = [developer] if developer else []
    body: list[Message] = []
    # tool_call_id -> (name, channel) of the call, to name tool results and put them on its channel
    calls: dict[str, tuple[str, str]] = {}
    last_call: tuple[str, str] | None = None
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("system", "developer"):
            if text := _text(msg.get("content")):
                instructions.append(text)
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(msg.get("content"))))
        elif role == "assistant":
            body.extend(_assistant_messages(msg, calls, builtin))
            for call in msg.get("tool_calls") or []:
                last_call = (_function(call)[0], call.get("channel") or "commentary")
        elif role in ("tool", "function"):
            call = calls.get(msg.get("tool_call_id", "")) or last_call
            name = msg.get("name") or (call[0] if call else None)
            if not name:
                raise ValueError(f"messages[{i}]: tool result without a name or known tool_call_id")
            channel = msg.get("channel") or (call[1] if call and call[0] == name else "commentary")
            body.append(Message.from_author_and_content(Author.new(Role.TOOL, _recipient(name, builtin)),
                                                        _text(msg.get("content")))
                        .with_channel(channel).with_recipient("assistant"))
        else:
            raise ValueError(f"messages[{i}]: unknown role {role!r}")

    head = [Message.from_role_and_content(Role.SYSTEM, sys_content)]
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tools:
            dev = dev.with_function_tools([_tool_description(t) for t in tools])
        head.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    return Conversation.from_messages(head + _drop_old_analysis(body))


def _recipient(name: str, builtin: set[str]) -> str:
    """The harmony name of a tool: "functions.NAME" for function tools; built-in tools keep their
    own ("browser.search", "python"), and so does any other dotted (namespaced) name."""
    if name in builtin or "." in name:
        return name
    return "functions." + name


def _assistant_messages(msg: dict, calls: dict[str, tuple[str, str]],
                        builtin: set[str]) -> list[Message]:
    out = []
    reasoning = next((msg[k] for k in REASONING_KEYS if msg.get(k)), None)
    if reasoning:
        out.append(_assistant(_text(reasoning), "analysis"))
    content = _text(msg.get("content"))
    if content:
        # Text beside tool calls is a preamble, which harmony puts on commentary. On final it
        # would also mark the turn as finished and get this turn's analysis dropped.
        out.append(_assistant(content, "commentary" if msg.get("tool_calls") else "final"))
    for call in msg.get("tool_calls") or []:
        name, arguments = _function(call)
        channel = call.get("channel") or "commentary"
        if call.get("id"):
            calls[call["id"]] = (name, channel)
        recipient = _recipient(name, builtin)
        # Function calls are JSON under <|constrain|>json; built-in tools are called as the model
        # calls them, with "code" unless the call says otherwise.
        content_type = call.get("content_type") or (
            "<|constrain|>json" if recipient.startswith("functions.") else "code")
        out.append(_assistant(arguments, channel).with_recipient(recipient)
                   .with_content_type(content_type))
    return out


def _assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def _function(call: dict) -> tuple[str, str]:
    fn = call.get("function") or call
    arguments = fn.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return fn["name"], arguments


def _tool_description(tool: dict) -> ToolDescription:
    fn = tool["function"] if tool.get("type") == "function" and "function" in tool else tool
    # No parameters and {} both mean "takes nothing"; harmony renders {} as `(_: any)`.
    return ToolDescription.new(fn["name"], fn.get("description") or "",
                               fn.get("parameters") or None)


def _text(content: Any) -> str:
    """Message content: a string, None, or a list of OpenAI text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
            isinstance(p, str) or (isinstance(p, dict) and "text" in p) for p in content):
        return "".join(p if isinstance(p, str) else p["text"] for p in content)
    raise ValueError(f"unsupported message content {content!r}")


def _drop_old_analysis(messages: list[Message]) -> list[Message]:
    """Drop every analysis message that a later final message follows.

    This is the rule of gpt-oss's Hugging Face chat template (`future_final_message`). The
    library's auto_drop_analysis in openai-harmony 0.0.8 drops analysis only before the *first*
    final message (and only if the last assistant message is final), so a third turn still shows
    the second turn's reasoning (openai/harmony PR #96, unmerged). Analysis of a turn still in
    progress (tool calls, no final yet) is kept. Tool results on the analysis channel (a built-in
    tool called while thinking) go with the analysis, as openai-harmony drops them: their call
    is gone, and the model never saw a result without its call."""
    last_final = max((i for i, m in enumerate(messages)
                      if m.author.role == Role.ASSISTANT and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages)
            if not (i < last_final and m.author.role in (Role.ASSISTANT, Role.TOOL)
                    and m.channel == "analysis")]
