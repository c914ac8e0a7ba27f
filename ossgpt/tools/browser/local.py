"""A folder of documents (.md, .txt, .html, .pdf) as the browser's backend, searched with BM25
(the `bm25s` library).

The index is built once and kept in the cache folder, under a key of the folder's absolute
path; a fingerprint of every file's path, size and modification time names the build, so any
change to the folder makes the next start rebuild it. A build is written to a temporary folder
and renamed into place (a rename is atomic), so a crash or a concurrent build never leaves a
half-written index to be loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .backend import VIEW_SOURCE, BackendError, Document, SearchResult
from .text import (Links, corpus_resolver, defang, html_to_text, markdown_links, markdown_title,
                   strip_links)

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf",)
INDEX_VERSION = 1
_WORD = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern


def _have_pypdf() -> bool:
    try:
        import pypdf  # noqa: F401
    except ImportError:
        return False
    return True


def default_index_root() -> Path:
    """`$OSSGPT_CACHE/browser-index`, else under `$XDG_CACHE_HOME/ossgpt` or `~/.cache/ossgpt`."""
    from ...tokenizer import cache_dir
    return cache_dir().parent / "browser-index"


class LocalCorpus:
    """The documents under `root`, searchable in milliseconds once indexed."""

    source = "local"

    def __init__(self, root: str | os.PathLike, *, index_root: str | os.PathLike | None = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise BackendError(f"corpus folder not found: {root}")
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        self.index_dir = Path(index_root or default_index_root()) / key
        self.notes: list[str] = []   # what was skipped while indexing, and why
        self.built = False           # whether this start built the index (else it was loaded)
        self._load_or_build()

    # -- Backend ---------------------------------------------------------------------------------

    def search(self, query: str, topn: int) -> list[SearchResult]:
        import numpy as np

        terms = [t for t in self._query_terms(query) if t in self._vocab]
        if not terms or not self.paths:
            return []
        # Sum of the terms' BM25 scores, from the term x document score matrix bm25s built.
        scores = self._retriever.get_scores(terms)
        k = min(topn, int(np.count_nonzero(scores)))
        if k == 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        wanted = set(terms)
        results = []
        for i in best:
            path = self.paths[int(i)]
            text = self._text(path)
            line, snippet = _snippet(text, wanted)
            results.append(SearchResult(path, self.titles[int(i)], snippet, line))
        return results

    def fetch(self, id: str) -> Document:
        raw = id.startswith(VIEW_SOURCE)
        path = id.removeprefix(VIEW_SOURCE).strip().lstrip("/")
        if "://" in path:
            raise BackendError("this browser reads a local folder only; "
                               "open a path from the search results")
        file = (self.root / path).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            raise BackendError(f"no such document in the corpus: {path}")
        path = file.relative_to(self.root).as_posix()
        if raw:
            if file.suffix.lower() == ".pdf":
                raise BackendError("a PDF has no text source to view")
            text = defang(file.read_text(encoding="utf-8", errors="replace"))
            return Document(id, path, text, str(file))
        title, text, links = self._read(path)
        return Document(path, title, text, str(file), links)

    # -- index -------------------------------------------------------------------------------------

    def _files(self) -> list[tuple[str, int, int]]:
        """(path relative to root, size, mtime_ns) of every document, hidden folders skipped."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or not name.lower().endswith(SUFFIXES):
                    continue
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                found.append((os.path.relpath(full, self.root).replace(os.sep, "/"),
                              st.st_size, st.st_mtime_ns))
        found.sort()
        return found

    def _load_or_build(self) -> None:
        files = self._files()
        pdf = _have_pypdf()
        fingerprint = hashlib.sha256(json.dumps(
            [INDEX_VERSION, pdf, files], separators=(",", ":")).encode()).hexdigest()[:24]
        build = self.index_dir / fingerprint
        if not (build / "docs.json").is_file():
            self._build(files, pdf, build)
            self.built = True
        self._load(build)

    def _build(self, files: list[tuple[str, int, int]], pdf: bool, target: Path) -> None:
        import bm25s

        self.index_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=self.index_dir))
        try:
            paths, titles, texts, notes = [], [], [], []
            pdf_skipped = 0
            for path, _, _ in files:
                if path.lower().endswith(".pdf") and not pdf:
                    pdf_skipped += 1
                    continue
                try:
                    title, text, _ = self._convert(path)
                except Exception as e:  # one unreadable file must not stop the index
                    notes.append(f"skipped {path}: {type(e).__name__}: {e}")
                    continue
                if path.lower().endswith(".pdf"):  # slow to extract: kept beside the index
                    (tmp / "pdf").mkdir(exist_ok=True)
                    (tmp / "pdf" / f"{len(paths)}.txt").write_text(text, encoding="utf-8")
                paths.append(path)
                titles.append(title)
                texts.append(f"{title}\n{text}")
            if pdf_skipped:
                notes.append(f"skipped {pdf_skipped} PDF file(s): install pypdf to index them")
            retriever = bm25s.BM25()
            if texts:
                tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
                retriever.index(tokens, show_progress=False)
                retriever.save(str(tmp / "bm25"), show_progress=False)
            (tmp / "docs.json").write_text(json.dumps(
                {"paths": paths, "titles": titles, "notes": notes}), encoding="utf-8")
            try:
                os.rename(tmp, target)  # atomic; fails if a concurrent build got there first
            except OSError:
                if not (target / "docs.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.index_dir.iterdir():  # earlier builds of this folder
            if old != target and not old.name.startswith(".build-"):
                shutil.rmtree(old, ignore_errors=True)

    def _load(self, build: Path) -> None:
        import bm25s

        meta = json.loads((build / "docs.json").read_text(encoding="utf-8"))
        self.paths: list[str] = meta["paths"]
        self.titles: list[str] = meta["titles"]
        self.notes = meta["notes"]
        self._build_dir = build
        self._pdf_ids = {p: i for i, p in enumerate(self.paths) if p.lower().endswith(".pdf")}
        self._known = set(self.paths)
        if self.paths:
            self._retriever = bm25s.BM25.load(str(build / "bm25"), mmap=True, show_progress=False)
            self._vocab = self._retriever.vocab_dict
        else:
            self._vocab = {}

    @staticmethod
    def _query_terms(query: str) -> list[str]:
        from bm25s.stopwords import STOPWORDS_EN

        stop = set(STOPWORDS_EN)
        return list(dict.fromkeys(t for t in _WORD.findall(query.lower()) if t not in stop))

    # -- documents ---------------------------------------------------------------------------------

    def _exists(self, path: str) -> bool:
        known = getattr(self, "_known", None)
        return path in known if known is not None else (self.root / path).is_file()

    def _convert(self, path: str) -> tuple[str, str, list[str]]:
        """(title, text, link targets) of a file, converted from its format."""
        file = self.root / path
        suffix = file.suffix.lower()
        links = Links(corpus_resolver(path, self._exists))
        if suffix == ".pdf":
            from pypdf import PdfReader
            reader = PdfReader(str(file))
            text = defang("\n\n".join((p.extract_text() or "").strip() for p in reader.pages))
            title = str((reader.metadata or {}).get("/Title") or "") or file.stem
            return title, text, []
        raw = file.read_text(encoding="utf-8", errors="replace")
        if suffix in HTML_SUFFIXES:
            title, text = html_to_text(raw, links)
            return title or file.stem, text, links.targets
        text = defang(raw)
        title = (markdown_title(text) if suffix in (".md", ".markdown") else None) or file.stem
        if suffix in (".md", ".markdown"):
            text = markdown_links(text, links)
        return title, text, links.targets

    def _read(self, path: str) -> tuple[str, str, list[str]]:
        if path in getattr(self, "_pdf_ids", {}):
            text = (self._build_dir / "pdf" / f"{self._pdf_ids[path]}.txt").read_text(encoding="utf-8")
            return self.titles[self.paths.index(path)], text, []
        if path.lower().endswith(".pdf") and not _have_pypdf():
            raise BackendError("reading PDF files needs pypdf (pip install pypdf)")
        st = (self.root / path).stat()
        return _cached_convert(self, path, st.st_mtime_ns, st.st_size)

    def _text(self, path: str) -> str:
        return self._read(path)[1]


@functools.lru_cache(maxsize=256)
def _cached_convert(corpus: LocalCorpus, path: str, mtime_ns: int, size: int):
    # keyed by modification time and size too: an edited file is read again
    return corpus._convert(path)


def _snippet(text: str, terms: set[str], limit: int = 200) -> tuple[int | None, str]:
    """The line with the most distinct query terms (0-based, None when none has any) and the
    text from it, up to `limit` characters: what a results page shows and where `open` starts."""
    lines = text.split("\n")
    best, best_hits = None, 0
    for i, line in enumerate(lines):
        hits = len(terms.intersection(_WORD.findall(line.lower())))
        if hits > best_hits:
            best, best_hits = i, hits
    start = best if best is not None else 0
    pieces, size = [], 0
    for line in lines[start:]:
        line = " ".join(strip_links(line).split())
        if not line:
            continue
        pieces.append(line)
        size += len(line) + 1
        if size >= limit:
            break
    snippet = " ".join(pieces)
    if len(snippet) > limit:
        snippet = snippet[:limit].rsplit(" ", 1)[0] + " …"
    return best, snippet
