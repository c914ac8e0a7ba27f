"""The `ossgpt` command end to end, in subprocesses, on random checkpoints."""

import json
import os
import subprocess
import sys

import pytest

from ossgpt.cli import main


def run(*args, stdin=None, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ossgpt", *args], input=stdin, text=True,
                          capture_output=True, env=full_env, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("generate", "chat", "make-random"):
        assert command in out.stdout


def test_generate_from_flag_and_stdin(tiny_hf):
    a = run("generate", "--model", str(tiny_hf), "--prompt", "Once upon a time", "--max-tokens", "8",
            "--temperature", "0", "--dtype", "float32")
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("Once upon a time") and len(a.stdout) > len("Once upon a time") + 1
    b = run("generate", "--model", str(tiny_hf), "--max-tokens", "8", "--temperature", "0",
            "--dtype", "float32", stdin="Once upon a time")
    assert b.returncode == 0, b.stderr
    assert b.stdout == a.stdout          # greedy: same continuation either way


def test_chat_scripted_from_stdin(tiny_original):
    out = run("chat", "--model", str(tiny_original), "--max-tokens", "16", "--seed", "3",
              "--reasoning-effort", "low", "--developer", "Answer briefly.", "--show-reasoning",
              stdin="What is 2 + 2?\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()            # random weights: noise, but a reply
    assert "Traceback" not in out.stderr


def _bad_checkpoints(tmp_path, tiny_original):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_original / "config.json").read_text())
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "model.safetensors").write_bytes(b"")
    wrong_layers = tmp_path / "wrong_layers"
    wrong_layers.mkdir()
    config = json.loads((tiny_original / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (wrong_layers / "config.json").write_text(json.dumps(config))
    (wrong_layers / "model.safetensors").symlink_to(tiny_original / "model.safetensors")
    return {"missing dir": (str(tmp_path / "nope"), "no such directory"),
            "no config.json": (str(no_config), "no config.json"),
            "no weights": (str(no_weights), "no *.safetensors"),
            "bad config.json": (str(bad_json), "config.json"),
            "missing tensors": (str(wrong_layers), "block.4."),
            "hub id offline": ("openai/gpt-oss-20b", "hf download openai/gpt-oss-20b")}


@pytest.mark.parametrize("case", ["missing dir", "no config.json", "no weights", "bad config.json",
                                  "missing tensors", "hub id offline"])
def test_bad_model_gives_one_line_and_exit_1(case, tmp_path, tiny_original):
    model, expected = _bad_checkpoints(tmp_path, tiny_original)[case]
    out = run("generate", "--model", model, "--prompt", "hi",
              env={"HF_HOME": str(tmp_path / "hf_home")})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    assert expected in errors[0]


def test_make_random_writes_a_loadable_checkpoint(tmp_path):
    out = run("make-random", "--output", str(tmp_path / "ckpt"), "--layout", "hf", "--layers", "2")
    assert out.returncode == 0, out.stderr
    gen = run("generate", "--model", str(tmp_path / "ckpt"), "--prompt", "x", "--max-tokens", "2")
    assert gen.returncode == 0, gen.stderr


# -- the bundled nano model, the default --model ---------------------------------------------------

def test_chat_with_nano_adds_with_reasoning():
    out = run("chat", "--temperature", "0", "--show-reasoning", stdin="What is 348 + 275?\n")
    assert out.returncode == 0, out.stderr
    assert "623" in out.stdout
    assert "Units" in out.stdout          # the worked steps, shown with --show-reasoning
    hidden = run("chat", "--temperature", "0", stdin="What is 348 + 275?\n")
    assert "623" in hidden.stdout and "Units" not in hidden.stdout


def test_chat_verbose_says_where_it_runs():
    from ossgpt.kernels import build
    out = run("chat", "--temperature", "0", "--verbose", "--device", "cpu", stdin="What is 2 + 2?\n",
              env={"OSSGPT_ISA": "plain"})
    assert out.returncode == 0, out.stderr
    assert "CPU kernels plain" in out.stderr
    level, _ = build.chosen_level()     # the best this CPU runs, or what OSSGPT_ISA forces
    out = run("chat", "--temperature", "0", "--verbose", "--device", "cpu", stdin="What is 2 + 2?\n")
    assert "Running on cpu, " in out.stderr and f"CPU kernels {level}" in out.stderr


def test_chat_with_nano_knows_capitals():
    out = run("chat", "--temperature", "0", stdin="What is the capital of Peru?\n")
    assert out.returncode == 0, out.stderr
    assert "Lima" in out.stdout


def test_chat_with_nano_calls_demo_tools():
    out = run("chat", "--temperature", "0", "--tools", "demo", stdin="What's the weather in Paris?\n")
    assert out.returncode == 0, out.stderr
    assert '→ get_weather({"city": "Paris"})' in out.stdout.replace('{"city":"Paris"}', '{"city": "Paris"}')
    assert "← " in out.stdout              # the demo tool ran and its result went back
    final = out.stdout.split("← ", 1)[1]
    assert "Paris" in final


def test_generate_defaults_to_nano():
    out = run("generate", "--prompt", "Hello", "--max-tokens", "5", "--seed", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello")


# -- numbers out of range: one error line, exit 1, before anything loads ----------------------------

OUT_OF_RANGE = [
    ("generate", "--max-tokens", "-1"), ("generate", "--max-tokens", "0"),
    ("generate", "--temperature", "-0.5"), ("generate", "--temperature", "nan"),
    ("generate", "--top-p", "0"), ("generate", "--top-p", "1.5"), ("generate", "--top-k", "-1"),
    ("chat", "--max-tokens", "-5"), ("chat", "--temperature", "inf"), ("chat", "--top-p", "-1"),
    ("serve", "--port", "-1"), ("serve", "--port", "70000"), ("serve", "--max-batch", "0"),
    ("serve", "--max-queue", "-1"), ("serve", "--max-model-len", "1"),
    ("make-random", "--output", "x", "--layers", "0"),
    ("train-nano", "--steps", "-5"), ("train-nano", "--batch-tokens", "0"),
    ("train-nano", "--lr", "0"), ("eval-nano", "--n", "0"),
    ("finetune", "--data", "x", "--lora-rank", "0"),
    ("finetune", "--data", "x", "--lora-alpha", "-1"),
    ("finetune", "--data", "x", "--steps", "0"), ("finetune", "--data", "x", "--epochs", "-1"),
    ("finetune", "--data", "x", "--lr", "-0.1"), ("finetune", "--data", "x", "--val-split", "1"),
    ("finetune", "--data", "x", "--micro-batch-tokens", "0"),
    ("bench", "--prompt-tokens", "0"), ("bench", "--decode-steps", "-2"),
    ("bench", "--batch", "0,8"),
    ("eval", "--repeats", "0"), ("eval", "--limit", "-3"), ("eval", "--batch", "0"),
    ("eval", "--max-tokens", "0"), ("eval", "--temperature", "nan"), ("eval", "--top-p", "2"),
]


@pytest.mark.parametrize("args", OUT_OF_RANGE, ids=" ".join)
def test_numbers_out_of_range_give_one_line_and_exit_1(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: {args[-2]} must be "), err


def test_generate_negative_max_tokens_end_to_end():
    out = run("generate", "--prompt", "hi", "--max-tokens", "-1")
    assert (out.returncode, out.stdout, out.stderr) == (
        1, "", "error: --max-tokens must be >= 1, got -1\n")


@pytest.mark.parametrize("spec", ["gpu", "cpu:two", "cuda:1"])
def test_a_bad_experts_device_gives_one_line(spec):
    out = run("generate", "--prompt", "hi", "--experts-device", spec)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"error: --experts-device wants cpu or cpu:N (the first N layers' experts), got {spec!r}" in out.stderr
