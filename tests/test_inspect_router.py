"""ossgpt.inspect.router on nano: message-kind labels of a rendered conversation with a tool call
and its result, streamed statistics against the same statistics computed by hand from a kept
Trace, and accumulators whose size does not grow with the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ossgpt.commands import _load
from ossgpt.data import FAMILIES, examples
from ossgpt.data.tasks import chat_record
from ossgpt.finetune import read_chats
from ossgpt.inspect import Trace, run
from ossgpt.inspect.router import KINDS, RouterStats, kind_ids, label_tokens, pad_labels, stop_after
from ossgpt.tokenizer import get_tokenizer

TOOL_CHAT = {
    "messages": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "reasoning": "I will call get_weather.",
         "tool_calls": [{"id": "c0", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c0", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "assistant", "reasoning": "It is 21 degrees.", "content": "It is 21 degrees in Paris."},
    ],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "reasoning_effort": "low", "date": "2025-01-02",
}


@pytest.fixture(scope="module")
def nano():
    return _load("nano", "cpu", "float32")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Two conversations of every family of nano's mixture, through the fine-tuning reader."""
    path = tmp_path_factory.mktemp("router") / "chats.jsonl"
    lines = [chat_record(ex) for f in FAMILIES for ex, _ in zip(examples(f, "train", seed=1), range(2))]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return read_chats(path, strict=True)[0]


def _segments(tokens):
    """(kind, text) of each run of equally labelled tokens."""
    tok, out = get_tokenizer(), []
    for t, kind in zip(tokens, label_tokens(tokens)):
        if out and out[-1][0] == kind:
            out[-1][1].append(t)
        else:
            out.append((kind, [t]))
    return [(kind, tok.decode(ids)) for kind, ids in out]


def test_labels_of_a_conversation_with_a_tool_call_and_result(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(TOOL_CHAT) + "\n")
    (chat,), _ = read_chats(path, strict=True)
    segments = _segments(chat.tokens)
    assert [k for k, _ in segments] == ["system", "developer", "user", "analysis", "tool_call",
                                        "tool_result", "analysis", "final"]
    text = dict(segments[2:6])
    # Header and terminator belong to the message: each span is one whole message.
    assert text["user"] == "<|start|>user<|message|>What's the weather in Paris?<|end|>"
    assert text["tool_call"] == ("<|start|>assistant to=functions.get_weather<|channel|>commentary "
                                 "<|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")
    assert text["tool_result"] == ("<|start|>functions.get_weather to=assistant<|channel|>commentary"
                                   "<|message|>{\"temp\": 21}<|end|>")
    assert segments[-1] == ("final", "<|start|>assistant<|channel|>final<|message|>"
                                     "It is 21 degrees in Paris.<|return|>")
    assert all(s.startswith("<|start|>") for _, s in segments)
    assert segments[1][1].startswith("<|start|>developer<|message|>") and "Answer briefly." in segments[1][1]


def test_labels_of_loose_and_unfinished_text_are_other():
    tok = get_tokenizer()
    assert set(label_tokens(tok.encode("plain text, no harmony"))) == {"other"}
    # A header never finished (a prompt ending in <|start|>assistant) keeps "other" too.
    tokens = tok.encode("<|start|>user<|message|>hi<|end|><|start|>assistant", allow_special=True)
    labels = label_tokens(tokens)
    assert labels[:5] == ["user"] * 5 and labels[5:] == ["other", "other"]


def _by_hand(model, batches, layers):
    """The statistics from a kept Trace of full forward passes, token by token."""
    E, K = model.config.num_experts, len(KINDS)
    ref = {l: dict(tokens=0, load=np.zeros(E, int), co=np.zeros((E, E), int), kind=np.zeros((K, E), int),
                   entropy=0.0, top1=0.0) for l in layers}
    for batch in batches:
        with Trace(model, layers, record=("router",)) as trace:
            _, positions = run(model, batch)
        labels = pad_labels([kind_ids(t) for t in batch])
        for l in layers:
            logits, experts, gates = trace["router", l], trace["experts", l], trace["gates", l]
            for b in range(len(batch)):
                for t in range(positions.shape[1]):
                    if positions[b, t] < 0:
                        continue
                    r, chosen = ref[l], experts[b, t].tolist()
                    r["tokens"] += 1
                    p = torch.softmax(logits[b, t].double(), -1)
                    r["entropy"] += float(-(p * p.log()).sum())
                    r["top1"] += float(gates[b, t, 0])
                    for i in chosen:
                        r["load"][i] += 1
                        r["kind"][labels[b, t], i] += 1
                        for j in chosen:
                            r["co"][i, j] += 1
    return ref


def test_streamed_statistics_equal_those_of_a_kept_trace(nano, chats):
    layers = [0, 2]
    batches = [[c.tokens for c in chats[i:i + 5]] for i in range(0, len(chats), 5)]
    stats = RouterStats(nano, layers)
    with Trace(nano, layers, record=("router",), keep=False, on_record=stats.on_record) as trace:
        for batch in batches:
            stats.labels = pad_labels([kind_ids(t) for t in batch])
            with stop_after(nano, max(layers)):      # later blocks and logits never run
                run(nano, batch)
    assert not trace.records                          # keep=False: nothing stored
    ref = _by_hand(nano, batches, layers)
    n_real = sum(len(c.tokens) for c in chats)
    for row, l in enumerate(layers):
        r = ref[l]
        assert stats.tokens[row] == r["tokens"] == n_real      # padding never counted
        np.testing.assert_array_equal(stats.load[row], r["load"])
        np.testing.assert_array_equal(stats.coactivation[row], r["co"])
        np.testing.assert_array_equal(stats.load_by_kind[row], r["kind"])
        assert stats.entropy_sum[row] == pytest.approx(r["entropy"], rel=1e-9)
        assert stats.top1_sum[row] == pytest.approx(r["top1"], rel=1e-6)
        assert stats.entropy_hist[row].sum() == stats.top1_hist[row].sum() == n_real
    summary = stats.summary()
    assert [l["layer"] for l in summary["layers"]] == layers
    for l in summary["layers"]:
        assert sum(l["load"]) == pytest.approx(1.0, abs=1e-5)
        assert set(l["by_kind"]) >= {"system", "user", "analysis", "final", "tool_call", "tool_result"}
        for kind in l["by_kind"].values():
            assert sum(kind["load"]) == pytest.approx(1.0, abs=1e-5)   # rounded to 6 digits


def test_accumulators_do_not_grow_with_the_data(nano, chats):
    """Bounded memory: after 1 batch and after 30 the accumulators have the same arrays, shapes
    and bytes, and nothing else is held (the trace keeps no records)."""
    stats = RouterStats(nano)
    tokens = [c.tokens for c in chats]

    def snapshot():
        return {name: (a.shape, a.dtype, a.nbytes) for name, a in stats.arrays().items()}, sorted(vars(stats))

    with Trace(nano, None, record=("router",), keep=False, on_record=stats.on_record) as trace:
        stats.labels = pad_labels([kind_ids(t) for t in tokens[:4]])
        run(nano, tokens[:4])
        first, nbytes = snapshot(), stats.nbytes()
        total = sum(len(t) for t in tokens[:4])
        for i in range(30):                           # ~120 conversations, ~25k tokens
            batch = [tokens[(4 * i + j) % len(tokens)] for j in range(4)]
            stats.labels = pad_labels([kind_ids(t) for t in batch])
            with stop_after(nano, nano.config.num_hidden_layers - 1):
                run(nano, batch)
            total += sum(len(t) for t in batch)
    assert snapshot() == first and stats.nbytes() == nbytes
    assert not trace.records
    assert (stats.tokens == total).all() and total > 10_000   # it did count everything
    assert nbytes < 16_000                            # 4 layers x 8 experts: a few kilobytes
