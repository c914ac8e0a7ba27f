"""benchmarks/finetune_nano_tools.py writes the training file its results say it trained on."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_nano_tools.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("finetune_nano_tools", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kind(messages: list[dict]) -> str:
    calls = [m["tool_calls"][0]["function"] for m in messages if m.get("tool_calls")]
    if not calls:
        return "no call"
    code = calls[-1]["arguments"]
    return "digits" if code.startswith("print(len(str(") else "mul" if " * " in code else code


def test_extra_examples_are_of_each_kind_asked(tmp_path):
    bench, path = load_benchmark(), tmp_path / "train.jsonl"
    bench.write_data(path, n_browser=0, n_python=0, n_replay=0,
                     extra_python={"digits": 7, "mul": 3}, extra_replay={"refusal": 2})
    kinds = collections.Counter(kind(json.loads(line)["messages"]) for line in path.read_text().splitlines())
    assert kinds == {"digits": 7, "mul": 3, "no call": 2}
