"""The measurements behind `ossgpt finetune`'s defaults (ossgpt/finetune.py: LORA_LR and
default_steps): LoRA runs at several peak learning rates on
- nano, teaching it a new tool (`get_local_time`, 200 conversations, default steps): the
  validation loss, the held-out tool-call accuracy, and the first step at which it reached 90%;
- a 20b-dimension random checkpoint (1 layer, made with `ossgpt make-random` if missing: a
  step of 4 layers takes about 2 minutes on 2 cores) on the same data, a short run: its validation loss curve (random weights have no task to get
  right; the question is which rate lowers the loss fastest without diverging).
Writes benchmarks/results/finetune_defaults.json and prints a table.

    python benchmarks/finetune_defaults.py [--which nano,20b] [--lrs 5e-4,1e-3,2e-3,5e-3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ossgpt.data import examples
from ossgpt.data.tasks import chat_record

ROOT = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "ossgpt-bench" / "checkpoints"


def finetune(model: str, data: Path, out: Path, lr: float, *extra: str) -> dict:
    """One run, or the finished run already in `out` (the benchmark resumes where it stopped)."""
    if not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "ossgpt", "finetune", "--model", model, "--data",
                        str(data), "--output", str(out), "--lr", str(lr), *extra], check=True)
    history = torch.load(out / "train_state.pt", weights_only=False)["history"]
    evals = [h for h in history if "eval_loss" in h]
    acc = [h for h in evals if "tool_calls_accuracy" in h]
    return {"lr": lr, "metrics": json.loads((out / "metrics.json").read_text()),
            "eval_loss_by_step": {h["step"]: round(h["eval_loss"], 4) for h in evals},
            "first_step_at_90%": next((h["step"] for h in acc if h["tool_calls_accuracy"] >= 0.9), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--which", default="nano,20b")
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3,5e-3")
    ap.add_argument("--lrs-20b", default="5e-4,2e-3,5e-3")
    ap.add_argument("--work", default="checkpoints/finetune-defaults")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "local_time.jsonl"
    data.write_text("".join(json.dumps(chat_record(ex)) + "\n"
                            for ex in itertools.islice(examples("local_time", "train", 0), 200)))
    lrs = [float(x) for x in args.lrs.split(",")]
    results: dict = {"data": "200 local_time conversations (ossgpt.data.tasks)"}
    if "nano" in args.which:
        results["nano"] = [finetune("nano", data, work / f"nano-{lr}", lr) for lr in lrs]
    if "20b" in args.which:
        model = CACHE / "20b-L1-hf"
        if not model.exists():
            subprocess.run([sys.executable, "-m", "ossgpt", "make-random", "--output", str(model), "--config",
                            "20b", "--layers", "1", "--layout", "hf"], check=True)
        results["20b-L1"] = [finetune(str(model), data, work / f"20b-{lr}", lr, "--steps", "6",
                                      "--batch-tokens", "512", "--val-split", "0.01",
                                      "--task-prompts", "0")
                             for lr in [float(x) for x in args.lrs_20b.split(",")]]
    out = ROOT / "results" / "finetune_defaults.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, **results}, indent=2))
    for name in ("nano", "20b-L1"):
        for r in results.get(name, []):
            m = r["metrics"]
            print(f"{name:7} lr {r['lr']:<7g} val loss by step {r['eval_loss_by_step']}  tool calls "
                  f"{m.get('tool_calls_accuracy', float('nan')):.0%}, first >=90% at step "
                  f"{r['first_step_at_90%']}  ({m['steps']} steps, {m['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
