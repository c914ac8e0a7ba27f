"""`ossgpt eval` throughput in-process: replies per second with --batch 8 (decoded together,
batch-invariant) against --batch 1 (one at a time), the same suite, seed and limit; and a check
that both gave the same replies. Writes benchmarks/results/eval_throughput.json.

    python benchmarks/eval_throughput.py [--limit 56] [--max-tokens 256] [--batches 1,8]

The time is the generation and grading, from the first request to the last reply graded
(timings.jsonl's longest entry: every request is submitted at the start), not the model load.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import ossgpt.eval
from ossgpt import kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="nano")
    parser.add_argument("--limit", type=int, default=56)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--effort", default="low")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"
                                                 / "eval_throughput.json"))
    args = parser.parse_args()
    results, replies = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batches.split(",")):
            out = Path(tmp) / f"b{batch}"
            summary = ossgpt.eval.run(suite=args.suite, limit=args.limit, batch=batch,
                                      max_tokens=args.max_tokens, reasoning_effort=args.effort,
                                      temperature=1.0, seed=0, out=out, progress=False)
            seconds = max(json.loads(line)["seconds"]
                          for line in (out / "timings.jsonl").read_text().splitlines())
            n = sum(s["n"] for s in summary["efforts"].values())
            tokens = sum(s["mean_tokens"] * s["n"] for s in summary["efforts"].values())
            results[batch] = {"samples": n, "seconds": round(seconds, 2),
                              "samples_per_s": round(n / seconds, 3),
                              "tokens_per_s": round(tokens / seconds, 1),
                              "score": summary["efforts"][args.effort]["score"]}
            replies[batch] = (out / "samples.jsonl").read_bytes()
            print(f"batch {batch}: {n} samples in {seconds:.1f} s = {n / seconds:.2f} samples/s "
                  f"({tokens / seconds:.0f} tokens/s)", flush=True)
    first = next(iter(replies.values()))
    record = {"suite": args.suite, "limit": args.limit, "max_tokens": args.max_tokens,
              "effort": args.effort, "threads": torch.get_num_threads(),
              "cpu_kernels": kernels.isa(), "machine": platform.processor() or platform.machine(),
              "identical_replies": all(r == first for r in replies.values()),
              "by_batch": results}
    batches = sorted(results)
    if len(batches) > 1:
        record["speedup"] = round(results[batches[-1]]["samples_per_s"]
                                  / results[batches[0]]["samples_per_s"], 2)
        print(f"batch {batches[-1]} / batch {batches[0]}: {record['speedup']}x; identical "
              f"replies: {record['identical_replies']}")
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
