"""Teach nano gpt-oss's built-in tools with ossgpt's own LoRA fine-tuning, merge the adapter into
a checkpoint, and measure on held-out conversations: the browser (search the bundled corpus,
open the right result, answer with a citation) and python (compute with one line of code),
each run with the real tools in the loop as `ossgpt chat --tools browser,python` runs them;
and nano's old families before and after. Writes benchmarks/results/finetune_nano_tools.json: a
run from nano starts its list of stages, a run from an earlier stage's merged checkpoint (--base)
adds to it.

    python benchmarks/finetune_nano_tools.py [--steps 200] [--n-eval 60]

The data: the two new families plus a replay of nano's own mixture, so old skills are kept.

    python benchmarks/finetune_nano_tools.py --copy-probe MERGED

prints how surely a model copies the question's operands into its code, by kind. Numbers copy
near 1. An earlier kind, the length of a phrase of 3-5 words (`print(len("rock cat dog"))`),
copied every word after the first at about 1/29, a guess among its 29 words, on every model
trained (nano copies a list by item number, not a run of words), and scored 0%; so every
operand of the python family is now a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import ossgpt
from ossgpt import nano
from ossgpt.data import FAMILIES, Example, examples
from ossgpt.data.builtin_tools import PYTHON_KINDS
from ossgpt.data.tasks import chat_record, mixture
from ossgpt.data.tool_loop import run_tool_loop, summarize
from ossgpt.files import write_atomic
from ossgpt.lora import load_adapter

ROOT = Path(__file__).resolve().parent
NEW = ("browser", "python")


def write_data(path: Path, n_browser: int, n_python: int, n_replay: int, seed: int = 0,
               extra_python: dict[str, int] | None = None,
               extra_replay: dict[str, int] | None = None) -> None:
    """The lines of the training file; `extra_python` adds that many python examples of each
    kind of computation (e.g. {"digits": 1500}) on top of the even mix, `extra_replay` that many
    of each of nano's own families (e.g. {"refusal": 600}) on top of the replay."""
    # Two in five replayed questions declare both tools, as `ossgpt chat --tools browser,python`
    # does, and are still answered directly: without them nano learns that a declared tool is
    # always called ("What is the capital of Peru?" went to python).
    replay = (dataclasses.replace(ex, builtin_tools=NEW) if i % 5 < 2 else ex
              for i, ex in enumerate(mixture(seed=seed + 99)))
    parts = [itertools.islice(examples("browser", "train", seed), n_browser),
             itertools.islice(examples("python", "train", seed), n_python),
             itertools.islice(replay, n_replay)]
    parts += [_more("python", n, seed + 7, kind) for kind, n in (extra_python or {}).items()]
    parts += [_more(family, n, seed + 7) for family, n in (extra_replay or {}).items()]
    with path.open("w") as f:
        for ex in itertools.chain(*parts):
            f.write(json.dumps(chat_record(ex), ensure_ascii=False) + "\n")


def _more(family: str, n: int, seed: int, kind: str | None = None) -> Iterator[Example]:
    # A function, not a generator expression in write_data's loop: the expression would read
    # the loop's `kind` when the file is written, after the loop, so every extra part would be
    # of the last kind (stage 2 of the single run got 2,500 more sort examples, no len).
    of_kind = (ex for ex in examples(family, "train", seed) if kind is None or ex.expected["kind"] == kind)
    return itertools.islice(of_kind, n)


def old_accuracy(model, n_eval: int, builtin_tools: tuple[str, ...] = ()) -> dict:
    held_out = nano.evaluate(model, n_per_family=n_eval, progress=False, families=FAMILIES,
                             builtin_tools=builtin_tools)
    return {f: round(r["accuracy"], 4) for f, r in held_out.items()}


def scores(model, n_eval: int, n_eval_old: int, transcript: Path | None = None) -> dict:
    """The old families as nano was taught them, the same with both tools declared (answered,
    not sent to a tool), and the tool families."""
    return {"old": old_accuracy(model, n_eval_old), "old_tools_declared": old_accuracy(model, n_eval_old, NEW),
            "tools": tool_accuracy(model, n_eval, transcript)}


def tool_accuracy(model, n_eval: int, transcript: Path | None = None) -> dict:
    """Held-out scores; with `transcript`, each conversation's calls and answer written there."""
    cases = [ex for f in NEW for ex in list(examples(f, "test", 0))[:n_eval]]
    results = run_tool_loop(model, cases)
    if transcript:
        write_atomic(transcript, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return summarize(results)


def copy_probe(model, n_eval: int) -> dict:
    """How surely the model copies the question's operands into its code, teacher-forced: per
    kind of computation, the mean probability of the code's first token taken from the question
    and of the later ones. A model that cannot copy gives the later ones about 1/(choices)."""
    from ossgpt.data.examples import render_options
    from ossgpt.harmony import render_prompt
    from ossgpt.tokenizer import get_tokenizer

    tok, by_kind = get_tokenizer(), {}
    for ex in list(examples("python", "test", 0))[:n_eval]:
        i = next(k for k, m in enumerate(ex.messages) if m.get("tool_calls"))
        full = render_prompt(ex.messages[:i + 1], **render_options(ex))
        code = tok.encode(ex.messages[i]["tool_calls"][0]["function"]["arguments"])
        start = max(s for s in range(len(full) - len(code) + 1) if full[s:s + len(code)] == code)
        asked = set(tok.encode(ex.messages[i - 1]["content"]))
        with torch.no_grad():
            logp = model(torch.tensor([full[:start + len(code)]])).float().log_softmax(-1)[0]
        copied = [logp[start + j - 1, t].exp().item() for j, t in enumerate(code) if t in asked]
        k = by_kind.setdefault(ex.expected["kind"], {"first": [], "later": []})
        k["first"].append(copied[0])
        k["later"] += copied[1:]
    return {kind: {part: round(sum(p) / len(p), 3) for part, p in parts.items() if p}
            for kind, parts in by_kind.items()}


def counts(ap: argparse.ArgumentParser, option: str, value: str, names: tuple[str, ...]) -> dict[str, int]:
    """NAME=N,... as a dict, or one clear argparse error; an unknown name would be searched for
    forever."""
    try:
        asked = {k: int(n) for k, n in (item.split("=") for item in value.split(",") if item)}
    except ValueError:
        ap.error(f"{option} wants NAME=N,..., got {value!r}")
    if set(asked) - set(names):
        ap.error(f"{option} names are {', '.join(names)}, got {value!r}")
    return asked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--n-browser", type=int, default=1500)
    ap.add_argument("--n-python", type=int, default=1000)
    ap.add_argument("--n-replay", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--n-eval-old", type=int, default=30)
    ap.add_argument("--n-eval-before", type=int, default=20,
                    help="held-out tool conversations per family for the base model (it scores 0)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--target", default="attention,experts",
                    help="what the LoRA trains; attention,router leaves the MXFP4 experts as they "
                    "are, so merging re-quantizes nothing (a stage that heals an earlier merge)")
    ap.add_argument("--work", default="checkpoints/finetune-nano-tools")
    ap.add_argument("--skip-before", action="store_true", help="reuse the last stage's 'before'")
    ap.add_argument("--base", default="nano", help="the checkpoint to fine-tune (e.g. an earlier run's merged one)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training data")
    ap.add_argument("--extra-python", default="", metavar="KIND=N,...",
                    help="more python examples of these kinds of computation, e.g. digits=1500,mul=500")
    ap.add_argument("--extra-replay", default="", metavar="FAMILY=N,...",
                    help="more examples of these of nano's own families, e.g. refusal=600")
    ap.add_argument("--results", default=str(ROOT / "results" / "finetune_nano_tools.json"),
                    help="the curriculum's results file (a run from nano starts it, --base adds a stage)")
    ap.add_argument("--install", metavar="MERGED", help="only write MERGED (a run's merged checkpoint) "
                    "over the bundled nano, in its compact form")
    ap.add_argument("--copy-probe", metavar="MODEL", help="only print copy_probe of MODEL (a checkpoint; "
                    "with --adapter, that adapter on it)")
    ap.add_argument("--adapter", help="with --copy-probe: a run's adapter folder")
    args = ap.parse_args()
    if args.copy_probe:
        model = ossgpt.load(args.copy_probe, dtype=torch.float32, progress=False)
        if args.adapter:
            load_adapter(model, args.adapter)
        print(json.dumps(copy_probe(model, args.n_eval), indent=1))
        return
    if args.install:
        print("wrote", nano.bundle(ossgpt.load(args.install, dtype=torch.bfloat16, progress=False),
                                   nano.bundled_path()))
        return

    # checked before the work folder is cleared, so a typo loses nothing
    extra = counts(ap, "--extra-python", args.extra_python, PYTHON_KINDS)
    extra_replay = counts(ap, "--extra-replay", args.extra_replay, FAMILIES)
    t_start = time.time()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "train.jsonl"
    write_data(data, args.n_browser, args.n_python, args.n_replay, args.seed, extra, extra_replay)
    out = Path(args.results)

    t0 = time.time()
    # The results hold the stages of one curriculum: a run from nano starts a new one, a run from
    # an earlier stage's merged checkpoint (--base) adds its stage.
    stages = json.loads(out.read_text())["stages"] if out.exists() else []
    if args.skip_before and stages:
        before = stages[-1]["before"]
    else:
        base = ossgpt.load("nano", dtype=torch.float32, progress=False)
        before = {"old": old_accuracy(base, args.n_eval_old), "tools": tool_accuracy(base, args.n_eval_before)}
        del base
    eval_seconds = time.time() - t0
    print("before:", json.dumps(before), flush=True)

    t0 = time.time()
    subprocess.run([sys.executable, "-m", "ossgpt", "finetune", "--model", args.base, "--data", str(data),
                    "--output", str(work / "run"), "--steps", str(args.steps),
                    "--batch-tokens", str(args.batch_tokens), "--lora-rank", str(args.rank),
                    "--lr", str(args.lr), "--target", args.target, "--val-split", "0.005", "--task-prompts", "0"],
                   check=True)
    finetune_seconds = time.time() - t0
    merged = work / "merged"
    subprocess.run([sys.executable, "-m", "ossgpt", "merge-adapter", "--adapter",
                    str(work / "run" / "adapter"), "--output", str(merged)], check=True)

    t0 = time.time()
    # The adapter as trained, then the merged checkpoint (its experts re-quantized to MXFP4).
    adapted = ossgpt.load(args.base, dtype=torch.float32, progress=False)
    load_adapter(adapted, work / "run" / "adapter")
    adapter = scores(adapted, args.n_eval, args.n_eval_old)
    print("adapter:", json.dumps(adapter), flush=True)
    del adapted
    tuned = ossgpt.load(str(merged), dtype=torch.float32, progress=False)
    after = scores(tuned, args.n_eval, args.n_eval_old, work / "merged_conversations.jsonl")
    eval_seconds += time.time() - t0
    print("merged:", json.dumps(after), flush=True)

    result = {"base": args.base, "seed": args.seed, "steps": args.steps, "batch_tokens": args.batch_tokens, "rank": args.rank,
              "lr": args.lr, "target": args.target, "train_lines": {"browser": args.n_browser, "python": args.n_python,
                                             "replay": args.n_replay} | {f"python {k}": n for k, n in extra.items()}
              | {f"replay {k}": n for k, n in extra_replay.items()},
              "n_eval": args.n_eval, "n_eval_old": args.n_eval_old,
              "threads": torch.get_num_threads(), "finetune_seconds": round(finetune_seconds, 1),
              "eval_seconds": round(eval_seconds, 1),
              "total_seconds": round(time.time() - t_start, 1),
              "before": before, "adapter": adapter, "merged": after,
              "run_metrics": json.loads((work / "run" / "metrics.json").read_text())}
    stages = [result] if args.base == "nano" else stages + [result]
    out.parent.mkdir(exist_ok=True)
    write_atomic(out, json.dumps({"stages": stages}, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
