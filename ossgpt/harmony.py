"""The harmony chat format of gpt-oss, through the `openai-harmony` library.

Rendering maps OpenAI-style chat messages onto harmony messages and lets the library render
them. Parsing wraps the library's StreamableParser so that whatever the model emits, the caller
gets text and tool calls back without an exception and without format markup in them.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai_harmony as oh
from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort,
                            RenderConversationConfig, Role, StreamableParser, SystemContent,
                            ToolDescription)

from .tokenizer import CALL, END, MESSAGE, RETURN, START, IncrementalDecoder, Tokenizer
from .tokenizer import harmony_encoding

_EFFORTS = {e.value.lower(): e for e in ReasoningEffort}
# Where OpenAI-style messages carry the reasoning, by client (vLLM, DeepSeek, Anthropic-style).
REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")
_TERMINATORS = frozenset((END, RETURN, CALL))
_SPECIAL_TEXT = re.compile(
    r"<\|(?:start|end|message|channel|constrain|return|call|endoftext|startoftext|reserved_\d+)\|>")
_NOT_TOOLS = frozenset(("assistant", "user", "all"))


# -- rendering -----------------------------------------------------------------------------------


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
                  knowledge_cutoff: str = "2024-06") -> list[int]:
    """Render an OpenAI-style chat ready for the assistant's reply (ends in <|start|>assistant).

    `system` overrides the model identity line; `developer` are instructions (system and
    developer messages in `messages` are appended to them); `tools` are function tools, either
    {"type": "function", "function": {...}} or bare {"name", "description", "parameters"};
    `date` is the conversation start date (default today, "" for none).
    """
    conv = build_conversation(messages, reasoning_effort=reasoning_effort, system=system,
                              developer=developer, tools=tools, date=date,
                              knowledge_cutoff=knowledge_cutoff)
    return render_conversation(conv, for_completion=True)


def build_conversation(messages: Sequence[dict], *, reasoning_effort: str = "medium",
                       system: str | None = None, developer: str | None = None,
                       tools: Sequence[dict] | None = None, date: str | None = None,
                       knowledge_cutoff: str = "2024-06") -> Conversation:
    """The harmony Conversation that `render_prompt` renders (same arguments)."""
    effort = _EFFORTS.get(str(reasoning_effort).lower())
    if effort is None:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    sys_content = SystemContent.new().with_reasoning_effort(effort)
    sys_content = sys_content.with_knowledge_cutoff(knowledge_cutoff)
    if system is not None:
        sys_content = sys_content.with_model_identity(system)
    date = datetime.date.today().isoformat() if date is None else date
    if date:
        sys_content = sys_content.with_conversation_start_date(date)

    instructions = [developer] if developer else []
    body: list[Message] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, to name tool results
    last_call: str | None = None
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("system", "developer"):
            if text := _text(msg.get("content")):
                instructions.append(text)
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(msg.get("content"))))
        elif role == "assistant":
            body.extend(_assistant_messages(msg, call_names))
            for call in msg.get("tool_calls") or []:
                last_call = _function(call)[0]
        elif role in ("tool", "function"):
            name = msg.get("name") or call_names.get(msg.get("tool_call_id", "")) or last_call
            if not name:
                raise ValueError(f"messages[{i}]: tool result without a name or known tool_call_id")
            if "." not in name:  # function names have no dots; builtins (browser.search) do
                name = "functions." + name
            body.append(Message.from_author_and_content(Author.new(Role.TOOL, name),
                                                        _text(msg.get("content")))
                        .with_channel("commentary").with_recipient("assistant"))
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


def _assistant_messages(msg: dict, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = next((msg[k] for k in REASONING_KEYS if msg.get(k)), None)
    if reasoning:
        out.append(_assistant(_text(reasoning), "analysis"))
    content = _text(msg.get("content"))
    calls = msg.get("tool_calls") or []
    if content:
        # Text beside tool calls is a preamble, which harmony puts on commentary. On final it
        # would also mark the turn as finished and get this turn's analysis dropped.
        out.append(_assistant(content, "commentary" if calls else "final"))
    for call in calls:
        name, arguments = _function(call)
        if call.get("id"):
            call_names[call["id"]] = name
        out.append(_assistant(arguments, "commentary").with_recipient("functions." + name)
                   .with_content_type("<|constrain|>json"))
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
    progress (tool calls, no final yet) is kept."""
    last_final = max((i for i, m in enumerate(messages)
                      if m.author.role == Role.ASSISTANT and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages)
            if not (i < last_final and m.author.role == Role.ASSISTANT and m.channel == "analysis")]


# -- parsing -------------------------------------------------------------------------------------


@dataclass
class ReplyDelta:
    """New text of the message being generated; channel "final" for text without a header.
    `message` numbers the reply's messages, so two calls of the same tool stay apart."""
    channel: str
    recipient: str | None
    text: str
    message: int = 0


@dataclass
class ParsedMessage:
    """One message of a reply; header fields are cleaned of any format markup."""
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str
    name: str | None = None  # the author's name (tool messages)


@dataclass
class ToolCall:
    name: str       # without the "functions." namespace
    arguments: str  # the JSON text as generated, not validated


@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    messages: list[ParsedMessage] = field(default_factory=list)
    well_formed: bool = True


def _clean(value: str | None) -> str | None:
    """A header field up to any markup: 'functions.f<|channel|>commentary' -> 'functions.f'."""
    return (value.split("<|", 1)[0].strip() or None) if value else None


def tool_name(recipient: str) -> str:
    """The function a recipient names: "functions.get_weather<|channel|>x" -> "get_weather"."""
    name = (_clean(recipient) or "").removeprefix("functions.")
    return re.match(r"[\w.\-]*", name).group(0)


def called_function(channel: str | None, recipient: str | None) -> str | None:
    """The function a message with this header calls ("" when the name is unusable), or None
    when it is not a call."""
    if recipient and recipient not in _NOT_TOOLS and channel != "final":
        return tool_name(recipient)
    return None


class ReplyParser:
    """Streams the assistant's reply tokens into deltas and messages; never raises on model output.

    The library parses headers (non-strict, so a missing <|message|> or channel is tolerated);
    content is decoded here, so special tokens inside content are dropped and characters split
    across tokens come out whole. After a parse error the parser skips header garbage, keeps
    plain text as final-channel content and resynchronises on the next <|start|>.

    `role`: the role the prompt already opened (`<|start|>assistant`), or None when the tokens
    begin with <|start|> themselves.
    """

    def __init__(self, encoding: oh.HarmonyEncoding | None = None, *,
                 role: Role | None = Role.ASSISTANT) -> None:
        self._enc = encoding if encoding is not None else harmony_encoding()
        self._tok = Tokenizer(self._enc)
        self._parser = StreamableParser(self._enc, role, strict=False)
        self._seen = 0  # library messages already converted
        self._messages: list[ParsedMessage] = []
        self._in_content = False
        self._header: tuple[str, str | None, str | None] = ("assistant", None, None)
        self._pieces: list[str] = []
        self._decoder = IncrementalDecoder(self._tok, skip_special=True)
        self._recovering = False
        self._finished = False
        self._message_no = 0
        self.well_formed = True

    @property
    def in_content(self) -> tuple[str, str | None] | None:
        """(channel, recipient) of the message whose content is being generated, else None."""
        if self._recovering:
            return ("final", None)
        return (self._header[1] or "final", self._header[2]) if self._in_content else None

    def push(self, token: int) -> ReplyDelta | None:
        """Feed one generated token; return the text it adds, if any."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        if self._recovering:
            return self._push_recovering(token)
        if not self._process(token):  # content accepts any token: only headers fail
            return self._push_recovering(token)
        if self._in_content and token not in _TERMINATORS:
            if self._tok.is_special(token):
                self.well_formed = False  # markup inside content: dropped from the text
            return self._delta(self._decoder.push(token))
        if token in _TERMINATORS:
            return self._complete()
        if token == MESSAGE and self._parser.state == oh.StreamState.CONTENT:
            self._in_content = True
            self._message_no += 1
            self._header = (getattr(self._parser.current_role, "value", "assistant"),
                            _clean(self._parser.current_channel),
                            _clean(self._parser.current_recipient))
        return None

    def finish(self) -> ReplyDelta | None:
        """End of generation (stop token or not); return any text still held back."""
        if self._finished:
            return None
        self._finished = True
        if self._recovering:
            return self._close_recovered()
        if self._in_content:
            try:
                self._parser.process_eos()
            except oh.HarmonyError:
                self.well_formed = False
            return self._complete()
        if self._parser.state_data.get("header_tokens"):  # only present in the Header state
            # Text never followed by <|message|> (e.g. plain text with no markup at all): an
            # <|end|> makes the non-strict parser turn it into a message without a channel.
            if self._process(END):
                return self._complete()
        return None

    def messages(self) -> list[ParsedMessage]:
        """All messages of the reply (finishes the parser)."""
        self.finish()
        return list(self._messages)

    def reply(self) -> Reply:
        """The reply split into reasoning, content and tool calls (finishes the parser)."""
        reasoning, content, calls = [], [], []
        messages = self.messages()
        well_formed = self.well_formed
        for m in messages:
            if m.role != "assistant":
                continue  # e.g. a hallucinated tool result
            if (name := called_function(m.channel, m.recipient)) is not None:
                if name:
                    calls.append(ToolCall(name, m.text))
                else:
                    well_formed = False
            elif m.channel == "analysis":
                reasoning.append(m.text)
            else:  # final, commentary preambles, and text without a channel
                content.append(m.text)
        return Reply("\n".join(reasoning), "\n".join(content), calls, messages, well_formed)

    def _process(self, token: int) -> bool:
        try:
            self._parser.process(token)
            return True
        except oh.HarmonyError:
            self.well_formed = False
            self._recovering = True
            self._in_content = False
            self._pieces, self._decoder = [], IncrementalDecoder(self._tok, skip_special=True)
            return False

    def _delta(self, text: str) -> ReplyDelta | None:
        if not text:
            return None
        self._pieces.append(text)
        role, channel, recipient = self._header
        return (ReplyDelta(channel or "final", recipient, text, self._message_no)
                if role == "assistant" else None)

    def _complete(self) -> ReplyDelta | None:
        """A message just ended: convert what the library parsed, with our decoded text."""
        delta = self._delta(self._decoder.flush()) if self._in_content else None
        self.well_formed &= self._in_content  # else it ended without <|message|> (non-strict)
        new = self._parser.messages[self._seen:]
        self._seen += len(new)
        if not new:
            self.well_formed = False  # the library dropped a fragment (or failed at EOS)
            if self._in_content and self._pieces:
                self._messages.append(ParsedMessage(*self._header, None, "".join(self._pieces)))
        for m in new:
            text = ("".join(self._pieces) if self._in_content else
                    _SPECIAL_TEXT.sub("", "".join(getattr(c, "text", "") for c in m.content)))
            parsed = ParsedMessage(m.author.role.value, _clean(m.channel), _clean(m.recipient),
                                   m.content_type, text, m.author.name)
            if m.channel is None or (parsed.channel, parsed.recipient) != (m.channel, m.recipient):
                self.well_formed = False
            self._messages.append(parsed)
            if not self._in_content and text and parsed.role == "assistant":
                self._message_no += 1
                delta = ReplyDelta(parsed.channel or "final", parsed.recipient, text,
                                   self._message_no)
        self._in_content = False
        self._pieces = []
        return delta

    def _push_recovering(self, token: int) -> ReplyDelta | None:
        if token == START:
            delta = self._close_recovered()
            self._recovering = False
            self._parser = StreamableParser(self._enc, None, strict=False)
            self._seen = 0
            self._process(token)
            return delta
        if token in _TERMINATORS:
            return self._close_recovered()
        self._header = ("assistant", "final", None)
        return self._delta(self._decoder.push(token))

    def _close_recovered(self) -> ReplyDelta | None:
        tail = self._decoder.flush()
        text = "".join(self._pieces) + tail
        if text:
            self._messages.append(ParsedMessage("assistant", "final", None, None, text))
        self._pieces = []
        return ReplyDelta("final", None, tail, self._message_no) if tail else None


def parse_reply(tokens: Iterable[int], *, role: Role | None = Role.ASSISTANT) -> Reply:
    """Parse a whole generated reply (the tokens after the prompt's `<|start|>assistant`)."""
    parser = ReplyParser(role=role)
    for t in tokens:
        parser.push(t)
    return parser.reply()
