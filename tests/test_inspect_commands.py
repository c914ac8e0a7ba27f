"""`ossgpt inspect router|lens|attention|steer` end to end through ossgpt.cli.main on nano: JSON,
valid PNGs and an index.html linking them; bad input is one error line and exit code 1."""

from __future__ import annotations

import json
import re

import pytest

from ossgpt.cli import main
from ossgpt.data import FAMILIES, examples
from ossgpt.data.tasks import chat_record
from ossgpt.inspect.router import KINDS

PNG = b"\x89PNG\r\n\x1a\n"
CPU = ["--model", "nano", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two conversations of each of nano's families (tool calls and results among them)."""
    path = tmp_path_factory.mktemp("inspect") / "chats.jsonl"
    lines = [chat_record(ex) for f in FAMILIES for ex, _ in zip(examples(f, "train", seed=2), range(2))]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return path


def check_report(out, json_name, pngs):
    report = json.loads((out / json_name).read_text())
    page = (out / "index.html").read_text()
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert f"src='{name}'" in page
    # Every image the page shows is there, linked relatively.
    for src in re.findall(r"src='([^']+)'", page):
        assert (out / src).is_file() and "/" not in src
    assert "<script" not in page and "http" not in page
    return report, page


def fails(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_router_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "router"
    main(["inspect", "router", "--data", str(data), "--out", str(out), "--layers", "0,3",
          "--batch", "4", *CPU])
    report, page = check_report(out, "router.json", ["load.png", "entropy.png", "entropy_hist.png",
                                                     "coactivation.png", "load_by_kind.png"])
    assert report["conversations"] == 2 * len(FAMILIES) and report["skipped_lines"] == []
    assert [l["layer"] for l in report["layers"]] == [0, 3]
    assert report["peak_rss_mib"] > 0 and report["stats_bytes"] > 0
    layer = report["layers"][0]
    assert len(layer["load"]) == report["num_experts"] == 8
    assert len(layer["coactivation"]) == 8 and 0 < layer["entropy_mean"] < report["max_entropy"]
    assert {"tool_call", "tool_result", "final", "analysis", "user", "system"} <= set(layer["by_kind"])
    assert set(layer["by_kind"]) <= set(KINDS)
    assert sum(k["tokens"] for k in layer["by_kind"].values()) == layer["tokens"] == report["tokens"]
    stdout = capsys.readouterr().out
    assert "layer 3: entropy" in stdout and str(out / "index.html") in stdout


def test_lens_end_to_end(tmp_path, capsys):
    out = tmp_path / "lens"
    main(["inspect", "lens", "--prompt", "What is the capital of France?", "--out", str(out),
          "--top", "3", *CPU])
    report, page = check_report(out, "lens.json", ["lens.png"])
    T = len(report["token_ids"])
    assert [l["layer"] for l in report["layers"]] == [0, 1, 2, 3]
    last = report["layers"][-1]
    assert len(last["top_ids"]) == T and len(last["top_ids"][0]) == 3
    assert all(p[0] >= p[1] >= p[2] for p in last["top_probs"])
    assert last["top_tokens"][-1][0] in page or "&" in page     # the table shows it (escaped)
    # Raw text: no harmony framing.
    main(["inspect", "lens", "--prompt", "The capital of France is", "--no-chat", "--out",
          str(tmp_path / "raw"), "--layers", "3", *CPU])
    raw = json.loads((tmp_path / "raw" / "lens.json").read_text())
    assert raw["tokens"][0] == "The" and len(raw["layers"]) == 1


def test_attention_end_to_end(tmp_path):
    out = tmp_path / "attention"
    main(["inspect", "attention", "--prompt", "Hi", "--out", str(out), "--layers", "1", "--window", "20", *CPU])
    report, page = check_report(out, "attention.json", ["sink_mass.png", "attention_layer1.png"])
    assert not (out / "attention_layer0.png").exists()
    assert sorted(report["sink_mass"]) == ["0", "1", "2", "3"]
    assert all(len(v) == 8 and all(0 <= x <= 1 for x in v) for v in report["sink_mass"].values())
    heads = report["maps"]["1"]
    assert len(heads) == 8 and len(heads[0]) == 20 and len(heads[0][0]) == 21   # sink + 20 keys
    T = len(report["token_ids"])
    assert report["window"] == [T - 20, T]


def test_steer_end_to_end(tmp_path, capsys):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("What is the capital of France?\nWhat is the capital of Japan?\n\n")
    neg.write_text("What is 12 + 30?\nWhat is 7 - 5?\n")
    out = tmp_path / "steer"
    main(["inspect", "steer", "--positive", str(pos), "--negative", str(neg), "--layer", "2",
          "--scales", "-4,0,4", "--prompt", "Hello!", "--max-tokens", "12", "--out", str(out), *CPU])
    report, page = check_report(out, "steer.json", ["projections.png"])
    assert [g["scale"] for g in report["generations"]] == [-4.0, 0.0, 4.0]
    assert report["positive_count"] == report["negative_count"] == 2 and report["layer"] == 2
    assert all(len(g["token_ids"]) <= 12 for g in report["generations"])
    from ossgpt.inspect import SteeringVector

    vec = SteeringVector.load(out / "vector.safetensors")
    assert vec.layer == 2 and vec.info["position"] == "mean" and vec.info["positive_count"] == 2
    assert float(vec.vector.norm()) == pytest.approx(report["vector_norm"], rel=1e-5)
    # The gap between the sets' mean projections is the vector's norm (difference of means).
    gap = (sum(report["projections"]["positive"]) / 2 - sum(report["projections"]["negative"]) / 2)
    assert gap == pytest.approx(report["vector_norm"], rel=1e-3)


def test_inspect_help_lists_the_analyses(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("router", "lens", "attention", "steer"))


def test_malformed_line_names_file_and_line(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = data.read_text().splitlines()
    bad.write_text(good[0] + "\n" + '{"messages": "nope"}\n' + good[1] + "\n")
    line = fails(["inspect", "router", "--data", str(bad), "--out", str(tmp_path / "o"), *CPU], capsys)
    assert line.startswith(f"error: {bad}:2: ") and "messages" in line
    # --no-strict skips it, saying which line, and reports it.
    main(["inspect", "router", "--data", str(bad), "--out", str(tmp_path / "o"), "--no-strict",
          "--layers", "0", *CPU])
    assert f"skipped {bad}:2: " in capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "router.json").read_text())
    assert report["conversations"] == 2 and report["skipped_lines"][0].startswith(f"{bad}:2: ")


@pytest.mark.parametrize("args, message", [
    (["inspect", "router", "--layers", "0,9"], "layer 9 does not exist: the model has layers 0..3"),
    (["inspect", "router", "--layers", "0,x"], "--layers wants comma-separated integers"),
    (["inspect", "router", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["inspect", "router", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["inspect", "steer", "--scales", "1,x"], "--scales wants comma-separated numbers"),
    (["inspect", "steer", "--scales", "1,nan"], "--scales wants comma-separated finite numbers"),
    (["inspect", "steer", "--position", "first"], "--position must be one of mean, last"),
    (["inspect", "steer", "--layer", "4"], "layer 4 does not exist"),
    (["inspect", "attention", "--layers", "-1"], "layer -1 does not exist"),
])
def test_bad_options_give_one_line_and_exit_1(args, message, data, tmp_path, capsys):
    name = args[1]
    needed = {"router": ["--data", str(data)], "attention": ["--prompt", "Hi"],
              "steer": ["--positive", str(data), "--negative", str(data), "--max-tokens", "2"]}[name]
    if name == "steer" and "--layer" not in args:
        needed += ["--layer", "0"]
    line = fails(args + needed + ["--out", str(tmp_path / "o"), *CPU], capsys)
    assert message in line, line
