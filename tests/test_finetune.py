"""`ossgpt finetune`: chat data with bad lines, exact resume after kill -9, LoRA learning."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ossgpt import finetune as ft
from ossgpt.data import examples
from ossgpt.data.tasks import chat_record
from ossgpt.errors import OssgptError
from ossgpt.model import unpack_experts


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft") / "chats.jsonl"
    lines = [json.dumps(chat_record(ex))
             for ex in itertools.islice(examples("multiplication", "train", 0), 40)]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    lines.insert(9, json.dumps({"prompt": "not a chat"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_lines_are_reported_with_file_and_line(data: Path) -> None:
    chats, problems = ft.read_chats(data)
    assert len(chats) == 40
    assert [p.split(": ")[0] for p in problems] == [f"{data}:4", f"{data}:8", f"{data}:10"]
    assert "not JSON" in problems[0] and "assistant" in problems[1] and "messages" in problems[2]
    with pytest.raises(OssgptError, match=f"{data}:4: not JSON"):
        ft.read_chats(data, strict=True)


def test_reasoning_field_names_are_equivalent(tmp_path: Path) -> None:
    ex = next(examples("multiplication", "train", 0))
    records = []
    for key in ("reasoning", "reasoning_content", "thinking"):
        r = json.loads(json.dumps(chat_record(ex)))  # a deep copy
        turn = r["messages"][-1]
        turn[key] = turn.pop("reasoning")
        records.append(json.dumps(r))
    (tmp_path / "d.jsonl").write_text("\n".join(records))
    chats, problems = ft.read_chats(tmp_path / "d.jsonl")
    assert not problems and chats[0].tokens == chats[1].tokens == chats[2].tokens
    assert sum(chats[0].mask) > 10


def test_steps_get_the_same_data_whatever_happened_before(data: Path) -> None:
    chats, _ = ft.read_chats(data)
    a, b = ft.batch_source(chats, 512, seed=3), ft.batch_source(chats, 512, seed=3)
    b(0), b(1)
    for x, y in zip(a(5), b(5)):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.mask, y.mask)


def _finetune(model: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ossgpt", "finetune", "--model", str(model), "--data", str(data),
           "--output", str(out), "--steps", "16", "--batch-tokens", "512", "--lr", "1e-2",
           "--target", "attention,experts,router", "--task-prompts", "0", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _history(out: Path) -> list[dict]:
    """The training steps' records (not the step-0 evaluation of the base)."""
    return [h for h in torch.load(out / "train_state.pt", weights_only=False)["history"] if "loss" in h]


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_loss_curve(tiny_original, data, tmp_path) -> None:
    straight = _finetune(tiny_original, data, tmp_path / "straight")
    assert straight.wait(600) == 0, straight.stderr.read().decode()
    expected = _history(tmp_path / "straight")

    killed = _finetune(tiny_original, data, tmp_path / "killed")
    state = tmp_path / "killed" / "train_state.pt"
    step = 0
    while step < 4:
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
        if state.exists():
            step = torch.load(state, weights_only=False)["step"]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert step < 16
    assert _finetune(tiny_original, data, tmp_path / "killed").wait(600) != 0  # needs --resume
    resumed = _finetune(tiny_original, data, tmp_path / "killed", "--resume")
    assert resumed.wait(600) == 0, resumed.stderr.read().decode()
    got = _history(tmp_path / "killed")
    print(f"\nkilled at step {step}; losses uninterrupted {[round(h['loss'], 4) for h in expected]}")
    assert [h["step"] for h in got] == [h["step"] for h in expected]
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # And it learned: LoRA on random weights still fits the data a little.
    evals = [h["eval_loss"] for h in expected if "eval_loss" in h]
    assert evals[-1] < evals[0]
    adapter = json.loads((tmp_path / "killed" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["target_modules"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_original, data, tmp_path) -> None:
    """torchrun with 2 CPU processes (gloo) on the same global batches: the same losses."""
    args = ["--model", str(tiny_original), "--data", str(data), "--steps", "4",
            "--batch-tokens", "1024", "--micro-batch-tokens", "256", "--lr", "1e-2",
            "--task-prompts", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ossgpt", "finetune", *args,
                          "--output", str(tmp_path / "one")], env=env, capture_output=True)
    assert one.returncode == 0, one.stderr.decode()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "ossgpt", "finetune", *args,
                          "--output", str(tmp_path / "two")], env=env, capture_output=True)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a, b = _history(tmp_path / "one"), _history(tmp_path / "two")
    print(f"\n1 process: {[round(h['loss'], 5) for h in a]}\n2 processes: {[round(h['loss'], 5) for h in b]}")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)


def test_gradient_checkpointing_and_full_method_give_the_same_gradients(tiny_original, data):
    import ossgpt
    from ossgpt.lora import LoraConfig, add_lora

    chats, _ = ft.read_chats(data)
    batch = ft.make_batch(chats[:3])
    grads = []
    for checkpointed in (False, True):
        model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
        torch.manual_seed(0)
        params = add_lora(model, LoraConfig(rank=2, targets=("attention", "experts", "router")))
        if checkpointed:
            ft.checkpoint_blocks(model)
        loss = ft.chunked_loss(model, batch, chunk=64)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in params]))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))
    # Full fine-tuning: dense experts equal to the MXFP4 ones, every weight trains.
    model = ossgpt.load(tiny_original, dtype=torch.float32, progress=False)
    before = ft.chunked_loss(model, batch).item()
    unpack_experts(model)
    model.requires_grad_(True)
    loss = ft.chunked_loss(model, batch)
    assert loss.item() == pytest.approx(before, rel=1e-6)
    loss.backward()
    assert model.blocks[0].mlp.experts.mlp1_weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_nano_learns_a_tool_whose_name_it_could_not_write(tmp_path) -> None:
    """The issue's user: a few hundred conversations teaching a new function tool
    (`get_local_time`: `_local` and `_time` have no unembedding row of their own in nano), no
    flags but --data, --output, --steps and --task-prompts, then `ossgpt serve --adapter`.
    Held-out phrasings x cities, through the real server and the `openai` client, against the
    base on the first 20 of the same prompts.

    40 steps, not the default 100: a default run takes 20 minutes of a slow 2-core CPU (the
    defaults are measured by benchmarks/finetune_defaults.py: 90% of tool calls by step 20).
    From the nano that learned the built-in tools, 30 steps of this test's data reached 80% of
    20 held-out tool calls and 40 steps 100% (the nano before it: 95% by step 20). The
    accuracy fine-tuning records at each of its evaluations is over 10 of the held-out prompts
    (default 64: all 20 here); the served evaluation after it takes every held-out prompt."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    from conftest import run_server

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(chat_record(ex)) + "\n"
                            for ex in itertools.islice(examples("local_time", "train", 0), 200)))
    out = tmp_path / "run"
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "ossgpt", "finetune", "--data", str(data),
                          "--output", str(out), "--steps", "40", "--task-prompts", "10"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    seconds = time.time() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_tokens"] >= 2          # _local, _time (and others of the data)
    assert metrics["base_tool_calls_accuracy"] <= 0.1 and metrics["tool_calls_accuracy"] >= 0.9
    assert (out / "curve.png").stat().st_size > 10_000
    assert "warning" not in run.stderr

    held_out = [chat_record(ex) for ex in examples("local_time", "test", 0)]
    assert len(held_out) >= 40

    def calls_it(client: openai.OpenAI, model: str, record: dict) -> bool:
        last_user = max(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
        reply = client.chat.completions.create(
            model=model, messages=record["messages"][:last_user + 1], tools=record["tools"],
            reasoning_effort=record["reasoning_effort"], temperature=0, max_tokens=100)
        calls = reply.choices[0].message.tool_calls or []
        city = json.loads(record["messages"][last_user + 1]["tool_calls"][0]["function"]["arguments"])
        return (len(calls) >= 1 and calls[0].function.name == "get_local_time"
                and json.loads(calls[0].function.arguments) == city)

    with run_server("--dtype", "float32", "--adapter", f"ft={out / 'adapter'}") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(8) as pool:
            tuned = list(pool.map(lambda r: calls_it(client, "ft", r), held_out))
            # the base on 20 of them: it cannot write the tool's name (0 of all 69 when it last ran
            # on every one), and its replies run on to max_tokens
            base = list(pool.map(lambda r: calls_it(client, "nano", r), held_out[:20]))
    tuned_share, base_share = sum(tuned) / len(tuned), sum(base) / len(base)
    print(f"\nnew tool, {len(held_out)} held-out prompts served: adapter {tuned_share:.1%}, base "
          f"{base_share:.1%} (first {len(base)}); fine-tuning took {seconds:.0f} s ({metrics['steps']} steps)")
    assert tuned_share >= 0.9 and base_share <= 0.05
