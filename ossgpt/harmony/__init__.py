"""The harmony chat format of gpt-oss: rendering chats to tokens (render.py, through the
`openai-harmony` library), reading generated replies back (parse.py), and the message framing
and header recognition that the parser and the server's constraint share (framing.py)."""

from .framing import Event, Framer, Header, read_header
from .parse import ParsedMessage, Reply, ReplyDelta, ReplyParser, ToolCall, parse_reply
from .render import (BUILTIN_CALLS, BUILTIN_TOOLS, REASONING_KEYS, build_conversation,
                     render_conversation, render_prompt, stop_tokens)

__all__ = ["BUILTIN_CALLS", "BUILTIN_TOOLS", "REASONING_KEYS", "Event", "Framer", "Header",
           "ParsedMessage", "Reply", "ReplyDelta", "ReplyParser", "ToolCall", "build_conversation", "parse_reply", "read_header",
           "render_conversation", "render_prompt", "stop_tokens"]
