"""Pages as the model sees them: text wrapped to 80 columns and shown with line numbers
(`L12: ...`) under a header `[cursor] title (url)` and a `**viewing lines [a - b] of n**` bar,
the format of the official gpt-oss browser tool. Search results and `find` results are pages
too, whose numbered links open the result."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from .backend import Document, SearchResult
from .text import defang, domain, strip_links

WIDTH = 80                # columns a page is wrapped to
FIND_CONTEXT_LINES = 4    # lines shown per `find` match
FIND_MAX_RESULTS = 50


def truncate(text: str, limit: int = 1024) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Page:
    url: str                         # in the header; "" for search results, as the official tool
    title: str
    lines: list[str]                 # as displayed: wrapped, L0 first
    source_lines: list[int | None]   # per displayed line, its 1-based line in `location`'s text
    location: str | None = None      # the file or URL citations of this page point into
    links: dict[str, str] = field(default_factory=dict)  # link id -> target id
    # Search and find pages: link id -> 1-based source line to open the target at.
    snippets: dict[str, int | None] | None = None

    def display_line(self, source_line: int) -> int:
        """The first displayed line showing `source_line` (0 when none does)."""
        return next((i for i, s in enumerate(self.source_lines) if s == source_line), 0)


def wrap(text: str) -> tuple[list[str], list[int | None]]:
    """Text wrapped to WIDTH, and each wrapped line's 1-based line in `text`."""
    lines: list[str] = []
    sources: list[int | None] = []
    for n, line in enumerate(text.split("\n"), start=1):
        # drop_whitespace=False keeps indentation (code) and makes the pieces join back exactly
        pieces = textwrap.wrap(line, width=WIDTH, replace_whitespace=False,
                               drop_whitespace=False) if line else [""]
        lines.extend(pieces)
        sources.extend([n] * len(pieces))
    return lines, sources


def document_page(doc: Document) -> Page:
    lines, sources = wrap(doc.text)
    return Page(doc.id, doc.title, lines, sources, doc.location,
                {str(i): target for i, target in enumerate(doc.links)})


def search_page(query: str, results: list[SearchResult], where: Callable[[str], str]) -> Page:
    """The results as the official tool shows them: a `# Search Results` list whose items are
    links `【N†title†where】` followed by the snippet. `where(id)`: the domain of a URL, the path
    of a local file."""
    items = []
    for i, r in enumerate(results):
        title = " ".join(defang(r.title).replace("†", "‡").split()) or r.id
        snippet = " ".join(defang(r.snippet).split())
        items.append(f"  * 【{i}†{title}†{where(r.id)}】 {snippet}".rstrip())
    text = "\nURL: \n# Search Results\n\n" + "\n".join(items)
    lines, _ = wrap(text)
    return Page("", query, lines, [None] * len(lines), None,
                {str(i): r.id for i, r in enumerate(results)},
                {str(i): None if r.line is None else r.line + 1 for i, r in enumerate(results)})


def find_page(pattern: str, page: Page) -> Page:
    """Every line of `page` containing `pattern` (case-insensitive), with the lines after it,
    as a page of links `# 【N†match at Lk】` that open `page` at the match."""
    pattern = pattern.lower()
    lines = strip_links("\n".join(page.lines)).split("\n")
    out: list[str] = []
    sources: list[int | None] = []
    links: dict[str, str] = {}
    snippets: dict[str, int | None] = {}
    i = 0
    while i < len(lines) and len(links) < FIND_MAX_RESULTS:
        if pattern not in lines[i].lower():
            i += 1
            continue
        n = len(links)
        if out:
            out.append("")
            sources.append(None)
        shown = range(i, min(i + FIND_CONTEXT_LINES, len(lines)))
        out.append(f"# 【{n}†match at L{i}】")
        sources.append(page.source_lines[i])
        out.extend(lines[j] for j in shown)
        sources.extend(page.source_lines[j] for j in shown)
        links[str(n)] = page.url
        snippets[str(n)] = page.source_lines[i]
        i += FIND_CONTEXT_LINES
    if not out:
        out, sources = [f"No `find` results for pattern: `{pattern}`"], [None]
    return Page(f"{page.url}/find?pattern={quote(pattern)}",
                f"Find results for text: `{pattern}` in `{page.title}`",
                out, sources, page.location, links, snippets)


def render(page: Page, cursor: int, loc: int, end: int) -> str:
    """Lines [loc, end) of `page` as the model sees them."""
    header = page.title
    if page.url:
        header += f" ({truncate(unquote(page.url))})"
    body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(loc, end))
    total = len(page.lines) - 1
    return f"[{cursor}] {header}\n**viewing lines [{loc} - {end - 1}] of {total}**\n\n{body}"


def view_end(page: Page, loc: int, num_lines: int, view_tokens: int,
             count_tokens: Callable[[str], int]) -> int:
    """Where a view starting at `loc` ends: after `num_lines` lines, or (num_lines <= 0) after
    about `view_tokens` tokens of numbered text, counting the line that crosses the budget."""
    total = len(page.lines)
    if num_lines > 0:
        return min(loc + num_lines, total)
    used = 0
    for i in range(loc, total):
        used += count_tokens(f"L{i}: {page.lines[i]}\n")
        if used >= view_tokens:
            return i + 1
    return total


def url_or_path_where(id: str) -> str:
    """Third part of a search-result link: a URL's domain, a local file's path."""
    return domain(id) if "://" in id else id
