"""The browser tool the model calls: `search`, `open` and `find`, with the official gpt-oss
tool's argument names, page format and error texts, so the model's training transfers.

Every call pushes the page it shows onto a stack; a page's index there is its cursor (`[3]` in
the page header), which `open(cursor=3)`, `find(cursor=3)` and the model's citations
`【3†L10-L15】` name. `citations(text)` maps those back to files or URLs and their lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backend import VIEW_SOURCE, Backend, BackendError
from .page import (Page, document_page, find_page, render, search_page, truncate,
                   url_or_path_where, view_end)

FUNCTIONS = ("search", "open", "find")
_CITATION = re.compile(r"【(\d+)†L(\d+)(?:-L(\d+))?】")


class ToolUsageError(Exception):
    """A call the tool cannot carry out; the message is shown to the model."""


@dataclass
class Citation:
    cursor: int
    first: int                 # lines as the page showed them (L numbers)
    last: int
    location: str | None       # file path or URL; None for a search-results page
    title: str
    source_first: int | None   # 1-based lines of the file's (or page's) text
    source_last: int | None

    def __str__(self) -> str:
        where = self.location or f"search results for {self.title!r}"
        if self.source_first is None:
            return where
        if self.source_first == self.source_last:
            return f"{where}:{self.source_first}"
        return f"{where}:{self.source_first}-{self.source_last}"


def _count_tokens() -> Callable[[str], int]:
    # The model's own tokenizer: the official tool sizes a view in tokens of its vocabulary.
    from ...tokenizer import get_tokenizer
    tok = get_tokenizer()
    return lambda text: len(tok.encode(text))


class BrowserTool:
    """One model session's browser: its backend, page stack and page cache."""

    def __init__(self, backend: Backend, *, view_tokens: int = 1024,
                 max_search_results: int = 20,
                 count_tokens: Callable[[str], int] | None = None) -> None:
        self.backend = backend
        self.view_tokens = view_tokens
        self.max_search_results = max_search_results
        self._count_tokens = count_tokens
        self.stack: list[Page] = []
        self._pages: dict[str, Page] = {}  # by url: opening a link again reuses the page

    # -- the model's entry point -----------------------------------------------------------------

    def call(self, name: str, arguments: str) -> str:
        """Run `browser.NAME` with the JSON arguments the model wrote; the text to show it.
        Never raises: bad JSON, unknown functions or arguments and failed fetches come back as
        text the model can read and act on."""
        name = name.removeprefix("browser.")
        if name not in FUNCTIONS:
            return json.dumps({"error": f"Unknown function: {name}; the browser has "
                                        "search, open and find"})
        try:
            args = json.loads(arguments) if arguments and arguments.strip() else {}
        except (ValueError, TypeError):
            return json.dumps({"error": "Invalid function arguments: not valid JSON"})
        if not isinstance(args, dict):
            return json.dumps({"error": "Invalid function arguments: expected a JSON object"})
        try:
            return getattr(self, name)(**_check_arguments(name, args))
        except (ToolUsageError, BackendError) as e:
            return str(e)
        except Exception as e:  # a backend bug must not end the conversation: report it
            return f"Error in browser.{name}: {type(e).__name__}: {truncate(str(e))}"

    # -- the three functions ---------------------------------------------------------------------

    def search(self, query: str, topn: int = 10, source: str | None = None) -> str:
        """Search and show the results page."""
        del source  # one source per backend
        topn = max(1, min(topn, self.max_search_results))
        try:
            results = self.backend.search(query, topn)
        except Exception as e:
            raise BackendError(f"Error during search for `{query}`: {truncate(str(e))}") from e
        if not results:
            raise ToolUsageError(f"No results for `{query}`.")
        return self._push_and_show(search_page(query, results, url_or_path_where), 0)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        """Open link `id` of the page at `cursor` (a path or URL when `id` is a string), or,
        without `id`, scroll that page to line `loc`."""
        del source
        snippet_line = None
        current = None
        if isinstance(id, str):
            target, reload = id, True
        else:
            current = self._page(cursor)
            reload = False
            if id >= 0:
                if str(id) not in current.links:
                    raise ToolUsageError(f"Invalid link id `{id}`.")
                target = current.links[str(id)]
                snippet_line = (current.snippets or {}).get(str(id))
            else:
                target = current.url
        if view_source:
            target, snippet_line = VIEW_SOURCE + target, None
        if current is not None and isinstance(id, int) and id < 0 and not view_source:
            page = current  # scrolling the page itself
        else:
            page = self._fetch(target, reload)
        if loc < 0:
            loc = 0
            if snippet_line is not None:
                loc = page.display_line(snippet_line)
                loc = loc - 4 if loc > 4 else loc  # a little context above the passage
        return self._push_and_show(page, loc, num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        """The lines of the page at `cursor` containing `pattern`, as a page of links."""
        page = self._page(cursor)
        if page.snippets is not None:
            raise ToolUsageError("Cannot run `find` on search results page or find results page")
        return self._push_and_show(find_page(pattern, page), 0)

    # -- citations ---------------------------------------------------------------------------------

    def citation(self, cursor: int, first: int, last: int | None = None) -> Citation | None:
        """What `【cursor†Lfirst-Llast】` cites, or None when this session has no such page."""
        if not 0 <= cursor < len(self.stack):
            return None
        page = self.stack[cursor]
        last = first if last is None else last
        first, last = max(0, min(first, last)), min(max(first, last), len(page.lines) - 1)
        sources = [s for s in page.source_lines[first:last + 1] if s is not None]
        return Citation(cursor, first, last, page.location, page.title,
                        min(sources) if sources else None, max(sources) if sources else None)

    def citations(self, text: str) -> list[Citation]:
        """Every citation in the model's text that this session's pages can resolve."""
        found = []
        for m in _CITATION.finditer(text):
            last = int(m.group(3)) if m.group(3) else None
            if (c := self.citation(int(m.group(1)), int(m.group(2)), last)) is not None:
                found.append(c)
        return found

    # -- internals ---------------------------------------------------------------------------------

    def _page(self, cursor: int) -> Page:
        if not self.stack:
            raise ToolUsageError("No pages to access!")
        if cursor == -1:
            return self.stack[-1]
        if not 0 <= cursor < len(self.stack):
            raise ToolUsageError(f"Cursor `{cursor}` is out of range. "
                                 f"Available cursor indices: [0 - {len(self.stack) - 1}].")
        return self.stack[cursor]

    def _fetch(self, target: str, reload: bool) -> Page:
        if not reload and target in self._pages:
            return self._pages[target]
        try:
            doc = self.backend.fetch(target)
        except Exception as e:
            raise BackendError(f"Error fetching URL `{truncate(target)}`: {truncate(str(e))}") from e
        page = document_page(doc)
        self._pages[target] = self._pages[page.url] = page
        return page

    def _push_and_show(self, page: Page, loc: int, num_lines: int = -1) -> str:
        if loc >= len(page.lines):
            raise ToolUsageError(f"Invalid location parameter: `{loc}`. "
                                 f"Cannot exceed page maximum of {len(page.lines) - 1}.")
        if self._count_tokens is None:
            self._count_tokens = _count_tokens()
        end = view_end(page, loc, num_lines, self.view_tokens, self._count_tokens)
        self.stack.append(page)
        return render(page, len(self.stack) - 1, loc, end)


# The arguments of each function: name -> (accepted JSON types, description for errors).
_INT = (int,)
_SIGNATURES: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "search": {"query": ((str,), "a string"), "topn": (_INT, "a number"),
               "top_n": (_INT, "a number"), "source": ((str,), "a string")},
    "open": {"id": ((int, str), "a number or a string"), "cursor": (_INT, "a number"),
             "loc": (_INT, "a number"), "num_lines": (_INT, "a number"),
             "view_source": ((bool,), "true or false"), "source": ((str,), "a string")},
    "find": {"pattern": ((str,), "a string"), "cursor": (_INT, "a number")},
}
_REQUIRED = {"search": ("query",), "open": (), "find": ("pattern",)}


def _check_arguments(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args` checked against `name`'s signature, with integral floats (3.0) made ints."""
    signature = _SIGNATURES[name]
    out = {}
    for key, value in args.items():
        if key not in signature:
            raise ToolUsageError(f"Invalid argument `{key}` for {name}; it takes "
                                 + ", ".join(f"`{k}`" for k in signature if k != "top_n") + ".")
        types, wanted = signature[key]
        if isinstance(value, float) and value.is_integer() and int in types:
            value = int(value)
        if value is None or (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ToolUsageError(f"`{key}` should be {wanted}, not {json.dumps(value)}.")
        out[key] = value
    missing = [k for k in _REQUIRED[name] if k not in out]
    if missing:
        raise ToolUsageError(f"{name} needs `{missing[0]}`.")
    if "top_n" in out:  # the official tool takes both spellings
        out["topn"] = out.pop("top_n")
    return out
