"""Turning files and web pages into the browser's readable text: HTML to text with numbered
links (`【3†link text】`, `【4†text†example.com】` for another domain, as the official tool writes
them), Markdown links the same way, and the clean-ups that keep page text from forging the
browser's own markup."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import PurePosixPath
from urllib.parse import urljoin, urlparse

_FORGERY = str.maketrans({"【": "〖", "】": "〗", "\u200b": None})
_LINK = re.compile(r"【\d+†(?P<content>[^†】]+)(?:†[^†】]+)?】")
_PARTIAL_START = re.compile(r"^[^【】]*】")
_PARTIAL_END = re.compile(r"【\d*(?:†(?P<content>[^†】]*)(?:†[^†】]*)?)?$")
_MD_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_BLANK_RUNS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+\n")


def defang(text: str) -> str:
    """Page text with the brackets of the browser's link and citation markup replaced by
    look-alikes (as the official tool does), so a page cannot plant links or citations."""
    return text.translate(_FORGERY)


def strip_links(text: str) -> str:
    """Link markup replaced by the link text (what `find` searches)."""
    text = _PARTIAL_START.sub("", text)
    text = _PARTIAL_END.sub(lambda m: m.group("content") or "", text)
    return _LINK.sub(lambda m: m.group("content"), text)


def domain(url: str) -> str:
    return urlparse(url if "//" in url else "http://" + url).netloc


class Links:
    """Numbers the targets of a page's links in order of first appearance."""

    def __init__(self, resolve: Callable[[str], str | None], page_domain: str | None = None):
        self._resolve = resolve        # href -> target id, or None to leave the link as text
        self._page_domain = page_domain
        self.targets: list[str] = []
        self._ids: dict[str, int] = {}

    def mark(self, text: str, href: str) -> str:
        text = " ".join(text.replace("†", "‡").split())
        target = self._resolve(href) if text else None
        if target is None:
            return text
        if target not in self._ids:
            self._ids[target] = len(self.targets)
            self.targets.append(target)
        n = self._ids[target]
        where = domain(target) if "://" in target else None
        if where and where != self._page_domain:
            return f"【{n}†{text}†{where}】"
        return f"【{n}†{text}】"


def markdown_links(text: str, links: Links) -> str:
    """Markdown links `[text](target)` as numbered links; the line count does not change, so
    line N of the result is line N of the file."""
    return _MD_LINK.sub(lambda m: links.mark(m.group(1), m.group(2)), text)


def corpus_resolver(doc_path: str, exists: Callable[[str], bool]) -> Callable[[str], str | None]:
    """For a file of a local corpus: links to URLs stay URLs, relative links resolve to the
    corpus path they name (when that file exists); anchors and mail links are not links."""
    def resolve(href: str) -> str | None:
        if href.startswith(("#", "mailto:", "javascript:")):
            return None
        if "://" in href:
            return href
        target = href.split("#")[0]
        if not target:
            return None
        path = PurePosixPath(doc_path).parent / target
        parts: list[str] = []
        for part in path.parts:  # normalise ../ without touching the file system
            if part == "..":
                if not parts:
                    return None
                parts.pop()
            elif part != ".":
                parts.append(part)
        resolved = "/".join(parts)
        return resolved if exists(resolved) else None
    return resolve


def url_resolver(page_url: str) -> Callable[[str], str | None]:
    def resolve(href: str) -> str | None:
        if href.startswith(("#", "mailto:", "javascript:", "data:")):
            return None
        url = urljoin(page_url, href)
        return url if urlparse(url).netloc else None
    return resolve


# Why a hand-written converter: the kept dependencies have no HTML-to-text library (html2text,
# markdownify and beautifulsoup4 are not among them), and the browser needs little: block
# structure as lines, headings, list items, numbered links and image placeholders.
_SKIP = frozenset(("script", "style", "noscript", "template", "svg", "head", "math", "iframe"))
_BLOCK = frozenset(("p", "div", "section", "article", "header", "footer", "main", "nav", "aside",
                    "ul", "ol", "li", "table", "tr", "blockquote", "pre", "dl", "dt", "dd", "form",
                    "figure", "figcaption", "hr", "br", "h1", "h2", "h3", "h4", "h5", "h6",
                    "details", "summary", "address"))
_VOID = frozenset(("br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed",
                   "source", "track", "wbr"))


class _HtmlText(HTMLParser):
    def __init__(self, links: Links):
        super().__init__(convert_charrefs=True)
        self.links = links
        self.out: list[str] = []     # finished text
        self.title = ""
        self._skip = 0               # depth inside script/style/...
        self._in_title = False
        self._pre = 0
        self._anchor: tuple[str, list[str]] | None = None  # (href, text pieces) of an open <a>
        self._images = 0

    def _emit(self, text: str) -> None:
        if self._anchor is not None:
            self._anchor[1].append(text)
        else:
            self.out.append(text)

    def _newline(self, blank: bool = False) -> None:
        """End the line (and leave a blank line after it, with `blank`), once however many
        block tags end or begin here."""
        if self._anchor is not None or not self.out:
            return
        tail = "".join(self.out[-2:])
        have = len(tail) - len(tail.rstrip("\n"))
        self.out.append("\n" * max(0, (2 if blank else 1) - have))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "title":
            self._in_title = True
        if tag in _SKIP:
            if tag not in _VOID:
                self._skip += 1
            return
        if self._skip:
            return
        if tag in _BLOCK:
            self._newline(blank=tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"))
        if tag == "pre":
            self._pre += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._emit("#" * int(tag[1]) + " ")
        elif tag == "li":
            self._emit("  * ")
        elif tag in ("td", "th"):
            self._emit(" ")
        elif tag == "img":
            alt = " ".join((attr.get("alt") or attr.get("title") or "").split())
            self._emit(f"[Image {self._images}: {alt}]" if alt else f"[Image {self._images}]")
            self._images += 1
        elif tag == "a" and attr.get("href") and self._anchor is None:
            self._anchor = (attr["href"], [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if self._skip:
            return
        if tag == "a" and self._anchor is not None:
            href, pieces = self._anchor
            self._anchor = None
            self.out.append(self.links.mark("".join(pieces), href))
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in _BLOCK and tag != "li":  # list items: one per line, no blank between
            self._newline(blank=tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"))

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._skip:
            return
        data = defang(data)
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            last = self._anchor[1] if self._anchor is not None else self.out
            if not last or last[-1].endswith("\n"):  # no indent from the source's layout
                data = data.lstrip()
        if data:
            self._emit(data)


def html_to_text(html: str, links: Links) -> tuple[str, str]:
    """(title, text) of an HTML page; its links numbered in `links`."""
    parser = _HtmlText(links)
    parser.feed(html)
    parser.close()
    if parser._anchor is not None:  # an <a> never closed
        parser.out.append(links.mark("".join(parser._anchor[1]), parser._anchor[0]))
    text = "".join(parser.out)
    lines = [line.rstrip() for line in text.split("\n")]
    text = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
    return " ".join(defang(parser.title).split()), text


def markdown_title(text: str) -> str | None:
    for line in text.splitlines()[:50]:
        if line.startswith("# "):
            return line[2:].strip()
    return None
