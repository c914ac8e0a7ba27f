"""Fine-tuning on chat data (`ossgpt finetune`): JSONL of OpenAI-style conversations rendered
with harmony, loss on the assistant's tokens only, LoRA (PEFT-format adapter out) or full
(checkpoint out), through the same Trainer as nano (exact resume, atomic checkpoints).

Data lines: {"messages": [...], "tools"?: [...], "reasoning_effort"?: "low|medium|high",
"date"?: "YYYY-MM-DD"}. Assistant reasoning may be given as `reasoning`, `reasoning_content` or
`thinking`. What is trained: the assistant turns after the last user message (reasoning, tool
calls and the final answer); earlier turns are history, rendered as harmony renders history.
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

from .data import Example, prompt_tokens, render_example
from .errors import OssgptError
from .harmony import REASONING_KEYS
from .model import Transformer
from .train.trainer import Batch, TrainConfig, Trainer


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
    return Example("chat", messages, record.get("tools"), effort, str(record.get("date", "")))


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


# -- the model -----------------------------------------------------------------------------------

def chunked_loss(model: Transformer, batch: Batch, chunk: int = 256) -> torch.Tensor:
    """Mean cross-entropy over the masked targets, over the full vocabulary. The logits are made
    `chunk` rows at a time and recomputed in the backward pass (201,088 float32 logits per
    token would otherwise dominate memory)."""
    h = model.hidden_states(batch.tokens, positions=batch.positions)[batch.mask]
    targets = batch.targets[batch.mask]
    weight = model.unembedding.weight

    def piece(h_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h_part, weight).float(), t_part, reduction="sum")

    total = sum(checkpoint(piece, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, len(h), chunk))
    return total / max(1, len(h))


def checkpoint_blocks(model: Transformer) -> None:
    """Gradient checkpointing: each block's activations are recomputed in the backward pass."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# -- evaluation ----------------------------------------------------------------------------------

def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def answer_accuracy(model: Transformer, chats: list[Chat], max_tokens: int = 256,
                    batch_size: int = 16) -> float:
    """Task metric: greedy replies whose final answer (or tool call) equals the reference's."""
    from .data.examples import trained_turns
    from .generate import generate
    from .harmony import parse_reply, stop_tokens
    from .sampling import SamplingParams

    model.eval()
    right = 0
    for i in range(0, len(chats), batch_size):
        part = chats[i:i + batch_size]
        replies: list[list[int]] = [[] for _ in part]
        for ev in generate(model, [prompt_tokens(c.example) for c in part], max_tokens,
                           SamplingParams(temperature=0), stop_tokens()):
            replies[ev.row].append(ev.token)
        for c, tokens in zip(part, replies):
            reply = parse_reply(tokens)
            start, end = trained_turns(c.example.messages)[0]
            want = c.example.messages[start:end][-1]
            calls = [(x["function"]["name"], _json_or_text(x["function"]["arguments"]))
                     for x in want.get("tool_calls") or []]
            if calls:
                right += [(x.name, _json_or_text(x.arguments)) for x in reply.tool_calls] == calls
            else:
                right += reply.content.strip() == (want.get("content") or "").strip()
    model.train()
    return right / max(1, len(chats))


def run(model: Transformer, train: list[Chat], val: list[Chat], cfg: TrainConfig,
        out_dir: str | Path, batch_tokens: int = 4096, grad_checkpointing: bool = False,
        progress: bool = True, micro_tokens: int = 4096) -> list[dict]:
    """Train the model's trainable parameters (already chosen: LoRA or all) and return the
    history; resumes from out_dir/train_state.pt when present."""
    if grad_checkpointing:
        checkpoint_blocks(model)
    batches = batch_source(train, batch_tokens, cfg.seed, micro_tokens)
    eval_batches = [make_batch(val[i:i + 16]) for i in range(0, len(val), 16)]
    trainer = Trainer(model, lambda m, b: chunked_loss(m, b), batches, cfg, out_dir,
                      eval_batches, progress)
    print(f"{len(train)} training conversations ({batches.per_step} per step), "
          f"{len(val)} for validation; {sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
          f" trainable parameters", file=sys.stderr)
    return trainer.fit(resume=True)
