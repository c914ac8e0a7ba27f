"""Fine-tuning on chat data (`ossgpt finetune`): JSONL of OpenAI-style conversations rendered
with harmony, loss on the assistant's tokens only, LoRA (PEFT-format adapter out) or full
(checkpoint out), through the same Trainer as nano (exact resume, atomic checkpoints).

Data lines: {"messages": [...], "tools"?: [...], "reasoning_effort"?: "low|medium|high",
"date"?: "YYYY-MM-DD", "builtin_tools"?: ["browser", "python"]}. Assistant reasoning may be
given as `reasoning`, `reasoning_content` or `thinking`. What is trained: the assistant turns
after the last user message (reasoning, tool calls and the final answer); earlier turns are
history, rendered as harmony renders history.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .compact_vocab import DistinctRowsLoss
from .data import Example, prompt_tokens, render_example
from .data.examples import json_object, same_value
from .errors import OssgptError
from .harmony import REASONING_KEYS
from .model import Transformer
from .train.trainer import Batch, TrainConfig, Trainer
from .trainable_tokens import TrainableRows


# -- data ----------------------------------------------------------------------------------------

@dataclass
class Chat:
    example: Example
    tokens: list[int]
    mask: list[int]
    where: str            # "file:line", for messages


def _example(record: object) -> Example:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError('a line must be a JSON object with a "messages" list')
    messages = []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a role")
        m = dict(m)
        if m["role"] == "assistant":
            reasoning = next((m.pop(k) for k in REASONING_KEYS if m.get(k)), None)
            for k in REASONING_KEYS:
                m.pop(k, None)
            if reasoning:
                m["reasoning"] = reasoning
        messages.append(m)
    effort = record.get("reasoning_effort", "medium")
    if effort not in ("low", "medium", "high"):
        raise ValueError(f"reasoning_effort must be low, medium or high, not {effort!r}")
    builtin = record.get("builtin_tools") or []
    if not isinstance(builtin, list) or not all(isinstance(b, str) for b in builtin):
        raise ValueError('"builtin_tools" must be a list of names ("browser", "python")')
    return Example("chat", messages, record.get("tools"), effort, str(record.get("date", "")),
                   builtin_tools=tuple(builtin))


def _records(source: str):
    """(where, parsed JSON or the parse error) for each line of a JSONL file, or each row of a
    `datasets` hub dataset's train split when `source` is not a file."""
    path = Path(source)
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except ValueError as e:
                        yield f"{path}:{lineno}", ValueError(f"not JSON ({e})")
        return
    if path.suffix in (".jsonl", ".json") or "/" not in source or path.exists():
        raise OssgptError(f"--data {source}: no such file")
    try:
        import datasets
    except ImportError:
        raise OssgptError(f"--data {source}: not a file, and the `datasets` package (for hub "
                          f"datasets) is not installed") from None
    try:
        rows = datasets.load_dataset(source, split="train")
    except Exception as e:
        raise OssgptError(f"--data {source}: cannot load it from the hub ({e})") from None
    for i, row in enumerate(rows):
        yield f"{source}[{i}]", row


def iter_chats(source: str | Path, strict: bool = False, problems: list[str] | None = None):
    """Each usable conversation, rendered, as the file is read (memory does not grow with it);
    a bad line is an OssgptError naming it with `strict`, else appended to `problems` as
    "file:line: why" and skipped."""
    for where, record in _records(str(source)):
        try:
            if isinstance(record, Exception):
                raise record
            ex = _example(record)
            tokens, mask = render_example(ex, check=False)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            if strict:
                raise OssgptError(f"{where}: {e}") from None
            if problems is not None:
                problems.append(f"{where}: {e}")
            continue
        yield Chat(ex, tokens, mask, where)


def read_chats(source: str | Path, strict: bool = False) -> tuple[list[Chat], list[str]]:
    """Every usable conversation, rendered; -> (chats, problems "file:line: why"). With
    `strict`, the first bad line is an error instead of a skipped line."""
    problems: list[str] = []
    chats = list(iter_chats(source, strict, problems))
    if not chats:
        raise OssgptError(f"{source}: no usable conversations" +
                          (f" (first problem: {problems[0]})" if problems else ""))
    return chats, problems


def split(chats: list[Chat], val_fraction: float, seed: int) -> tuple[list[Chat], list[Chat]]:
    order = list(range(len(chats)))
    random.Random(seed).shuffle(order)
    n_val = min(len(chats) - 1, math.ceil(len(chats) * val_fraction)) if val_fraction > 0 else 0
    return [chats[i] for i in order[n_val:]], [chats[i] for i in order[:n_val]]


def make_batch(chats: list[Chat]) -> Batch:
    """Right-padded (tokens, next-token targets, positions, loss mask)."""
    T = max(len(c.tokens) for c in chats) - 1
    tokens = torch.zeros(len(chats), T, dtype=torch.long)
    targets = torch.zeros(len(chats), T, dtype=torch.long)
    positions = torch.full((len(chats), T), -1, dtype=torch.long)
    mask = torch.zeros(len(chats), T, dtype=torch.bool)
    for i, c in enumerate(chats):
        n = len(c.tokens) - 1
        ids = torch.tensor(c.tokens)
        tokens[i, :n], targets[i, :n] = ids[:-1], ids[1:]
        positions[i, :n] = torch.arange(n)
        mask[i, :n] = torch.tensor(c.mask[1:], dtype=torch.bool)
    return Batch(tokens, positions, targets, mask)


def batch_source(chats: list[Chat], batch_tokens: int, seed: int, micro_tokens: int = 4096):
    """step -> micro-batches. The data is a stream of epochs, each a seeded shuffle, cut into
    equal steps of about `batch_tokens`: step s always gets the same examples (exact resume)."""
    per_step = max(1, round(batch_tokens / (sum(len(c.tokens) for c in chats) / len(chats))))

    def epoch_order(epoch: int) -> list[int]:
        order = list(range(len(chats)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        return order

    def get(step: int) -> list[Batch]:
        picked = []
        for k in range(step * per_step, (step + 1) * per_step):
            epoch, i = divmod(k, len(chats))
            picked.append(chats[epoch_order(epoch)[i]])
        picked.sort(key=lambda c: len(c.tokens))
        batches, group = [], []
        for c in picked:
            if group and (len(group) + 1) * len(c.tokens) > micro_tokens:
                batches.append(make_batch(group))
                group = []
            group.append(c)
        return batches + [make_batch(group)]

    get.per_step = per_step
    return get


# -- defaults ------------------------------------------------------------------------------------

# Measured (benchmarks/finetune_defaults.py): LoRA peak learning rates on nano and on a 20b-dim
# random checkpoint; full fine-tuning's is the usual one.
LORA_LR = 2e-3
FULL_LR = 1e-4


def default_steps(n_train: int, per_step: int, epochs: float | None = None) -> int:
    """Steps for `epochs` passes over the data; without `epochs`, 3 passes (as TRL's SFT), raised
    to 100 steps where the data is small, but never past 10 passes (memorising, not learning)."""
    steps_per_pass = n_train / per_step
    if epochs is not None:
        return max(1, math.ceil(epochs * steps_per_pass))
    return max(1, math.ceil(max(3 * steps_per_pass, min(100, 10 * steps_per_pass))))


def token_choice(choice: str, model: Transformer, chats: list[Chat], method: str
                 ) -> dict[str, list[int]]:
    """--trainable-tokens: "auto" (LoRA only: the data's tokens without a row of their own),
    "none", or comma-separated ids; -> {"embedding": ids, "unembedding": ids}.

    With "auto", an unembedding row trains only for the ids the data trains the model to write.
    The row of an id seen only in prompts would get nothing but the softmax's push-down, which
    Adam scales up to full-size steps: over a long run it would grow along minus the average
    hidden state, and wherever a hidden state pointed the other way its logit would win. Left as
    it was (for nano, the row every unused id shares), the model never writes it."""
    from .trainable_tokens import untrained_ids

    if choice == "none":
        return {}
    if choice == "auto":
        if method != "lora":    # full fine-tuning trains every row already
            return {}
        ids = untrained_ids(model, {t for c in chats for t in c.tokens})
        written = {t for c in chats for t, m in zip(c.tokens, c.mask) if m}
        return {"embedding": ids, "unembedding": [t for t in ids if t in written]}
    try:
        ids = sorted({int(x) for x in choice.split(",") if x.strip()})
    except ValueError:
        raise OssgptError(f"--trainable-tokens must be auto, none or token ids, got {choice!r}") from None
    if method != "lora" or any(not 0 <= i < model.config.vocab_size for i in ids):
        raise OssgptError(f"--trainable-tokens ids must be in [0, {model.config.vocab_size}) "
                          f"and need --method lora")
    return {"embedding": ids, "unembedding": ids}


def warnings_for(history: list[dict], metric: str | None) -> list[str]:
    """What a user should hear at the end of a run that has not learned what it could."""
    out = []
    evals = [h for h in history if "eval_loss" in h]
    if len(evals) >= 3:
        a, b = evals[-2]["eval_loss"], evals[-1]["eval_loss"]
        if b < a * 0.9:
            out.append(f"validation loss was still falling fast at the end ({a:.3f} -> {b:.3f} "
                       f"over the last {evals[-1]['step'] - evals[-2]['step']} steps): more "
                       f"--steps would likely help")
    if metric and evals and evals[-1].get(metric) == 0:
        out.append(f"{metric.replace('_', ' ')} is 0% on the held-out conversations: the model "
                   f"has not learned the task (more --steps, a higher --lr, or more data)")
    return out


# -- the model -----------------------------------------------------------------------------------

def chunked_loss(model: Transformer, batch: Batch, chunk: int = 256,
                 distinct: DistinctRowsLoss | None = None) -> torch.Tensor:
    """Mean cross-entropy over the masked targets, over the full vocabulary. The logits are made
    `chunk` rows at a time and recomputed in the backward pass (201,088 float32 logits per
    token would otherwise dominate memory). With `distinct` (a frozen unembedding whose rows
    repeat, as nano's do), only its distinct rows are multiplied: the same loss, far cheaper."""
    h = model.hidden_states(batch.tokens, positions=batch.positions)[batch.mask]
    targets = batch.targets[batch.mask]
    table = model.unembedding

    if distinct is not None:
        rows = table.rows if isinstance(table, TrainableRows) else None
        slot = table.slot if rows is not None else None

        def piece(h_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
            return distinct.loss_sum(h_part, t_part, rows, slot)
    else:
        def piece(h_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(table(h_part).float(), t_part, reduction="sum")

    total = sum(checkpoint(piece, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, len(h), chunk))
    return total / max(1, len(h))


def distinct_rows(model: Transformer) -> DistinctRowsLoss | None:
    """The cheaper exact loss's table, where the unembedding is frozen and its rows repeat."""
    table = model.unembedding
    base = table.base if isinstance(table, TrainableRows) else table
    if base.weight.requires_grad:
        return None
    return DistinctRowsLoss.if_worth_it(base.weight, table.ids if isinstance(table, TrainableRows) else None)


def checkpoint_blocks(model: Transformer) -> None:
    """Gradient checkpointing: each block's activations are recomputed in the backward pass."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# -- evaluation ----------------------------------------------------------------------------------

def _matches(reply, want: dict, offered: set[str]) -> bool:
    """Whether a parsed reply does what the reference turn `want` does: the same function
    calls, each to an offered tool, with arguments that parse to the reference's JSON object
    (strings up to case and spaces, numbers within 1e-6, as the nano evaluation scores); or,
    with no calls, the same final answer."""
    want_calls = [(c["function"]["name"], json_object(c["function"]["arguments"]))
                  for c in want.get("tool_calls") or []]
    if not want_calls:
        return not reply.tool_calls and reply.content.strip() == (want.get("content") or "").strip()
    if any(name == "python" for name, _ in want_calls):  # code, not JSON: compared as text
        return ("python" in offered and [(c.name, c.arguments.strip()) for c in reply.tool_calls]
                == [(c["function"]["name"], c["function"]["arguments"].strip())
                    for c in want["tool_calls"]])
    got = [(c.name, json_object(c.arguments)) for c in reply.tool_calls]
    return len(got) == len(want_calls) and all(
        name == w_name and name in offered and args is not None and args.keys() == w_args.keys()
        and all(same_value(args[k], v) for k, v in w_args.items())
        for (name, args), (w_name, w_args) in zip(got, want_calls))


def task_metric_name(chats: list[Chat]) -> str:
    """"tool_calls" when most references call a tool, else "answers"."""
    calls = sum(bool(_reference(c).get("tool_calls")) for c in chats)
    return "tool_calls" if calls * 2 > len(chats) else "answers"


def _reference(chat: Chat) -> dict:
    from .data.examples import trained_turns
    start, end = trained_turns(chat.example.messages)[0]
    return chat.example.messages[start:end][-1]


def task_accuracy(model: Transformer, chats: list[Chat], max_tokens: int = 192,
                  batch_size: int = 16) -> float:
    """Share of prompts whose greedy first reply matches the reference turn's (`_matches`)."""
    from .generate import generate
    from .harmony import BUILTIN_CALLS, parse_reply, stop_tokens
    from .sampling import SamplingParams

    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(chats), batch_size):
        part = chats[i:i + batch_size]
        replies: list[list[int]] = [[] for _ in part]
        for ev in generate(model, [prompt_tokens(c.example) for c in part], max_tokens,
                           SamplingParams(temperature=0), stop_tokens()):
            replies[ev.row].append(ev.token)
        for c, tokens in zip(part, replies):
            offered = {(t.get("function") or t).get("name") for t in c.example.tools or []}
            offered.update(call for b in c.example.builtin_tools for call in BUILTIN_CALLS[b])
            right += _matches(parse_reply(tokens), _reference(c), offered)
    model.train(was_training)
    return right / max(1, len(chats))


def run(model: Transformer, train: list[Chat], val: list[Chat], cfg: TrainConfig,
        out_dir: str | Path, batch_tokens: int = 4096, grad_checkpointing: bool = False,
        progress: bool = True, micro_tokens: int = 4096, task_prompts: int = 64) -> list[dict]:
    """Train the model's trainable parameters (already chosen: LoRA or all) and return the
    history; resumes from out_dir/train_state.pt when present. At each evaluation the task
    accuracy (`task_accuracy`) of up to `task_prompts` held-out conversations is recorded as
    "tool_calls_accuracy" or "answers_accuracy"."""
    if grad_checkpointing:
        checkpoint_blocks(model)
    batches = batch_source(train, batch_tokens, cfg.seed, micro_tokens)
    # Validation in micro-batches of about `micro_tokens` padded tokens, as training's.
    per_eval = max(1, min(16, micro_tokens // max(len(c.tokens) for c in val))) if val else 1
    eval_batches = [make_batch(val[i:i + per_eval]) for i in range(0, len(val), per_eval)]
    distinct = distinct_rows(model)
    probe = val[:task_prompts]
    metric = f"{task_metric_name(probe)}_accuracy" if probe else ""
    trainer = Trainer(model, lambda m, b: chunked_loss(m, b, distinct=distinct), batches, cfg,
                      out_dir, eval_batches, progress,
                      task=(lambda m: {metric: task_accuracy(m, probe)}) if probe else None)
    print(f"{len(train)} training conversations ({batches.per_step} per step), "
          f"{len(val)} for validation; {sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
          f" trainable parameters", file=sys.stderr)
    return trainer.fit(resume=True)
