"""Evaluation data in the formats it is published in, read into `Sample`s.

Each loader reads one format and fails on the first bad record with a DataError naming the
file, the line (or CSV row) and the field, before anything runs. No data set is bundled or
downloaded here except nano's own synthetic tasks (`--suite nano`): users bring their files.

  gpqa        CSV with "Question", "Correct Answer", "Incorrect Answer 1".."3" (the GPQA release);
              the four choices are shuffled by (seed, row), the same every run
  aime        JSONL {"problem"|"question", "answer"}: an integer answer
  mmlu        CSV: Hendrycks' headerless rows (question, A, B, C, D, answer letter) or with a
              header naming those columns (openai/simple-evals' "Question", "A".."D", "Answer");
              or JSONL {"question", "choices": [4] | "A".."D", "answer": letter or index}
  healthbench JSONL {"prompt": [messages], "rubrics": [{"criterion", "points", "tags"}]}
  humaneval   JSONL {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
  jsonl       JSONL {"prompt" or "messages", "answer", "grading"?: exact|regex|numeric|choice,
              "choices"?: [...]} (`--grading` sets the default)
  nano        nano's held-out synthetic tasks (ossgpt/data), bundled
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OssgptError

LETTERS = "ABCDEFGHIJ"
GRADINGS = ("exact", "regex", "numeric", "choice")
SUITES = ("nano", "gpqa", "aime", "mmlu", "healthbench", "humaneval", "jsonl")

# Instructions as openai/gpt-oss's and simple-evals' evals phrase them, so scores compare.
_CHOICE_TEMPLATE = ("{question}\n\n{choices}\n\nAnswer with the letter of the correct choice "
                    "only, e.g. \"Answer: A\".")
_AIME_TEMPLATE = ("{problem}\n\nPlease reason step by step, and put your final answer within "
                  "\\boxed{{}}.")
_HUMANEVAL_TEMPLATE = ("Complete the following Python function. Reply with the whole function "
                       "in a ```python code block.\n\n```python\n{prompt}```")


class DataError(OssgptError):
    """A data file that cannot be read as its format: one line naming file, line and field."""


@dataclass
class Sample:
    """One question: the chat to send, and what grading needs."""
    id: str
    messages: list[dict]
    answer: str | None = None                       # the reference answer
    grading: str = "exact"                          # exact, regex, numeric, choice, boxed,
                                                    # rubric, humaneval, nano
    choices: list[str] = field(default_factory=list)   # letters for choice grading
    meta: dict = field(default_factory=dict)        # rubrics, tests, the nano Example ...


def stable_int(*parts: object) -> int:
    """A 53-bit integer from the parts (sha256): the same in every process and on every
    machine, unlike hash(); 53 bits survive any JSON client as a number."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 11


# -- reading files -----------------------------------------------------------------------------

def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is an
    error naming it."""
    out = []
    with _open(path) as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(value, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got "
                                    f"{type(value).__name__}")
                out.append((n, value))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _field(path: Path, n: int, record: dict, *names: str, kind: type = str):
    """The first of `names` present in the record, of type `kind`."""
    for name in names:
        if name in record:
            value = record[name]
            if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, kind) or (kind is str and not value.strip()):
                raise DataError(f"{path}:{n}: field {name!r} must be a non-empty "
                                f"{kind.__name__}, got {value!r:.60}")
            return value
    raise DataError(f"{path}:{n}: missing field {' or '.join(map(repr, names))}")


def _read_csv(path: Path) -> list[list[str]]:
    with _open(path) as f:
        try:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _choice_sample(sid: str, question: str, options: list[str], correct: int) -> Sample:
    listing = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    return Sample(sid, _user(_CHOICE_TEMPLATE.format(question=question.strip(), choices=listing)),
                  LETTERS[correct], "choice", list(LETTERS[:len(options)]))


# -- the formats -------------------------------------------------------------------------------

def load_gpqa(path: Path, seed: int = 0) -> list[Sample]:
    rows = _read_csv(path)
    header = [h.strip() for h in rows[0]]
    wanted = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
              "Incorrect Answer 3"]
    missing = [w for w in wanted if w not in header]
    if missing:
        raise DataError(f"{path}:1: no column {missing[0]!r} in the header (GPQA's CSV has "
                        f"{', '.join(map(repr, wanted))})")
    col = {w: header.index(w) for w in wanted}
    id_col = header.index("Record ID") if "Record ID" in header else None
    samples = []
    for n, row in enumerate(rows[1:], 2):
        values = {}
        for w in wanted:
            if col[w] >= len(row) or not row[col[w]].strip():
                raise DataError(f"{path}:{n}: empty {w!r}")
            values[w] = row[col[w]].strip()
        sid = row[id_col] if id_col is not None and id_col < len(row) and row[id_col] else f"row{n}"
        options = [values[w] for w in wanted[1:]]
        # A permutation per (seed, question), as gpt-oss's gpqa_eval draws one per example:
        # the correct answer's letter is spread evenly, and a rerun asks the same question.
        order = list(range(4))
        random.Random(stable_int("gpqa", seed, sid)).shuffle(order)
        samples.append(_choice_sample(sid, values["Question"], [options[i] for i in order],
                                      order.index(0)))
    return samples


def load_aime(path: Path) -> list[Sample]:
    samples = []
    for n, r in read_jsonl(path):
        problem = _field(path, n, r, "problem", "question", "Problem", "Question")
        answer = _field(path, n, r, "answer", "Answer").strip()
        try:
            answer = str(int(float(answer)))
        except ValueError:
            raise DataError(f"{path}:{n}: field 'answer' must be an integer, got {answer!r}") from None
        sid = str(r.get("id", r.get("ID", f"line{n}")))
        samples.append(Sample(sid, _user(_AIME_TEMPLATE.format(problem=problem.strip())), answer,
                              "boxed"))
    return samples


def _letter(path: Path, n: int, value, count: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    text = str(value).strip().upper()
    if len(text) == 1 and text in LETTERS[:count]:
        return LETTERS.index(text)
    if text.isdigit() and int(text) < count:
        return int(text)
    raise DataError(f"{path}:{n}: field 'answer' must be a letter A-{LETTERS[count - 1]} or an "
                    f"index, got {value!r:.40}")


def load_mmlu(path: Path) -> list[Sample]:
    if path.suffix.lower() in (".jsonl", ".json"):
        samples = []
        for n, r in read_jsonl(path):
            question = _field(path, n, r, "question", "Question")
            if "choices" in r:
                options = r["choices"]
                if (not isinstance(options, list) or len(options) < 2
                        or not all(isinstance(o, (str, int, float)) for o in options)):
                    raise DataError(f"{path}:{n}: field 'choices' must be a list of 2-10 options")
                options = [str(o) for o in options]
            else:
                options = [_field(path, n, r, k) for k in "ABCD"]
            answer = r.get("answer", r.get("Answer"))
            if answer is None:
                raise DataError(f"{path}:{n}: missing field 'answer'")
            sid = str(r.get("id", f"line{n}"))
            correct = _letter(path, n, answer, len(options))
            samples.append(_choice_sample(sid, question, options, correct))
        return samples
    rows = _read_csv(path)
    header = [h.strip().lower() for h in rows[0]]
    if "question" in header:   # with a header: simple-evals' mmlu.csv and the like
        need = ["question", "a", "b", "c", "d", "answer"]
        missing = [w for w in need if w not in header]
        if missing:
            raise DataError(f"{path}:1: no column {missing[0]!r} in the header (MMLU needs "
                            f"Question, A, B, C, D, Answer)")
        cols, body, first = [header.index(w) for w in need], rows[1:], 2
    else:                      # Hendrycks' release: question, A, B, C, D, answer; no header
        cols, body, first = list(range(6)), rows, 1
    samples = []
    for n, row in enumerate(body, first):
        if max(cols) >= len(row):
            raise DataError(f"{path}:{n}: {len(row)} columns, MMLU rows have 6 (question, A, "
                            f"B, C, D, answer)")
        values = [row[c].strip() for c in cols]
        if not values[0]:
            raise DataError(f"{path}:{n}: empty question")
        samples.append(_choice_sample(f"row{n}", values[0], values[1:5],
                                      _letter(path, n, values[5], 4)))
    return samples


def load_healthbench(path: Path) -> list[Sample]:
    samples = []
    for n, r in read_jsonl(path):
        prompt = r.get("prompt")
        if (not isinstance(prompt, list) or not prompt
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in prompt)):
            raise DataError(f"{path}:{n}: field 'prompt' must be a list of {{role, content}} "
                            f"messages")
        rubrics = r.get("rubrics")
        if not isinstance(rubrics, list) or not rubrics:
            raise DataError(f"{path}:{n}: field 'rubrics' must be a non-empty list")
        for i, item in enumerate(rubrics):
            if (not isinstance(item, dict) or not isinstance(item.get("criterion"), str)
                    or not isinstance(item.get("points"), (int, float))
                    or isinstance(item.get("points"), bool)):
                raise DataError(f"{path}:{n}: rubrics[{i}] needs 'criterion' (text) and "
                                f"'points' (a number)")
        if not any(item["points"] > 0 for item in rubrics):
            raise DataError(f"{path}:{n}: rubrics has no criterion with positive points")
        sid = str(r.get("prompt_id", f"line{n}"))
        samples.append(Sample(sid, [{"role": m["role"], "content": m["content"]} for m in prompt],
                              None, "rubric", meta={"rubrics": rubrics}))
    return samples


def load_humaneval(path: Path) -> list[Sample]:
    samples = []
    for n, r in read_jsonl(path):
        values = {k: _field(path, n, r, k) for k in ("task_id", "prompt", "test", "entry_point")}
        samples.append(Sample(values["task_id"],
                              _user(_HUMANEVAL_TEMPLATE.format(prompt=values["prompt"])), None,
                              "humaneval", meta={k: values[k] for k in ("prompt", "test",
                                                                         "entry_point")}))
    return samples


def load_jsonl(path: Path, grading: str = "exact") -> list[Sample]:
    samples = []
    for n, r in read_jsonl(path):
        if "messages" in r:
            messages = r["messages"]
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) and "role" in m for m in messages)):
                raise DataError(f"{path}:{n}: field 'messages' must be a list of messages")
        else:
            messages = _user(_field(path, n, r, "prompt", "question"))
        answer = _field(path, n, r, "answer")
        kind = r.get("grading", grading)
        if kind not in GRADINGS:
            raise DataError(f"{path}:{n}: field 'grading' must be one of {', '.join(GRADINGS)}, "
                            f"got {kind!r:.40}")
        choices = r.get("choices") or []
        if kind == "choice":
            if not isinstance(choices, list) or not choices:
                choices = list(LETTERS[:4])
            choices = [str(c) for c in choices]
        if kind == "numeric":
            try:
                float(answer.replace(",", ""))
            except ValueError:
                raise DataError(f"{path}:{n}: field 'answer' must be a number for numeric "
                                f"grading, got {answer!r:.40}") from None
        samples.append(Sample(str(r.get("id", f"line{n}")), messages, answer, kind, choices))
    return samples


def load_nano(seed: int = 0, per_family: int = 20) -> list[Sample]:
    """nano's held-out examples (the split `ossgpt eval-nano` measures), `per_family` of each
    family, interleaved so a --limit keeps every family; graded by ossgpt.data.score."""
    from ..data import FAMILIES, examples, render_options, trained_turns

    # islice: the test stream of a small family searches long for its last keys; stop early
    by_family = [list(itertools.islice(examples(f, "test", seed), per_family)) for f in FAMILIES]
    samples = []
    for i in range(per_family):
        for family, exs in zip(FAMILIES, by_family):
            if i < len(exs):
                ex = exs[i]
                options = render_options(ex)
                prompt = ex.messages[:trained_turns(ex.messages)[0][0]]
                if options["developer"]:
                    prompt = [{"role": "developer", "content": options["developer"]}] + prompt
                samples.append(Sample(f"{family}-{i}", prompt, ex.expected.get("answer"), "nano",
                                      meta={"example": ex, "tools": ex.tools, "date": ex.date}))
    return samples


def load_suite(suite: str, data: str | None, seed: int = 0, grading: str = "exact"
               ) -> list[Sample]:
    """The samples of a suite: `data` is the file for every suite but nano."""
    if suite not in SUITES:
        raise DataError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    if suite == "nano":
        samples = load_nano()   # the held-out split of nano's training seed, whatever --seed
    else:
        if not data:
            raise DataError(f"--suite {suite} reads a data file: pass --data FILE")
        path = Path(data).expanduser()
        loaders = {"gpqa": lambda: load_gpqa(path, seed), "aime": lambda: load_aime(path),
                   "mmlu": lambda: load_mmlu(path), "healthbench": lambda: load_healthbench(path),
                   "humaneval": lambda: load_humaneval(path),
                   "jsonl": lambda: load_jsonl(path, grading)}
        samples = loaders[suite]()
    seen: set[str] = set()
    for s in samples:   # ids key resume and seeds: they must be unique
        if s.id in seen:
            raise DataError(f"{data or suite}: sample id {s.id!r} appears twice")
        seen.add(s.id)
    return samples
