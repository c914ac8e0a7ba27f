"""What continuous batching buys: aggregate decode throughput of N concurrent streaming chat
requests against the same N requests sent one at a time, on one `ossgpt serve`.

    .venv/bin/python benchmarks/serve_batching.py [--model nano] [--requests 16] [--max-tokens 64]

Starts its own server on a free loopback port, sends one warm-up request, then the sequential
pass and the concurrent pass (same prompts, temperature 1, seed i for request i). Tokens are
the server's own count (`usage.completion_tokens`, via stream_options.include_usage): a reply
may stop before --max-tokens. Prints a table and the ratio and writes
benchmarks/results/serve_batching.json.
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

from ossgpt.server.subprocess import served

ROOT = Path(__file__).resolve().parent.parent


def request_body(model: str, i: int, max_tokens: int) -> dict:
    a, b = 17 * i + 3, 29 * i + 11
    return {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "max_tokens": max_tokens, "temperature": 1, "seed": i}


def one(client: httpx.Client, body: dict) -> dict:
    """Stream one chat completion; -> completion tokens, time to first token, latency."""
    start = time.perf_counter()
    first = None
    usage = None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get(
                    "reasoning", chunk["choices"][0]["delta"].get("content")):
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    return {"tokens": usage["completion_tokens"], "ttft_s": (first or end) - start,
            "latency_s": end - start}


def run_pass(url: str, bodies: list[dict], concurrent: bool) -> dict:
    results: list[dict | None] = [None] * len(bodies)
    start = time.perf_counter()
    if concurrent:
        barrier = threading.Barrier(len(bodies) + 1)

        def worker(i: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                barrier.wait()
                results[i] = one(c, bodies[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
    else:
        with httpx.Client(base_url=url, timeout=600) as c:
            for i, body in enumerate(bodies):
                results[i] = one(c, body)
    wall = time.perf_counter() - start
    assert all(r is not None for r in results), "a request failed"
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "mean_ttft_s": sum(r["ttft_s"] for r in results) / len(results),
            "mean_latency_s": sum(r["latency_s"] for r in results) / len(results),
            "per_request_tokens": [r["tokens"] for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nano", help="what `ossgpt serve --model` takes")
    ap.add_argument("--requests", type=int, default=16, help="requests per pass")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--dtype", default="bfloat16", help="server --dtype")
    ap.add_argument("--device", default="cpu", help="server --device")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_batching.json")
    args = ap.parse_args()

    server_args = ["--model", args.model, "--dtype", args.dtype, "--device", args.device,
              "--max-batch", str(max(args.requests, 1)), "--max-model-len", "4096"]
    load_before = os.getloadavg()
    with served(*server_args, timeout=300) as url:
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        bodies = [request_body(name, i, args.max_tokens) for i in range(args.requests)]
        with httpx.Client(base_url=url, timeout=600) as c:   # warm-up
            one(c, request_body(name, 10_000, args.max_tokens))
        sequential = run_pass(url, bodies, concurrent=False)
        concurrent = run_pass(url, bodies, concurrent=True)
    ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]

    print(f"\n{args.requests} streaming chat requests, max_tokens {args.max_tokens}, "
          f"model {args.model} ({args.dtype}, {args.device})")
    print(f"{'pass':<12}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'mean TTFT s':>13}"
          f"{'mean latency s':>16}")
    for label, r in (("sequential", sequential), ("concurrent", concurrent)):
        print(f"{label:<12}{r['tokens']:>8}{r['wall_s']:>9.2f}{r['tokens_per_s']:>9.1f}"
              f"{r['mean_ttft_s']:>13.3f}{r['mean_latency_s']:>16.3f}")
    print(f"concurrent / sequential throughput: {ratio:.2f}x")
    if sequential["per_request_tokens"] != concurrent["per_request_tokens"]:
        print("note: per-request token counts differ between the passes (same seeds)")

    result = {"benchmark": "serve_batching", "model": args.model, "dtype": args.dtype,
              "device": args.device, "requests": args.requests, "max_tokens": args.max_tokens,
              "sequential": sequential, "concurrent": concurrent, "throughput_ratio": ratio,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "loadavg_before": load_before,
                          "loadavg_after": os.getloadavg()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
