"""Running gpt-oss's built-in tools for a conversation, as `ossgpt chat` and the server's
Responses API both do: a call the model wrote (`browser.search`, `browser.open`,
`browser.find`, `python`) goes to the conversation's BrowserTool or PythonTool session, and its
output goes back as the tool's message, on the channel the call was made on."""

from __future__ import annotations

from typing import Any

from ..harmony import ToolCall


def is_builtin(name: str) -> bool:
    """A call to one of the built-in tools (as opposed to a developer's function)."""
    return name == "python" or name.startswith("browser.")


def run_builtin(name: str, arguments: str, *, browser: Any = None, python: Any = None,
                session: str = "chat") -> str | None:
    """Run a built-in call; the text the model reads, or None when no such tool is at hand.
    Never raises: a failure is text the model can act on, and the conversation goes on."""
    if name.startswith("browser.") and browser is not None:
        return browser.call(name.removeprefix("browser."), arguments)
    if name == "python" and python is not None:
        try:
            return python.run(session, arguments)
        except Exception as e:
            return f"python tool error: {type(e).__name__}: {e}"
    return None


def call_entry(call_id: str, call: ToolCall) -> dict:
    """An assistant message's tool_calls entry for `call`, keeping its channel and content type
    so history renders the call as the model wrote it."""
    return {"id": call_id, "type": "function", "channel": call.channel,
            "content_type": call.content_type,
            "function": {"name": call.name, "arguments": call.arguments}}


def tool_message(call: ToolCall, output: str) -> dict:
    """The tool's message answering `call`, on the call's channel."""
    return {"role": "tool", "name": call.name, "channel": call.channel, "content": output}
