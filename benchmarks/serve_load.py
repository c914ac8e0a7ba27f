"""`ossgpt serve` under load: N mixed requests (chat completions, responses, completions;
streamed or not; a share of them malformed) from C concurrent clients.

    .venv/bin/python benchmarks/serve_load.py [--model nano] [--requests 1000] [--clients 16]

Counts every status: the well-formed must all be 200, the malformed each a 4xx in OpenAI's error
shape ({"error": {"message", "type", "param", "code"}}), none a 5xx. Reads the server's resident
memory (VmRSS) after a warm-up, at its peak, and after the load once idle, beside the prefix
cache's bytes (which stay by design: recent prompts for later turns). Writes
benchmarks/results/serve_load_<name>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:  # the openai package's HTTP client
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent

MALFORMED = [
    ("/v1/chat/completions", b'{"model": "m", "messages": ['),                           # cut JSON
    ("/v1/chat/completions", {"model": "m", "messages": []}),                            # empty
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 9}),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "wizard", "content": "Hi"}]}),
    ("/v1/responses", {"model": "m", "input": "Hi", "previous_response_id": "resp_missing"}),
    ("/v1/responses", {"model": "m", "input": "Hi", "max_output_tokens": 0}),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": -3}),
    ("/v1/completions", b"not json at all"),
]


def well_formed(i: int, rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randrange(100, 999), rng.randrange(100, 999)
    stream = rng.random() < 0.5
    kind = rng.choice(["chat", "responses", "completions"])
    if kind == "chat":
        return "/v1/chat/completions", {"model": "m", "stream": stream, "max_tokens": 24, "seed": i,
                                        "messages": [{"role": "user", "content": f"What is {a} + {b}?"}]}
    if kind == "responses":
        return "/v1/responses", {"model": "m", "stream": stream, "max_output_tokens": 24,
                                 "input": f"What is {a} + {b}?", "seed": i}
    return "/v1/completions", {"model": "m", "stream": stream, "max_tokens": 16, "seed": i,
                               "prompt": f"The sum of {a} and {b} is"}


def send(client: httpx.Client, path: str, body) -> tuple[int, bool]:
    """-> (status, whether an error body has OpenAI's shape)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    streamed = isinstance(body, dict) and body.get("stream")
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        data = r.read()
    if r.status_code == 200:
        if streamed:
            assert b"data: " in data, data[:200]
        return 200, True
    try:
        error = json.loads(data)["error"]
        shaped = {"message", "type", "param", "code"} <= set(error) and isinstance(error["message"], str)
    except (ValueError, KeyError, TypeError):
        shaped = False
    return r.status_code, shaped


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="nano")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--malformed", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=2, help="the same load again: memory that grows each round leaks")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ossgpt", "serve", "--model", args.model, "--served-name", "m",
                               "--port", str(port), "--store", ":memory:"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("ossgpt serve exited")
                time.sleep(0.3)
        rng = random.Random(0)
        jobs = []
        for i in range(args.requests):
            if rng.random() < args.malformed:
                jobs.append((True, *rng.choice(MALFORMED)))
            else:
                jobs.append((False, *well_formed(i, rng)))
        with httpx.Client(base_url=url, timeout=None) as client:
            for _, path, body in jobs[:8]:                     # warm-up
                send(client, path, body)
        start_rss, peak = rss_mib(server.pid), [0.0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(server.pid))
                time.sleep(0.2)
        watcher = threading.Thread(target=watch)
        watcher.start()
        results = collections.Counter()
        seconds, after_rounds = [], []
        with httpx.Client(base_url=url, timeout=None, limits=httpx.Limits(max_connections=args.clients)) as client:
            def run(job):
                bad, path, body = job
                status, shaped = send(client, path, body)
                if status >= 500:
                    return "5xx"
                if bad:
                    return "malformed: 4xx, OpenAI shape" if 400 <= status < 500 and shaped else f"malformed: {status}"
                return "well-formed: 200" if status == 200 else f"well-formed: {status}"
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    results.update(pool.map(run, jobs))
                seconds.append(time.perf_counter() - t0)
                time.sleep(2)
                after_rounds.append(rss_mib(server.pid))
        stop.set()
        watcher.join()
        time.sleep(2)
        health = json.loads(urllib.request.urlopen(url + "/health").read())
        end_rss = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    out = {"model": args.model, "requests": args.requests, "clients": args.clients, "rounds": args.rounds,
           "seconds": seconds, "results": dict(results),
           "rss_mib": {"after_warm_up": start_rss, "peak": peak[0], "after_each_round": after_rounds, "after": end_rss},
           "health_after": health}
    for k, v in sorted(results.items()):
        print(f"{k:<34}{v:>6}")
    print(f"{args.rounds} x {args.requests} requests in {' + '.join(f'{x:.1f}' for x in seconds)} s from "
          f"{args.clients} clients; server RSS {start_rss:.0f} MiB after warm-up, {peak[0]:.0f} peak, after each "
          f"round {', '.join(f'{x:.0f}' for x in after_rounds)} "
          f"(prefix cache {health['prefix_cache_bytes'] / 2**20:.1f} MiB, active {health['active']}, "
          f"waiting {health['waiting']})")
    name = Path(args.model).name if args.model != "nano" else "nano"
    path = ROOT / "benchmarks" / "results" / f"serve_load_{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
