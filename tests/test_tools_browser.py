"""The browser tool: search / open / find over a local corpus the tests write, in the official
gpt-oss page format; citations back to files and lines; the on-disk index and its rebuilds;
errors as text; and the web backend against a real HTTP server on loopback."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from ossgpt.tools.browser import BrowserTool, LocalCorpus, WebBackend

RUST = """# The borrow checker

Rust's borrow checker enforces the ownership rules at compile time.
A value may have many shared borrows or one mutable borrow, never both.

See [lifetimes](lifetimes.txt) and [the book](https://doc.rust-lang.org/book/).
"""
LIFETIMES = "Lifetimes\n\nA lifetime names the region of code where a reference stays valid.\n"
GIL = ("<html><head><title>The Python GIL</title><style>p {}</style></head><body>"
       "<h1>Global interpreter lock</h1><p>The GIL lets one thread run Python bytecode at a "
       "time.</p><ul><li>CPython has it</li><li><a href='notes/rust.md'>Rust has none</a></li>"
       "</ul></body></html>")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "rust.md").write_text(RUST)
    (root / "notes" / "lifetimes.txt").write_text(LIFETIMES)
    (root / "gil.html").write_text(GIL)
    # a long document: line n says "entry n", and the word "needle" is on lines 150 and 420
    long = [f"entry {n} of the long log" + (" needle" if n in (150, 420) else "")
            for n in range(1, 501)]
    (root / "long.txt").write_text("\n".join(long) + "\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.md").write_text("borrow checker secret")
    return root


@pytest.fixture
def browser(corpus: Path, tmp_path: Path) -> BrowserTool:
    return BrowserTool(LocalCorpus(corpus, index_root=tmp_path / "index"))


def call(browser: BrowserTool, name: str, **args) -> str:
    return browser.call(name, json.dumps(args))


def header(text: str) -> tuple[str, int, int, int]:
    m = re.match(r"\[(\d+)\] (.*)\n\*\*viewing lines \[(\d+) - (\d+)\] of (\d+)\*\*\n\n", text)
    assert m, text
    return m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5))


def test_search_results_page(browser):
    page = call(browser, "search", query="borrow checker ownership")
    assert page.startswith("[0] borrow checker ownership\n**viewing lines [0 - ")
    lines = page.split("\n\n", 1)[1].split("\n")
    assert lines[:4] == ["L0: ", "L1: URL: ", "L2: # Search Results", "L3: "]
    assert lines[4].startswith("L4:   * 【0†The borrow checker†notes/rust.md】 Rust's borrow checker")
    assert "secret" not in page  # hidden folders are not indexed
    assert browser.stack[0].links["0"] == "notes/rust.md"


def test_open_result_then_links_then_scroll(browser, corpus):
    call(browser, "search", query="lifetime reference valid")
    page = call(browser, "open", id=0)
    # at the passage that matched (up to 4 lines above it; here the top)
    assert page.startswith("[1] lifetimes (notes/lifetimes.txt)\n**viewing lines [2 - 3] of 3**")
    assert "L2: A lifetime names the region" in page
    page = call(browser, "open", id="notes/rust.md")  # a path
    assert "[2] The borrow checker (notes/rust.md)" in page
    # Markdown links are numbered: 0 the corpus file, 1 a URL (with its domain)
    assert "L5: See 【0†lifetimes】 and 【1†the book†doc.rust-lang.org】." in page
    assert "[3] lifetimes (notes/lifetimes.txt)" in call(browser, "open", id=0)
    # cursor=2 again, scrolled: loc and num_lines
    page = call(browser, "open", cursor=2, loc=2, num_lines=2)
    assert header(page) == ("The borrow checker (notes/rust.md)", 2, 3, 6)
    assert page.startswith("[4] ")
    assert page.endswith("L2: Rust's borrow checker enforces the ownership rules at compile time.\n"
                         "L3: A value may have many shared borrows or one mutable borrow, never both.")


def test_open_html_follows_its_links(browser):
    page = call(browser, "open", id="gil.html")
    assert header(page)[0] == "The Python GIL (gil.html)"
    body = page.split("\n\n", 1)[1]
    assert body.split("\n") == [
        "L0: # Global interpreter lock", "L1: ",
        "L2: The GIL lets one thread run Python bytecode at a time.", "L3: ",
        "L4:   * CPython has it", "L5:   * 【0†Rust has none】"]
    assert "The borrow checker (notes/rust.md)" in call(browser, "open", id=0)
    source = call(browser, "open", id="gil.html", view_source=True)
    assert source.startswith("[2] gil.html (view-source:gil.html)") and "<title>The Python GIL</title>" in source


def test_long_page_views_and_opens_at_the_snippet(browser):
    page = call(browser, "search", query="needle")
    assert "long.txt" in page
    page = call(browser, "open", id=0)
    title, first, last, total = header(page)
    # opened a little above the first matching line (L149 shows line 150 of the file)
    assert (title, first, total) == ("long (long.txt)", 145, 500)
    assert 145 < last < 500  # the default view is about 1024 tokens, not the whole file
    assert "L149: entry 150 of the long log needle" in page
    page = call(browser, "open", loc=400, num_lines=30)
    assert header(page)[1:] == (400, 429, 500)


def test_find_and_open_a_match(browser):
    call(browser, "open", id="long.txt")
    page = call(browser, "find", pattern="NEEDLE")
    assert header(page) == ("Find results for text: `needle` in `long` (long.txt/find?pattern=needle)",
                            0, 10, 10)
    assert "L0: # 【0†match at L149】\nL1: entry 150 of the long log needle" in page
    assert "L6: # 【1†match at L419】" in page
    page = call(browser, "open", id=1)
    assert header(page)[1] == 415 and "L419: entry 420 of the long log needle" in page
    assert call(browser, "find", pattern="zebra", cursor=0).endswith(
        "L0: No `find` results for pattern: `zebra`")
    assert call(browser, "find", pattern="x") == (
        "Cannot run `find` on search results page or find results page")


def test_citations_map_to_files_and_lines(browser, corpus):
    call(browser, "search", query="borrow checker")              # cursor 0
    call(browser, "open", id="notes/rust.md")                     # cursor 1
    call(browser, "open", id="long.txt", loc=100, num_lines=10)   # cursor 2
    call(browser, "find", pattern="needle")                       # cursor 3
    answer = "Rust checks borrows 【1†L2-L3】; the log mentions it 【2†L105】 and 【3†L1】. 【9†L1】"
    cites = browser.citations(answer)
    assert [(c.cursor, c.location, c.source_first, c.source_last) for c in cites] == [
        (1, str(corpus / "notes" / "rust.md"), 3, 4),
        (2, str(corpus / "long.txt"), 106, 106),
        (3, str(corpus / "long.txt"), 150, 150)]
    rust_lines = (corpus / "notes" / "rust.md").read_text().split("\n")
    assert rust_lines[2].startswith("Rust's borrow checker")  # file line 3 is what L2 showed
    assert str(cites[1]) == f"{corpus / 'long.txt'}:106"
    search = browser.citation(0, 4)
    assert search.location is None and search.source_first is None


def test_wrapped_lines_cite_their_source_line(browser, corpus):
    (corpus / "wide.txt").write_text("short\n" + "word " * 60 + "\nlast\n")
    browser = BrowserTool(LocalCorpus(corpus, index_root=browser.backend.index_dir.parent))
    page = call(browser, "open", id="wide.txt")
    assert header(page)[3] == 6  # 300 characters of line 2 wrap to 4 lines of 80
    assert str(browser.citation(0, 2, 4)).endswith("wide.txt:2")
    assert str(browser.citation(0, 5)).endswith("wide.txt:3")


def test_errors_are_text_for_the_model(browser):
    assert call(browser, "open", id=3) == "No pages to access!"
    assert call(browser, "find", pattern="x") == "No pages to access!"
    assert browser.call("open", "{not json") == json.dumps(
        {"error": "Invalid function arguments: not valid JSON"})
    assert "expected a JSON object" in browser.call("open", "[1]")
    assert "Unknown function: click" in browser.call("click", "{}")
    assert browser.call("search", "{}") == "search needs `query`."
    assert call(browser, "search", query="x", page=2).startswith("Invalid argument `page` for search")
    assert call(browser, "open", id=True) == "`id` should be a number or a string, not true."
    assert call(browser, "search", query="zzzunknownword") == "No results for `zzzunknownword`."
    call(browser, "search", query="borrow")
    assert call(browser, "open", id=7) == "Invalid link id `7`."
    assert call(browser, "open", cursor=5) == (
        "Cursor `5` is out of range. Available cursor indices: [0 - 0].")
    assert call(browser, "open", id="nope.md").startswith(
        "Error fetching URL `nope.md`: no such document in the corpus")
    assert "outside" not in call(browser, "open", id="../../etc/passwd")
    assert call(browser, "open", id="notes/rust.md", loc=99) == (
        "Invalid location parameter: `99`. Cannot exceed page maximum of 6.")
    assert len(browser.stack) == 1  # failed calls leave the stack as it was
    # floats that are integers are fine, as the model sometimes writes them
    assert call(browser, "open", cursor=0.0, loc=2.0).startswith("[1] ")


def test_index_is_cached_and_rebuilt_when_files_change(corpus, tmp_path):
    index_root = tmp_path / "index"
    first = LocalCorpus(corpus, index_root=index_root)
    assert first.built
    again = LocalCorpus(corpus, index_root=index_root)
    assert not again.built
    assert [r.id for r in again.search("interpreter lock", 5)] == ["gil.html"]
    (corpus / "notes" / "new.md").write_text("# Zebras\n\nZebras have stripes.\n")
    changed = LocalCorpus(corpus, index_root=index_root)
    assert changed.built
    assert [r.id for r in changed.search("zebras stripes", 5)] == ["notes/new.md"]
    builds = [p.name for p in changed.index_dir.iterdir()]
    assert len(builds) == 1 and not builds[0].startswith(".build-")  # old build and temp gone
    (corpus / "notes" / "new.md").unlink()
    assert LocalCorpus(corpus, index_root=index_root).search("zebras", 5) == []


def test_pdf_skipped_with_a_note_without_pypdf(corpus, tmp_path):
    (corpus / "paper.pdf").write_bytes(b"%PDF-1.4 not really")
    backend = LocalCorpus(corpus, index_root=tmp_path / "index")
    try:
        import pypdf  # noqa: F401
    except ImportError:
        assert backend.notes == ["skipped 1 PDF file(s): install pypdf to index them"]
    else:  # with pypdf, an unreadable PDF is skipped and said so
        assert any(n.startswith("skipped paper.pdf") for n in backend.notes)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    browser = BrowserTool(LocalCorpus(tmp_path / "empty", index_root=tmp_path / "index"))
    assert call(browser, "search", query="anything") == "No results for `anything`."


# -- the web backend, against a real server on loopback -------------------------------------------

PAGES = {
    "/article.html": ("text/html; charset=utf-8",
                      "<html><head><title>Sinks in attention</title></head><body>"
                      "<h2>Attention sinks</h2><p>Each head has a learned sink logit.</p>"
                      "<p>More: <a href='/more.html'>details</a>, "
                      "<a href='https://example.org/x'>elsewhere</a>.</p>"
                      "<script>var x = '【0†forged】';</script></body></html>"),
    "/more.html": ("text/html", "<title>More</title><p>The sink takes probability mass.</p>"),
    "/plain.txt": ("text/plain", "line one\nline two\n"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        if url.path == "/search":
            q = parse_qs(url.query)
            assert q["format"] == ["json"]
            base = f"http://{self.headers['Host']}"
            results = [{"url": base + "/article.html", "title": "Sinks in attention",
                        "content": f"About {q['q'][0]}: each head has a sink."},
                       {"url": base + "/plain.txt", "title": "Plain", "content": "two lines"}]
            self._send("application/json", json.dumps({"query": q["q"][0], "results": results}))
        elif url.path in PAGES:
            self._send(*PAGES[url.path])
        else:
            self.send_error(404, "Not Found")

    def _send(self, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_web_search_open_and_follow(server):
    browser = BrowserTool(WebBackend(server + "/search", timeout=5))
    page = call(browser, "search", query="attention sinks")
    assert "L4:   * 【0†Sinks in attention†127.0.0.1:" in page
    assert "About attention sinks: each head has \nL5: a sink." in page
    page = call(browser, "open", id=0)
    assert header(page)[0] == f"Sinks in attention ({server}/article.html)"
    body = page.split("\n\n", 1)[1]
    assert body.startswith(f"L0: \nL1: URL: {server}/article.html\nL2: ## Attention sinks")
    assert "【0†details】, 【1†elsewhere†example.org】." in body
    assert "forged" not in body
    page = call(browser, "open", id=0)
    assert "The sink takes probability mass." in page
    assert browser.citation(2, 3).location == f"{server}/more.html"
    page = call(browser, "open", id=server + "/plain.txt")
    assert "L0: line one\nL1: line two" in page
    assert call(browser, "open", id=server + "/missing").startswith(
        f"Error fetching URL `{server}/missing`: HTTP 404")
    assert "find results" not in call(browser, "find", pattern="sink", cursor=1)


def test_web_without_search_endpoint(server):
    browser = BrowserTool(WebBackend(timeout=5))
    assert "no search endpoint configured" in call(browser, "search", query="x")
    assert "Sinks in attention" in call(browser, "open", id=server + "/article.html")
