"""Fine-tune nano with LoRA on a skill it was never trained on (single-digit multiplication, a
fact table with held-out phrasings), and measure held-out accuracy before and after, plus the
old families' accuracy, on this machine. Writes benchmarks/results/finetune_nano.json.

    python benchmarks/finetune_nano.py [--steps 450] [--n-eval 200]

A third of the data is the new family, two thirds replayed nano conversations (450 steps, one
pass). With less replay the old families are forgotten:
- 1:1 replay, 300 steps: multiplication 95.6%, but reversing a list of 5 items fell from 85/86
  to 57/86 held-out prompts (the second item replaced by the third): strings 92.5% -> 80%;
- 1:1 with the LoRA on the experts only, 300 steps: strings kept, but refusal 100% -> 90% and
  multiplication only 65%;
- a third replay at lr 2e-3: capitals 95% -> 30%.
With less of the new family or a lower lr, the 64 products are not memorised (1:2 at lr 1e-3,
300 steps: 38%).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import ossgpt
from ossgpt import nano
from ossgpt.data import FAMILIES, examples
from ossgpt.data.tasks import chat_record, mixture
from ossgpt.lora import load_adapter

ROOT = Path(__file__).resolve().parent


def write_data(path: Path, n_new: int, n_replay: int, seed: int = 0) -> None:
    """The new family's training split, plus some of nano's own mixture (replay) so the old
    skills are not forgotten."""
    new = itertools.islice(examples("multiplication", "train", seed), n_new)
    old = itertools.islice(mixture(seed=seed + 99), n_replay)
    with path.open("w") as f:
        for ex in itertools.chain(new, old):
            f.write(json.dumps(chat_record(ex)) + "\n")


def accuracy(model, n_eval: int) -> dict:
    held_out = nano.evaluate(model, n_per_family=n_eval, progress=False,
                             families=("multiplication",) + FAMILIES)
    return {f: round(r["accuracy"], 4) for f, r in held_out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--n-new", type=int, default=2000)
    ap.add_argument("--n-replay", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--target", default="attention,experts", help="LoRA targets")
    ap.add_argument("--work", default="checkpoints/finetune-nano")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate the finished run in --work again (e.g. with more --n-eval)")
    args = ap.parse_args()

    work = Path(args.work)
    reuse = args.reuse and (work / "run" / "metrics.json").exists()
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_data(work / "train.jsonl", args.n_new, args.n_replay)
    data = work / "train.jsonl"
    base = ossgpt.load("nano", dtype=torch.float32, progress=False)
    before = accuracy(base, args.n_eval)
    print("before:", before, flush=True)
    t0 = time.time()
    if not reuse:
        subprocess.run([sys.executable, "-m", "ossgpt", "finetune", "--data", str(data),
                        "--output", str(work / "run"), "--steps", str(args.steps),
                        "--batch-tokens", str(args.batch_tokens), "--lora-rank", str(args.rank),
                        "--lr", str(args.lr), "--target", args.target, "--val-split", "0.02"],
                       check=True)
    run_metrics = json.loads((work / "run" / "metrics.json").read_text())
    seconds = run_metrics["seconds"] if reuse else time.time() - t0
    tuned = ossgpt.load("nano", dtype=torch.float32, progress=False)
    load_adapter(tuned, work / "run" / "adapter")
    after = accuracy(tuned, args.n_eval)
    print("after:", after, flush=True)
    result = {"steps": args.steps, "batch_tokens": args.batch_tokens, "rank": args.rank, "n_eval": args.n_eval,
              "lr": args.lr, "target": args.target,
              "train_lines": args.n_new + args.n_replay, "finetune_seconds": round(seconds, 1),
              "threads": torch.get_num_threads(), "before": before, "after": after,
              "run_metrics": run_metrics}
    out = ROOT / "results" / "finetune_nano.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
