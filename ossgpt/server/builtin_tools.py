"""The Responses API's built-in tools, run on the server: `web_search_preview` (or `web_search`)
is gpt-oss's browser over `ossgpt serve --corpus DIR` or `--search-url URL`, and
`code_interpreter` its python tool. A request listing them gets them declared in the system
message; each call the model makes is run here, its result appended as the tool's message, and
generation goes on, all within one response (responses.py has the loop).

What this module gives that loop: which built-in tools a request asks for (a 400 naming the
flag when the server lacks one), one session per response chain (the browser's page stack,
which the model's citations point into, and the python interpreter), the output item of each
call as OpenAI's API shows it (`web_search_call`, `code_interpreter_call`), and citations
`【3†L2-L5】` turned into `url_citation` annotations."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..harmony import BUILTIN_CALLS, ToolCall
from ..tools.builtin import run_builtin
from .protocol import APIError

# Request tool types -> the harmony built-in tool that serves them.
TOOL_TYPES = {"web_search_preview": "browser", "web_search": "browser",
              "web_search_preview_2025_03_11": "browser", "code_interpreter": "python"}
FLAGS = {"browser": "--corpus DIR or --search-url URL",
         "python": "the python tool (installed, and not turned off with --no-python)"}
MAX_TOOL_CALLS = 8      # built-in calls per response when the request does not say
# tool_choice {"type": "web_search_preview"} forces a browser.search call with this schema on
# the reply's first round (later rounds choose freely, as with any forced tool).
SEARCH_SCHEMA = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 200}},
                 "required": ["query"], "additionalProperties": False}
# Shown to the model where a replayed web_search_call item (input) carries no result.
NO_RESULT = "[The result of this call is not available; it was made in an earlier response.]"


@dataclass
class Session:
    """One response chain's tools: the browser (its pages are what citations point into) and
    the python interpreter's session name."""
    key: str
    browser: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def container_id(self) -> str:
        return "cntr_" + hashlib.sha256(self.key.encode()).hexdigest()[:24]


class BuiltinTools:
    """What the server was started with: a browser backend (None: no web_search) and a
    PythonTool (None: no code_interpreter); sessions kept for the `max_sessions` chains used
    last, older ones closed (their interpreters killed)."""

    def __init__(self, backend: Any = None, python: Any = None, max_sessions: int = 64,
                 make_browser: Callable[[Any], Any] | None = None) -> None:
        self.backend, self.python, self.max_sessions = backend, python, max_sessions
        if make_browser is None:
            from ..tools.browser import BrowserTool
            make_browser = BrowserTool
        self._make_browser = make_browser
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._chains: OrderedDict[str, str] = OrderedDict()   # response id -> chain key
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        return [name for name, tool in (("browser", self.backend), ("python", self.python))
                if tool is not None]

    def requested(self, tools: list) -> list[str]:
        """The built-in tools (harmony names) a request's `tools` list, in order; a 400 for
        one this server cannot run."""
        out = []
        for i, tool in enumerate(tools or []):
            name = TOOL_TYPES.get(tool.type)
            if name is None:
                continue
            if name not in self.available():
                raise APIError(400, f"tools[{i}]: {tool.type!r} needs the server started with "
                                    f"{FLAGS[name]} (ossgpt serve)",
                               param=f"tools[{i}].type", code="unsupported_tool")
            if name not in out:
                out.append(name)
        return out

    def chain(self, response_id: str, previous_id: str | None) -> str:
        """The session key of a response: its chain's first response's id (a previous one
        this server no longer knows starts the chain there)."""
        with self._lock:
            key = self._chains.get(previous_id, previous_id) if previous_id else response_id
            self._chains[response_id] = key
            while len(self._chains) > 64 * self.max_sessions:
                self._chains.popitem(last=False)
        return key

    def session(self, key: str) -> Session:
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
            browser = self._make_browser(self.backend) if self.backend is not None else None
            session = self._sessions[key] = Session(key, browser)
            evicted = []
            while len(self._sessions) > self.max_sessions:
                evicted.append(self._sessions.popitem(last=False)[0])
        for old in evicted:
            if self.python is not None:
                self.python.close(old)
        return session

    def run(self, session: Session, call: ToolCall) -> str:
        """Run one built-in call (blocking: call it off the event loop) -> the text the model
        reads."""
        with session.lock:
            output = run_builtin(call.name, call.arguments, browser=session.browser,
                                 python=self.python, session=session.key)
        return output if output is not None else f"error: no tool named {call.name}"

    def close(self) -> None:
        if self.python is not None:
            self.python.close()


def call_item(call: ToolCall, session: Session, status: str, output: str | None = None,
              item_id: str | None = None) -> dict:
    """The output item of a built-in call, as OpenAI's API shows it; `output`: the tool's
    (None: not run yet)."""
    if call.name == "python":
        return {"type": "code_interpreter_call", "id": item_id or _id("ci"), "status": status,
                "code": call.arguments if output is not None else "",
                "container_id": session.container_id,
                "outputs": None if output is None else [{"type": "logs", "logs": output}]}
    return {"type": "web_search_call", "id": item_id or _id("ws"), "status": status,
            "action": _action(call, session.browser, done=output is not None)}


def _action(call: ToolCall, browser: Any, done: bool) -> dict:
    try:
        args = json.loads(call.arguments or "{}")
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}
    page = browser.stack[-1] if done and browser is not None and browser.stack else None
    url = page_url(page) if page is not None else None
    name = call.name.removeprefix("browser.")
    if name == "open":
        target = args.get("id")
        return {"type": "open_page", "url": url or (target if isinstance(target, str) else None)}
    if name == "find":
        # the find results page's own url is the page searched, as the official tool names it
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")),
                "url": url or ""}
    return {"type": "search", "query": str(args.get("query", ""))}


def page_url(page: Any) -> str | None:
    """A page's address for clients: a web page's URL, or a local file's file:// URL."""
    where = page.location or page.url or None
    if not where:
        return None
    return where if "://" in where else Path(where).resolve().as_uri()


def replay_messages(item: dict, i: int) -> list[dict]:
    """A `web_search_call` or `code_interpreter_call` input item (a client replaying an earlier
    response's output) -> the assistant's call and the tool's message, as chat messages."""
    call_id = item.get("id") or _id("call")
    if item["type"] == "code_interpreter_call":
        code = item.get("code") or ""
        logs = "".join(o.get("logs", "") for o in item.get("outputs") or []
                       if isinstance(o, dict) and o.get("type") == "logs")
        name, arguments, result = "python", code, logs
    else:
        action = item.get("action") or {}
        kind = action.get("type")
        if kind == "search":
            name, args = "browser.search", {"query": action.get("query")
                                            or " ".join(action.get("queries") or [])}
        elif kind == "open_page":
            name, args = "browser.open", {"id": action.get("url") or ""}
        elif kind in ("find_in_page", "find"):
            name, args = "browser.find", {"pattern": action.get("pattern") or ""}
        else:
            raise APIError(400, f"input[{i}].action.type must be search, open_page or "
                                f"find_in_page, not {kind!r}", param=f"input[{i}].action")
        arguments, result = json.dumps(args, ensure_ascii=False), NO_RESULT
    call = {"id": call_id, "type": "function", "channel": "analysis", "content_type": "code",
            "function": {"name": name, "arguments": arguments}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "name": name, "channel": "analysis",
             "content": result}]


_CITATION = re.compile(r"【(\d+)†L(\d+)(?:-L(\d+))?】")
_HOLD = 32   # longest text held back waiting for a citation's 】


class Citations:
    """Streams a message's text with each citation `【3†L2-L5】` the browser can resolve
    replaced by a markdown link `([title](url))`, as OpenAI's text shows its sources, and a
    `url_citation` annotation over that link; indexes count characters of the text sent."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.sent = 0          # characters sent so far
        self.held = ""

    def push(self, text: str) -> tuple[str, list[dict]]:
        text = self.held + text
        self.held = ""
        cut = text.rfind("【")
        if cut >= 0 and "】" not in text[cut:] and len(text) - cut < _HOLD:
            text, self.held = text[:cut], text[cut:]
        return self._replace(text)

    def flush(self) -> tuple[str, list[dict]]:
        text, self.held = self.held, ""
        return self._replace(text)

    def _replace(self, text: str) -> tuple[str, list[dict]]:
        out, annotations, pos = [], [], 0
        for m in _CITATION.finditer(text):
            link = self._link(int(m.group(1)), int(m.group(2)),
                              int(m.group(3)) if m.group(3) else None)
            if link is None:
                continue
            title, url = link
            out.append(text[pos:m.start()])
            start = self.sent + sum(map(len, out))
            shown = f"([{title}]({url}))"
            out.append(shown)
            annotations.append({"type": "url_citation", "start_index": start,
                                "end_index": start + len(shown), "url": url, "title": title})
            pos = m.end()
        out.append(text[pos:])
        result = "".join(out)
        self.sent += len(result)
        return result, annotations

    def _link(self, cursor: int, first: int, last: int | None) -> tuple[str, str] | None:
        if self.browser is None:
            return None
        c = self.browser.citation(cursor, first, last)
        if c is None or not c.location:
            return None     # no such page, or a search results page: nothing to point at
        page = self.browser.stack[cursor]
        url = page_url(page) or c.location
        if url.startswith("file://") and c.source_first is not None:
            url += f"#L{c.source_first}-L{c.source_last}"
        return c.title or url, url


def builtin_call_names(names: list[str]) -> tuple[str, ...]:
    """The calls the reply may make to the built-in tools `names` ("browser", "python")."""
    return tuple(call for name in names for call in BUILTIN_CALLS[name])


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
