"""What the browser tool needs from a source of documents: search it, and fetch one document.

Two backends implement it: a local folder of files (local.py) and the web (web.py). The
model-facing behaviour (pages, cursors, find) is the tool's own (tool.py) and the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# Prefix of an id whose raw source is wanted (`open(view_source=true)`), as the official tool
# passes it to its backends.
VIEW_SOURCE = "view-source:"


class BackendError(Exception):
    """A search or fetch failed; the message is shown to the model."""


@dataclass
class SearchResult:
    id: str                 # what `fetch` takes: a path in the corpus, or a URL
    title: str
    snippet: str
    line: int | None = None  # 0-based line of the document's text the snippet comes from


@dataclass
class Document:
    id: str        # as the model sees it: the path in the corpus, or the URL
    title: str
    text: str      # readable text; line N of it is what citations of line N refer to
    location: str  # where it lives: an absolute file path, or the URL
    links: list[str] = field(default_factory=list)  # link id N in the text -> its target id


class Backend(Protocol):
    """A searchable collection of documents."""

    # Shown as the third part of search-result links for URLs (their domain); local files show
    # their path instead.
    source: str

    def search(self, query: str, topn: int) -> list[SearchResult]:
        """The best `topn` matches of `query`, best first."""
        ...

    def fetch(self, id: str) -> Document:
        """The document `id` (a search result's id or a link target); with the VIEW_SOURCE
        prefix, its raw source as text. Raises BackendError when it cannot."""
        ...
