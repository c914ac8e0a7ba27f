"""ossgpt.eval.suites: each loader on a small file in its published format, written here, and
the errors bad files give (file, line, field)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ossgpt.eval.suites import (DataError, load_aime, load_gpqa, load_healthbench,
                                load_humaneval, load_jsonl, load_mmlu, load_nano, load_suite)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GPQA_HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1",
               "Incorrect Answer 2", "Incorrect Answer 3", "Record ID", "High-level domain"]


def write_gpqa(path: Path, n: int = 6) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(GPQA_HEADER)
        for i in range(n):
            w.writerow([f"old {i}", f"What is {i} + {i}?\nThink, with \"quotes\", commas.",
                        str(2 * i), str(2 * i + 1), str(2 * i + 2), str(2 * i + 3),
                        f"rec{i}", "Physics"])
    return path


def test_gpqa_choices_shuffled_by_seed(tmp_path: Path) -> None:
    path = write_gpqa(tmp_path / "gpqa_diamond.csv")
    a, b, c = load_gpqa(path, seed=0), load_gpqa(path, seed=0), load_gpqa(path, seed=1)
    assert [s.messages for s in a] == [s.messages for s in b]          # stable
    assert [s.answer for s in a] != [s.answer for s in c] or a[0].messages != c[0].messages
    for s in a:
        assert s.id.startswith("rec") and s.grading == "choice" and s.choices == list("ABCD")
        i = int(s.id[3:])
        text = s.messages[0]["content"]
        assert f"{s.answer}) {2 * i}\n" in text + "\n"             # the letter names the answer
        assert "\"quotes\"" in text
    assert len({s.answer for s in load_gpqa(write_gpqa(tmp_path / "g40.csv", 40))}) == 4


def test_gpqa_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2\nq,a,b,c\n")
    with pytest.raises(DataError, match=r"bad.csv:1: no column 'Incorrect Answer 3'"):
        load_gpqa(path)


def test_aime_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "aime25.jsonl", [
        {"problem": "Find $x$ with $x^2=4$, $x>0$.", "answer": "2", "id": "I-1"},
        {"question": "What is 6*7?", "answer": 42}])
    samples = load_aime(path)
    assert [s.answer for s in samples] == ["2", "42"]
    assert samples[0].id == "I-1" and samples[1].id == "line2"
    assert "\\boxed{}" in samples[0].messages[0]["content"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "answer": "2"}, {"problem": "q"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'answer'"):
        load_aime(bad)


def test_mmlu_headerless_with_header_and_jsonl(tmp_path: Path) -> None:
    rows = [["What is 2+2?", "3", "4", "5", "6", "B"], ["Capital of France?", "Rome", "Paris",
                                                          "Oslo", "Bern", "B"]]
    plain = tmp_path / "abstract_algebra_test.csv"         # Hendrycks: no header
    with plain.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    headed = tmp_path / "mmlu.csv"                         # simple-evals: a header
    with headed.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer", "Subject"])
        w.writerows([[str(i)] + r + ["x"] for i, r in enumerate(rows)])
    jsonl = write_jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "Capital of France?", "A": "Rome", "B": "Paris", "C": "Oslo", "D": "Bern",
         "answer": "B"}])
    for path in (plain, headed, jsonl):
        samples = load_mmlu(path)
        assert [s.answer for s in samples] == ["B", "B"]
        assert "B) 4" in samples[0].messages[0]["content"]
    short = tmp_path / "short.csv"
    short.write_text("q,a,b,c\n")
    with pytest.raises(DataError, match=r"short.csv:1: 4 columns"):
        load_mmlu(short)
    wrong = write_jsonl(tmp_path / "w.jsonl",
                        [{"question": "q", "choices": ["a", "b"], "answer": "E"}])
    with pytest.raises(DataError, match=r"w.jsonl:1: field 'answer'"):
        load_mmlu(wrong)


def test_healthbench_jsonl(tmp_path: Path) -> None:
    record = {"prompt_id": "p1", "prompt": [{"role": "user", "content": "I have a headache."}],
              "rubrics": [{"criterion": "Advises rest.", "points": 5, "tags": ["axis:completeness"]},
                          {"criterion": "Recommends surgery.", "points": -3, "tags": []}],
              "example_tags": ["theme:global_health"]}
    samples = load_healthbench(write_jsonl(tmp_path / "hb.jsonl", [record]))
    assert samples[0].id == "p1" and samples[0].grading == "rubric"
    assert samples[0].meta["rubrics"][1]["points"] == -3
    bad = dict(record, rubrics=[{"criterion": "x"}])
    with pytest.raises(DataError, match=r"hb2.jsonl:1: rubrics\[0\]"):
        load_healthbench(write_jsonl(tmp_path / "hb2.jsonl", [bad]))


def test_humaneval_jsonl(tmp_path: Path) -> None:
    record = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
              "canonical_solution": "    return a + b\n",
              "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}
    s = load_humaneval(write_jsonl(tmp_path / "HumanEval.jsonl", [record]))[0]
    assert s.id == "HumanEval/0" and s.meta["entry_point"] == "add"
    assert "def add(a, b)" in s.messages[0]["content"]
    with pytest.raises(DataError, match=r"h.jsonl:1: missing field 'entry_point'"):
        load_humaneval(write_jsonl(tmp_path / "h.jsonl", [{k: v for k, v in record.items()
                                                            if k != "entry_point"}]))


def test_generic_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "2+2?", "answer": "4", "grading": "numeric"},
        {"messages": [{"role": "user", "content": "Say hi"}], "answer": "hi"},
        {"prompt": "Pick", "answer": "C", "grading": "choice"},
        {"prompt": "Color?", "answer": "r(ed|ouge)", "grading": "regex"}])
    samples = load_jsonl(path)
    assert [s.grading for s in samples] == ["numeric", "exact", "choice", "regex"]
    assert samples[2].choices == list("ABCD")
    with pytest.raises(DataError, match=r"g.jsonl:1: field 'grading'"):
        load_jsonl(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "x", "answer": "y",
                                                       "grading": "fuzzy"}]))


def test_nano_suite_is_bundled_and_interleaved() -> None:
    samples = load_nano(per_family=2)
    assert [s.id for s in samples[:3]] == ["addition-0", "subtraction-0", "capitals-0"]
    assert len({s.id for s in samples}) == len(samples) == 14


@pytest.mark.parametrize("content,error", [
    (None, r"nope.jsonl: no such file"),
    ("{\"problem\": \"p\", \"answer\": \"1\"}\n{broken\n", r"x.jsonl:2: not valid JSON"),
    ("[1, 2]\n", r"x.jsonl:1: expected a JSON object"),
    ("\n\n", r"x.jsonl: no records"),
])
def test_bad_files(tmp_path: Path, content: str | None, error: str) -> None:
    name = "nope.jsonl" if content is None else "x.jsonl"
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=error):
        load_suite("aime", str(tmp_path / name))


def test_duplicate_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1", "id": 7},
                                              {"prompt": "b", "answer": "2", "id": 7}])
    with pytest.raises(DataError, match="sample id '7' appears twice"):
        load_suite("jsonl", str(path))
