"""What the prefix cache and chunked prefill buy `ossgpt serve`:

1. time to first token for turns 1-5 of a growing conversation (a developer message with tools,
   then about 200 more tokens a turn), with the prefix cache off (--prefix-cache-gb 0) and on;
2. the longest gap between tokens of 4 running streams while a 2,000-token prompt arrives, with
   the prompt prefilled in one go (--prefill-chunk 100000, as before chunking) and in chunks of
   256 (the default).

    .venv/bin/python benchmarks/serve_prefix_cache.py --model nano
    .venv/bin/python benchmarks/serve_prefix_cache.py --model ~/.cache/ossgpt-bench/checkpoints/20b-L4-hf

Each setting gets its own server on a loopback port; the conversation's assistant turns are fixed
text, so both passes send the same prompts. Writes benchmarks/results/serve_prefix_cache_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

try:  # the openai package's HTTP client
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from ossgpt.demo_tools import DEMO_TOOLS
from ossgpt.server.subprocess import served

ROOT = Path(__file__).resolve().parent.parent
PARAGRAPH = ("Here is some more context about the trip we are planning: the train leaves at nine, we "
             "change in Lyon, the hotel is near the old town, and we would like a restaurant that "
             "serves fish, is open late, and is not too expensive for four people. ")


def stream(client: httpx.Client, path: str, body: dict, on_token=None) -> float:
    """Stream one request; -> seconds until its end. `on_token(t)` at each chunk of text."""
    start = time.perf_counter()
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if on_token and choice.get("text"):
                on_token(time.perf_counter())
    return time.perf_counter() - start


def conversation_ttfts(url: str, model: str, turns: int) -> list[float]:
    """Time to first token of each turn: requests of one token (so the measure holds for random
    weights too, whose replies are not harmony and stream no text)."""
    messages = [{"role": "developer", "content": "You plan trips. Be brief."}]
    out = []
    with httpx.Client(base_url=url, timeout=None) as client:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Turn {turn + 1}. " + PARAGRAPH * 2})
            out.append(stream(client, "/v1/chat/completions",
                              {"model": model, "messages": messages, "tools": DEMO_TOOLS, "stream": True,
                               "max_tokens": 1, "temperature": 0}))
            messages.append({"role": "assistant", "content": f"Noted, turn {turn + 1}."})
    return out


def longest_gap(url: str, model: str, prompt_tokens: int) -> dict:
    """4 streams decode; once each has a few tokens, a long prompt arrives: the longest gap
    between two tokens of a running stream that ends after it arrived and starts before its
    first token."""
    ticks: list[list[float]] = [[] for _ in range(4)]

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=None) as client:
            # raw completions: every token streams text, whatever the weights
            stream(client, "/v1/completions", {"model": model, "prompt": f"Once upon a time, {i}", "stream": True,
                                               "max_tokens": 400, "temperature": 1, "seed": i}, ticks[i].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while min(len(t) for t in ticks) < 3:
        time.sleep(0.01)
    arrival = time.perf_counter()
    with httpx.Client(base_url=url, timeout=None) as client:
        words = " ".join(["word"] * prompt_tokens)
        ttft = stream(client, "/v1/chat/completions", {"model": model, "stream": True, "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": words}]})
    end = arrival + ttft
    for t in threads:
        t.join()
    gaps = [b - a for tk in ticks for a, b in zip(tk, tk[1:]) if b > arrival and a < end]
    return {"longest_gap_s": max(gaps) if gaps else None, "long_prompt_ttft_s": ttft,
            "gaps_counted": len(gaps)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="nano")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--long-prompt", type=int, default=2000)
    args = p.parse_args(argv)
    name = Path(args.model).name if args.model != "nano" else "nano"
    results: dict = {"model": args.model, "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "prefix_cache": {}, "fair_prefill": {}}
    for label, flags in (("off", ["--prefix-cache-gb", "0"]), ("on", [])):
        with served("--model", args.model, "--served-name", "m", *flags, timeout=600) as url:
            conversation_ttfts(url, "m", 1)                                   # warm-up
            results["prefix_cache"][label] = conversation_ttfts(url, "m", args.turns)
    print(f"{name}: time to first token by turn (s)")
    print(f"{'turn':>6}{'cache off':>12}{'cache on':>12}{'ratio':>8}")
    for t, (a, b) in enumerate(zip(results["prefix_cache"]["off"], results["prefix_cache"]["on"])):
        print(f"{t + 1:>6}{a:>12.3f}{b:>12.3f}{a / b:>7.1f}x")
    for label, chunk in (("one go", "100000"), ("chunks of 256", "256")):
        with served("--model", args.model, "--served-name", "m", "--prefill-chunk", chunk, timeout=600) as url:
            conversation_ttfts(url, "m", 1)
            results["fair_prefill"][label] = longest_gap(url, "m", args.long_prompt)
    print(f"\n4 running streams, a {args.long_prompt}-word prompt arriving:")
    for label, r in results["fair_prefill"].items():
        gap = "no running stream left" if r["longest_gap_s"] is None else f"{r['longest_gap_s']:.3f} s"
        print(f"  prefilled in {label:<14} longest gap {gap} ({r['gaps_counted']} gaps), "
              f"its first token after {r['long_prompt_ttft_s']:.2f} s")
    out = ROOT / "benchmarks" / "results" / f"serve_prefix_cache_{name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
