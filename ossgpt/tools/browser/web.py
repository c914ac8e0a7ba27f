"""The web as the browser's backend: pages fetched over HTTP(S) and turned into text with
numbered links, and search through a JSON search endpoint of SearXNG's shape
(`GET {endpoint}?q=QUERY&format=json` -> `{"results": [{"url", "title", "content"}, ...]}`).

Standard library only (urllib): the browser makes one request at a time and needs nothing a
client library would add.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

from .backend import VIEW_SOURCE, BackendError, Document, SearchResult
from .text import Links, defang, domain, html_to_text, url_resolver

MAX_BYTES = 5 * 1024 * 1024  # a page larger than this is cut: the model reads a few screens
USER_AGENT = "ossgpt-browser/0.1 (+https://github.com/openai/gpt-oss)"


class WebBackend:
    """Fetch any http(s) URL; search through `search_url` (a SearXNG instance's /search) when
    one is given."""

    source = "web"

    def __init__(self, search_url: str | None = None, *, timeout: float = 20.0,
                 user_agent: str = USER_AGENT) -> None:
        self.search_url = search_url
        self.timeout = timeout
        self.user_agent = user_agent

    def search(self, query: str, topn: int) -> list[SearchResult]:
        if not self.search_url:
            raise BackendError("no search endpoint configured (--search-url); "
                               "open a URL directly instead")
        sep = "&" if urllib.parse.urlparse(self.search_url).query else "?"
        url = self.search_url + sep + urllib.parse.urlencode({"q": query, "format": "json"})
        body, _, _ = self._get(url, accept="application/json")
        try:
            data = json.loads(body.decode("utf-8"))
            results = data["results"]
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"the search endpoint did not answer SearXNG's JSON: {e}") from None
        out = []
        for r in results:
            if not isinstance(r, dict) or not isinstance(r.get("url"), str):
                continue
            out.append(SearchResult(r["url"], str(r.get("title") or r["url"]),
                                    str(r.get("content") or "")))
            if len(out) == topn:
                break
        return out

    def fetch(self, id: str) -> Document:
        raw = id.startswith(VIEW_SOURCE)
        url = id.removeprefix(VIEW_SOURCE).strip()
        if "://" not in url:
            url = "https://" + url
        if urllib.parse.urlparse(url).scheme not in ("http", "https"):
            raise BackendError(f"only http and https URLs can be opened, not {url}")
        body, content_type, final_url = self._get(url)
        mime, charset = _content_type(content_type)
        if mime == "application/pdf" and not raw:
            return Document(id, domain(final_url), _pdf_text(body), final_url)
        text = body.decode(charset or "utf-8", errors="replace")
        if raw or mime not in ("text/html", "application/xhtml+xml"):
            return Document(id, domain(final_url), defang(text), final_url)
        links = Links(url_resolver(final_url), page_domain=domain(final_url))
        title, text = html_to_text(text, links)
        # The official tool puts the URL atop every fetched page.
        text = f"\nURL: {final_url}\n{text}"
        return Document(final_url, title or domain(final_url), text, final_url, links.targets)

    def _get(self, url: str, accept: str = "text/html,*/*;q=0.8") -> tuple[bytes, str, str]:
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent,
                                                       "Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                body = resp.read(MAX_BYTES)
                return body, resp.headers.get("Content-Type", ""), resp.geturl()
        except urllib.error.HTTPError as e:
            raise BackendError(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BackendError(str(getattr(e, "reason", e))) from None


def _content_type(header: str) -> tuple[str, str | None]:
    msg = Message()
    msg["Content-Type"] = header or "text/html"
    return msg.get_content_type(), msg.get_content_charset()


def _pdf_text(body: bytes) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise BackendError("reading PDF files needs pypdf (pip install pypdf)") from None
    reader = PdfReader(io.BytesIO(body))
    return defang("\n\n".join((p.extract_text() or "").strip() for p in reader.pages))
