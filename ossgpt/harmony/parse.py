"""Parsing: a generated reply, token by token, into deltas of text and into messages, reasoning,
answer and tool calls, without an exception and without format markup, whatever the model
emits. Message boundaries and headers come from framing.py, which the server's constraint
follows too."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from openai_harmony import Role

from ..tokenizer import CALL, START, IncrementalDecoder, get_tokenizer
from .framing import LOOSE, Event, Framer, Header


@dataclass
class ReplyDelta:
    """New text of the message being generated; channel "final" for text without a header.
    A call's arguments come whole, with `call` naming the function, once <|call|> ends them."""
    channel: str
    recipient: str | None
    text: str
    call: str | None = None
    content_type: str | None = None   # of a call: "code", "<|constrain|>json", ...


@dataclass
class ParsedMessage:
    """One message of a reply; header fields are free of format markup. `call`: the function
    it calls, when it is a complete call (its body ended with <|call|>)."""
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str
    name: str | None = None  # the author's name (tool messages)
    call: str | None = None


@dataclass
class ToolCall:
    name: str       # without the "functions." namespace; built-in tools: "browser.search", "python"
    arguments: str  # the JSON text as generated (python: the code)
    # Where the model wrote the call: gpt-oss calls on commentary and on analysis, with
    # "<|constrain|>json", "json" or "code"; the tool's result goes back on the same channel.
    channel: str | None = None
    content_type: str | None = None


@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    messages: list[ParsedMessage] = field(default_factory=list)
    well_formed: bool = True


class ReplyParser:
    """Streams the assistant's reply tokens into deltas and messages; never raises on model output.

    `tools`: the functions the reply may call (None: any); a message to anything else, or a
    call whose body did not end with <|call|> (cut by the token budget), is text of its
    channel. Special tokens inside content are dropped, characters split across tokens come
    out whole, and text outside any message is final-channel content.

    `role`: the role the prompt already opened (`<|start|>assistant`), or None when the tokens
    begin with <|start|> themselves.
    """

    def __init__(self, tools: Collection[str] | None = None, *,
                 role: Role | None = Role.ASSISTANT) -> None:
        self.tools = tools
        self._tok = get_tokenizer()
        self._framer = Framer(role.value if role is not None else None)
        self._open: Header | None = None  # header of the body being parsed
        self._call: str | None = None     # the function that body calls
        self._pieces: list[str] = []
        self._decoder = IncrementalDecoder(self._tok, skip_special=True)
        self._messages: list[ParsedMessage] = []
        self._finished = False
        self.well_formed = True

    @property
    def in_content(self) -> tuple[str, str | None] | None:
        """(channel, recipient) of the message whose content is being generated, else None."""
        return (self._open.channel or "final", self._open.recipient) if self._open else None

    def push(self, token: int) -> ReplyDelta | None:
        """Feed one generated token; return the text it adds, if any."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        if token == START and self._framer.in_header:
            self.well_formed = False  # <|start|> twice, or while the header was being written
        event = self._framer.push(token)
        if event is Event.CONTENT:
            if self._tok.is_special(token):
                self.well_formed = False  # markup inside content: dropped from the text
            return self._text(self._decoder.push(token))
        if event is Event.OPEN:
            self._begin(self._framer.header)
        elif event is Event.LOOSE:
            self.well_formed = False
            self._begin(LOOSE)
            return self._text(self._decoder.push(token))
        elif event is Event.END:
            if self._open is not None:
                return self._close(token)
            return self._header_only(self._framer.header)
        elif event is Event.STRAY:
            self.well_formed = False
        elif token == START and self._open is not None:
            self.well_formed = False  # a new message before this one's <|end|>
            return self._close(None)
        return None

    def finish(self) -> ReplyDelta | None:
        """End of generation (stop token or not); return any text still held back."""
        if self._finished:
            return None
        self._finished = True
        if self._open is not None:
            return self._close(None)
        header = self._framer.unfinished()
        return self._header_only(header) if header is not None else None

    def messages(self) -> list[ParsedMessage]:
        """All messages of the reply (finishes the parser)."""
        self.finish()
        return list(self._messages)

    def reply(self) -> Reply:
        """The reply split into reasoning, content and tool calls (finishes the parser)."""
        reasoning, content, calls = [], [], []
        messages = self.messages()
        for m in messages:
            if m.role != "assistant":
                continue  # e.g. a hallucinated tool result
            if m.call is not None:
                calls.append(ToolCall(m.call, m.text, m.channel, m.content_type))
            elif m.channel == "analysis":
                reasoning.append(m.text)
            else:  # final, commentary preambles, text without a channel, calls cut short
                content.append(m.text)
        return Reply("\n".join(reasoning), "\n".join(content), calls, messages, self.well_formed)

    def _begin(self, header: Header) -> None:
        self.well_formed &= header.strict
        self._open, self._call = header, header.call(self.tools)
        self._pieces, self._decoder = [], IncrementalDecoder(self._tok, skip_special=True)

    def _text(self, text: str) -> ReplyDelta | None:
        if not text:
            return None
        self._pieces.append(text)
        header = self._open
        if header.role != "assistant" or self._call is not None:
            return None  # a call's arguments go out whole, once complete
        return ReplyDelta(header.channel or "final", header.recipient, text)

    def _close(self, terminator: int | None) -> ReplyDelta | None:
        """The open body ended, by `terminator` or (None) without one."""
        header, call = self._open, self._call
        tail = self._decoder.flush()
        text = "".join(self._pieces) + tail
        complete = call if terminator == CALL else None
        self._messages.append(ParsedMessage(header.role, header.channel, header.recipient,
                                            header.content_type, text, header.name, complete))
        self._open, self._call, self._pieces = None, None, []
        if header.role != "assistant":
            return None
        if call is not None:
            tail = text  # held back until now: the arguments, or the text of a call cut short
        if not tail and complete is None:
            return None
        return ReplyDelta(header.channel or "final", header.recipient, tail, complete,
                          header.content_type if complete else None)

    def _header_only(self, header: Header) -> ReplyDelta | None:
        """A header that never got <|message|>: its text (see read_header) is the content."""
        self.well_formed = False
        if not header.text:
            return None
        self._messages.append(ParsedMessage(header.role, header.channel, header.recipient, None,
                                            header.text, header.name))
        if header.role != "assistant":
            return None
        return ReplyDelta(header.channel or "final", header.recipient, header.text)


def parse_reply(tokens: Iterable[int], *, tools: Collection[str] | None = None,
                role: Role | None = Role.ASSISTANT) -> Reply:
    """Parse a whole generated reply (the tokens after the prompt's `<|start|>assistant`)."""
    parser = ReplyParser(tools, role=role)
    for t in tokens:
        parser.push(t)
    return parser.reply()
