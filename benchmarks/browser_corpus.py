"""Index time and search latency of the browser tool's local corpus on 10,000 small files.

    python benchmarks/browser_corpus.py [--files 10000] [--queries 200]

Writes the files to a temporary folder (Markdown notes of ~60 words from a fixed vocabulary,
so every query has matches), builds the bm25s index (cold), loads it again (warm start, the
index cached on disk), then times `LocalCorpus.search` and `BrowserTool.call("search", ...)`
(the results page as the model sees it, snippets included) over random queries.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from ossgpt.tools.browser import BrowserTool, LocalCorpus

WORDS = ("attention sink router expert token layer cache window rotary softmax gradient "
         "kernel tensor batch sampling temperature harmony channel browser cursor citation "
         "python notebook corpus index query latency memory bandwidth quantization block "
         "scale mixture dense sparse prefill decode stream schema grammar").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        for i in range(args.files):
            folder = root / f"d{i % 100:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            words = " ".join(rng.choice(WORDS) for _ in range(60))
            (folder / f"note{i}.md").write_text(f"# Note {i}\n\n{words}\n\nid-{i}\n")
        index = Path(tmp) / "index"

        t0 = time.perf_counter()
        corpus = LocalCorpus(root, index_root=index)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        corpus = LocalCorpus(root, index_root=index)
        load_s = time.perf_counter() - t0
        assert not corpus.built

        queries = [" ".join(rng.sample(WORDS, 3)) for _ in range(args.queries)]
        search_ms, page_ms = [], []
        for q in queries:
            t0 = time.perf_counter()
            corpus.search(q, 10)
            search_ms.append((time.perf_counter() - t0) * 1000)
        browser = BrowserTool(corpus)
        browser.call("search", json.dumps({"query": queries[0]}))  # loads the tokenizer once
        for q in queries:
            t0 = time.perf_counter()
            browser.call("search", json.dumps({"query": q}))
            page_ms.append((time.perf_counter() - t0) * 1000)

    def p(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]

    print(f"files: {args.files}")
    print(f"index build (cold): {build_s:.2f} s")
    print(f"index load (cached, folder re-scanned): {load_s:.2f} s")
    print(f"search, top 10 ids and snippets: median {statistics.median(search_ms):.2f} ms, "
          f"p95 {p(search_ms, 0.95):.2f} ms")
    print(f"browser.search results page: median {statistics.median(page_ms):.2f} ms, "
          f"p95 {p(page_ms, 0.95):.2f} ms")


if __name__ == "__main__":
    main()
