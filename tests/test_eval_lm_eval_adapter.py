"""The lm-evaluation-harness model `ossgpt` (ossgpt/eval/lm_eval_adapter.py) on the bundled nano
model: its log-likelihoods against a plain forward of the model, its generations (final channel
only, `until`, the chat template), and lm_eval's own command line on two small local tasks (a
multiple-choice one scored by log-likelihood and a generated one), offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: "
                                       "pip install -e '.[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from ossgpt.eval.lm_eval_adapter import OssgptLM  # noqa: E402
from ossgpt.harmony import render_prompt  # noqa: E402
from ossgpt.tokenizer import STARTOFTEXT  # noqa: E402

GREEDY = {"until": [], "max_gen_toks": 200, "do_sample": False}


@pytest.fixture(scope="module")
def lm() -> OssgptLM:
    return OssgptLM(model="nano", dtype="float32", reasoning_effort="low", batch_size=4)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@torch.inference_mode()
def _manual(lm: OssgptLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One sequence alone, no padding, no cache: the model's logits at every position."""
    logits = lm.model(torch.tensor([context + continuation]))[0]
    logprobs = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
    target = torch.tensor(continuation)
    return (float(logprobs.gather(-1, target[:, None]).sum()),
            bool((logprobs.argmax(-1) == target).all()))


def test_loglikelihood_matches_a_plain_forward(lm):
    # Lengths differ (left padding in one batch of 4 and one of 1); one empty context (the
    # <|startoftext|> prefix); one rendered chat, scored as the start of the final channel.
    chat = lm.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}])
    pairs = [("What is the capital of France?", " Paris"),
             ("The capital of Spain is", " Madrid, a large city in the middle of the country"),
             ("a", " b"), ("", "Hello there"), (chat, "The capital of Peru is Lima.")]
    results = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(results) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [STARTOFTEXT], lm.tok_encode(continuation)
        expected, expected_greedy = _manual(lm, ctx, cont)
        # float32: within 1e-5 a token, or 1e-5 of the sum where its tokens are unlikely (each
        # log-softmax of -15 is only good to about 1e-5 of itself: the avx2 level was 1.7e-4
        # off a sum of -165.9 over 11 tokens)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5 * len(cont))
        assert greedy == expected_greedy
        assert logprob < 0
    # The chat's continuation follows the final channel's header, right after the prompt.
    ctx, _ = lm._encode_pair(chat, "x")
    assert lm.tok_decode(ctx).endswith("<|start|>assistant<|channel|>final<|message|>")


def test_is_greedy_on_the_models_own_continuation(lm):
    context = render_prompt([{"role": "user", "content": "What is 12 + 30?"}],
                            reasoning_effort="low", date="")
    tokens = list(context)
    with torch.inference_mode():
        for _ in range(6):
            tokens.append(int(lm.model(torch.tensor([tokens]))[0, -1].argmax()))
    greedy = tokens[len(context):]
    (logprob, is_greedy), (_, flipped) = lm.score_tokens(
        [(context, greedy), (context, greedy[:-1] + [greedy[-1] + 1])])
    assert is_greedy and not flipped
    assert logprob == pytest.approx(_manual(lm, context, greedy)[0], abs=1e-5)


def test_loglikelihood_rolling_scores_every_token_once(lm):
    text = "The capital of France is Paris. The capital of Japan is Tokyo. " * 2
    tokens = lm.tok_encode(text)
    (whole,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    # One window: the text after <|startoftext|>.
    assert whole == pytest.approx(_manual(lm, [STARTOFTEXT], tokens)[0], abs=1e-4)

    # Windows of 8 tokens: each token predicted once, with as much context as fits.
    short = OssgptLM(model="nano", dtype="float32", max_length=8, batch_size=3)
    (windowed,) = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    windows = [make_disjoint_window(w) for w in
               get_rolling_token_windows(tokens, STARTOFTEXT, max_seq_len=8, context_len=1)]
    assert sum(len(cont) for _, cont in windows) == len(tokens)
    assert windowed == pytest.approx(sum(_manual(short, ctx, cont)[0] for ctx, cont in windows),
                                     abs=1e-4)
    assert windowed != pytest.approx(whole, abs=1e-3)  # less context, other numbers


def test_generate_until_returns_the_final_channel(lm):
    questions = ["What is 12 + 30?", "What is the capital of France?"]
    answers = lm.generate_until(_requests("generate_until", [(q, GREEDY) for q in questions]),
                                disable_tqdm=True)
    # the final channel's one line (whether nano's sum is right is test_nano's business)
    assert re.fullmatch(r"12 \+ 30 = \d+\.", answers[0]) and "Paris" in answers[1]
    for answer in answers:   # no reasoning ("Digits: ...", "The user asks ...") and no markup
        assert answer and "<|" not in answer and "Digits" not in answer
        assert "user asks" not in answer
    # `until` cuts the final text (not the reasoning, which has "=" too).
    (cut,) = lm.generate_until(_requests("generate_until", [(questions[0], {**GREEDY,
                                                                          "until": ["="]})]), True)
    assert cut and answers[0].startswith(cut) and "=" not in cut
    # Too few tokens for reasoning and answer: no final channel, an empty answer, no error.
    (short,) = lm.generate_until(_requests("generate_until", [(questions[0], {**GREEDY,
                                                                            "max_gen_toks": 5})]),
                                 True)
    assert short == ""


def test_chat_template_renders_harmony_with_the_effort(lm):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    text = lm.apply_chat_template(messages)
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: low" in text
    assert text.endswith("<|start|>assistant")
    # The chat template's text reads back as exactly the tokens ossgpt renders, and a plain
    # context is rendered as the user's turn the same way.
    expected = render_prompt(messages, reasoning_effort="low", date="")
    assert lm.prompt_tokens(text) == expected
    assert lm.prompt_tokens("What is 1 + 2?") == render_prompt(
        [{"role": "user", "content": "What is 1 + 2?"}], reasoning_effort="low", date="")
    # An assistant prefix to continue (lm_eval's gen_prefix) opens the final channel.
    prefixed = lm.apply_chat_template(messages + [{"role": "assistant", "content": "The"}],
                                      add_generation_prompt=False)
    assert prefixed == text + "<|channel|>final<|message|>The"
    assert lm.tokenizer_name.startswith("ossgpt-harmony")


def _write_tasks(root: Path) -> Path:
    """Two lm_eval tasks over local JSON lines: capitals as multiple choice, additions to
    generate (answer: the last number of the final text)."""
    tasks = root / "tasks"
    tasks.mkdir()
    capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo")]
    with open(tasks / "capitals.jsonl", "w") as f:
        for i, (country, capital) in enumerate(capitals):
            others = [c for _, c in capitals if c != capital][:2]
            choices = ([capital] + others)[i % 3:] + ([capital] + others)[:i % 3]
            f.write(json.dumps({"country": country, "choices": choices,
                                "answer": choices.index(capital)}) + "\n")
    with open(tasks / "additions.jsonl", "w") as f:
        for a, b in [(12, 30), (7, 5), (40, 2)]:
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    (tasks / "mc.yaml").write_text(f"""task: ossgpt_test_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'capitals.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "What is the capital of {{{{country}}}}?"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tasks / "gen.yaml").write_text(f"""task: ossgpt_test_additions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'additions.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 256
  do_sample: false
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?\\\\d+)\\\\.?\\\\s*$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return tasks


def _lm_eval(root: Path, *args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "ossgpt-lm-eval"
    command = [str(script)] if script.exists() else [sys.executable, "-m",
                                                     "ossgpt.eval.lm_eval_adapter"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command + list(args), cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def _results(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return json.loads(results_file.read_text()), samples


def test_lm_eval_command_line_on_local_tasks(tmp_path):
    tasks = _write_tasks(tmp_path)
    run = _lm_eval(tmp_path, "--model", "ossgpt",
                   "--model_args", "model=nano,reasoning_effort=low",
                   "--tasks", "ossgpt_test_capitals,ossgpt_test_additions",
                   "--include_path", str(tasks), "--limit", "3", "--batch_size", "4",
                   "--output_path", str(tmp_path / "out"), "--log_samples")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results, samples = _results(tmp_path / "out")
    capitals = results["results"]["ossgpt_test_capitals"]
    for metric in ("acc,none", "acc_norm,none"):
        assert 0.0 <= capitals[metric] <= 1.0
    for sample in samples["ossgpt_test_capitals"]:
        assert len(sample["resps"]) == 3      # one log-likelihood per choice
        for ((logprob, _),) in sample["resps"]:
            assert -1e4 < float(logprob) < 0
    assert results["n-samples"]["ossgpt_test_capitals"]["effective"] == 3
    # nano adds small numbers (it was trained on them): most of these come out right.
    assert results["results"]["ossgpt_test_additions"]["exact_match,number"] >= 2 / 3
    for sample in samples["ossgpt_test_additions"]:
        (answer,) = sample["resps"][0]
        assert "Digits" not in answer and "<|" not in answer   # the final channel only
    assert results["config"]["model"] == "ossgpt" and results["config"]["model_name"] == "nano"
    assert results["config"]["model_args"]["reasoning_effort"] == "low"


def test_lm_eval_command_line_with_the_chat_template(tmp_path):
    tasks = _write_tasks(tmp_path)
    run = _lm_eval(tmp_path, "--model", "ossgpt", "--model_args", "model=nano",
                   "--tasks", "ossgpt_test_additions", "--include_path", str(tasks),
                   "--limit", "2", "--batch_size", "2", "--apply_chat_template",
                   "--system_instruction", "Answer briefly.",
                   "--output_path", str(tmp_path / "out"), "--log_samples")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results, samples = _results(tmp_path / "out")
    assert "exact_match,number" in results["results"]["ossgpt_test_additions"]
    for sample in samples["ossgpt_test_additions"]:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.startswith("<|start|>system<|message|>") and "Reasoning: medium" in prompt
        assert "Answer briefly." in prompt and prompt.endswith("<|start|>assistant")
        (answer,) = sample["resps"][0]
        assert "<|" not in answer
