"""Where each message of a reply begins and ends, what its header says, and which function it
calls: the one reading of generated harmony that both the reply parser (parse.py) and the
server's grammar constraint (server/constrain.py) follow, token by token. Because they share
it, a message the parser reports as a call to F is exactly one whose body the constraint held
to F's schema from its first token.

Written here rather than taken from openai-harmony's StreamableParser: the library gives up on
header forms that gpt-oss does produce (a channel written twice, `<|constrain|>json` before the
recipient, two recipients, a repeated `<|start|>`), and a parser that gives up on a header
cannot tell the constraint where the body of a call begins. On every header the library
accepts, `read_header` reads the same fields (tests/test_harmony_framing.py checks it).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass

from ..tokenizer import CALL, END, MESSAGE, RETURN, START, get_tokenizer

_TERMINATORS = frozenset((END, RETURN, CALL))
_ROLES = frozenset(("system", "developer", "user", "assistant", "tool"))
_MARKUP = re.compile(r"<\|[a-z_0-9]+\|>")
_NOT_FUNCTIONS = frozenset(("assistant", "user", "all"))
_NAME = re.compile(r"[\w.\-]+")
# A recipient follows the start of the header, a space or markup: "assistant to=functions.f",
# "<|channel|>commentary to=functions.f", "<|constrain|>json to=functions.f".
_RECIPIENT = re.compile(r"(?:^|(?<=\s)|(?<=\|>))to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w*)")
_CONSTRAIN = re.compile(r"<\|constrain\|>\s*([^\s<]*)")
# The forms openai-harmony renders and its strict parser accepts, after the role.
_STRICT = re.compile(r"(?: to=[^\s<]+)?<\|channel\|>\w+(?: to=[^\s<]+)?"
                     r"(?: ?<\|constrain\|>\w+| \w+)?")


@dataclass(frozen=True)
class Header:
    """A message header as read. `text` is what it says beyond its fields, which is the
    message's content when the model never wrote <|message|>; `strict` says whether it has the
    exact form harmony renders."""
    role: str = "assistant"
    name: str | None = None          # the author's name: tool messages, "functions.f"
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None  # "<|constrain|>json", "json", "code"
    text: str = ""
    strict: bool = False

    def call(self, tools: Collection[str] | None) -> str | None:
        """The function this message calls, among `tools` (None: any function), else None.

        Any assistant message with a recipient naming a function is a call, on whatever
        channel: gpt-oss calls on commentary, and also on analysis (vLLM #42454, oMLX #2216).
        The name may lack the `functions.` namespace, as gpt-oss writes it in long contexts
        (vLLM #42454), or have a content type glued on ("to=functions.fjson", llama.cpp #15102).
        """
        if self.role != "assistant" or not self.recipient or self.recipient in _NOT_FUNCTIONS:
            return None
        name = self.recipient.removeprefix("functions.")
        if tools is None:
            return name if _NAME.fullmatch(name) else None
        if name in tools:
            return name
        if name.endswith("json") and name[:-4] in tools:
            return name[:-4]
        return None


# The header of text written outside any message.
LOOSE = Header()


def read_header(text: str, role: str | None = None) -> Header:
    """Read a header: `text` as decoded (markup as text), without <|start|> and <|message|>;
    `role`: the role the prompt already opened (`<|start|>assistant`), else None when the
    header begins with its role. Never fails: fields not found are None."""
    name, opening = None, role is not None
    word = "" if opening else re.match(r"[^\s<]*", text).group(0)
    if not opening:
        text = text[len(word):]
        # An unknown word is a tool's name: "<|start|>functions.f to=assistant" is its result.
        role, name = ((word, None) if word in _ROLES else ("tool", word) if word
                      else ("assistant", None))
    recipients = _RECIPIENT.findall(text)
    channel = _CHANNEL.search(text)
    constrain = _CONSTRAIN.search(text)
    if constrain:
        content_type = "<|constrain|>" + constrain.group(1)
    else:  # a plain word left over, as in "<|channel|>analysis to=f code"
        rest = _CHANNEL.sub(" ", _RECIPIENT.sub(" ", text), count=1).split()
        content_type = rest[0] if len(rest) == 1 and _NAME.fullmatch(rest[0]) else None
    # Content of a message never given <|message|>: what follows its channel, or the whole of
    # plain text the reply opened with; not what follows a role without a channel (garbage).
    said = text[channel.end():] if channel else text if opening else ""
    strict = bool(_STRICT.fullmatch(text)) and len(recipients) <= 1 and (opening or bool(word))
    return Header(role, name, channel.group(1) if channel else None,
                  recipients[0] if recipients else None, content_type,
                  _MARKUP.sub("", said).strip(), strict)


class Event(enum.Enum):
    """What one token did, as `Framer.push` reports it."""
    HEADER = "header"    # a token of a header, <|start|> included
    OPEN = "open"        # <|message|>: a body begins, under `Framer.header`
    CONTENT = "content"  # a token of the body
    LOOSE = "loose"      # text outside any message: it opens a headerless body (LOOSE)
    END = "end"          # a terminator ended the message, or a header never given <|message|>
    STRAY = "stray"      # a terminator outside any message


class Framer:
    """Follows message boundaries token by token: <|start|> always begins a header (so a
    missing <|end|> resynchronises), <|message|> opens the body, <|end|>, <|return|> and
    <|call|> end it. `role`: the role the prompt already opened, or None when the tokens begin
    with <|start|>."""

    def __init__(self, role: str | None = "assistant") -> None:
        self._role = role
        self._header: list[int] | None = [] if role else None  # the header being written
        self.header: Header | None = None   # of the open body, or of the message just ended
        self.in_body = False

    @property
    def in_header(self) -> bool:
        return self._header is not None

    def push(self, token: int) -> Event:
        if token == START:
            self._header, self._role, self.header, self.in_body = [], None, None, False
            return Event.HEADER
        if self._header is not None:
            if token != MESSAGE and token not in _TERMINATORS:
                self._header.append(token)
                return Event.HEADER
            self.header = read_header(get_tokenizer().decode(self._header), self._role)
            self._header, self.in_body = None, token == MESSAGE
            return Event.OPEN if self.in_body else Event.END
        if token in _TERMINATORS:
            ended, self.in_body = self.in_body, False
            return Event.END if ended else Event.STRAY
        if not self.in_body:
            self.header, self.in_body = LOOSE, True
            return Event.LOOSE
        return Event.CONTENT

    def unfinished(self) -> Header | None:
        """The header being written, read as it stands (None when none has begun)."""
        if not self._header:
            return None
        return read_header(get_tokenizer().decode(self._header), self._role)
