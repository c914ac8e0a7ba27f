"""Answer extraction and graders: a reply (reasoning + final answer) -> (answer, score, status).

Only the final channel is graded: reasoning is the model's scratchpad, and an answer that
appears only there was never given. A reply without a final answer (cut by --max-tokens, or
malformed) scores 0 with status "no answer"; a final answer the grader cannot read (no letter,
no number) scores 0 with status "unparsed". Neither stops the run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .suites import Sample

OK, NO_ANSWER, UNPARSED, ERROR = "ok", "no answer", "unparsed", "error"


@dataclass
class Grade:
    answer: str | None     # what was extracted from the final answer
    score: float           # 0..1
    status: str            # ok | no answer | unparsed | error
    detail: dict | None = None


# -- extraction --------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


_INT = re.compile(r"-?\d[\d,]*")


def last_integer(text: str) -> str | None:
    found = _INT.findall(text)
    return str(int(found[-1].replace(",", ""))) if found else None


def extract_integer(text: str) -> str | None:
    """AIME: the last \\boxed{} holding an integer, else the last integer of the answer."""
    boxed = last_boxed(text)
    if boxed is not None:
        value = last_integer(boxed)
        if value is not None:
            return value
    return last_integer(text)


def extract_letter(text: str, letters: list[str]) -> str | None:
    """A multiple-choice letter: "Answer: X" (the simple-evals pattern, markdown tolerated)
    first, then a lone letter, then a letter in parentheses, last occurrence winning."""
    allowed = "".join(re.escape(x) for x in letters)
    for pattern in (rf"(?i)answer[\s*_]*(?:is)?[\s*_]*[:：]?[\s*_(\[]*([{allowed}])\b",
                    rf"^\s*[*_(\[]*([{allowed}])[)\].:*_]*\s*$",
                    rf"\(([{allowed}])\)",
                    rf"\b([{allowed}])\)"):
        found = re.findall(pattern, text, flags=re.MULTILINE)
        if found:
            return found[-1].upper()
    return None


def extract_number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text.replace(",", ""))
    return float(found[-1]) if found else None


def extract_code(text: str) -> str:
    """The first ```python block (else any fenced block, else the whole answer)."""
    for pattern in (r"```(?:python|py)[ \t]*\n(.*?)```", r"```[^\n]*\n(.*?)```"):
        match = re.search(pattern, text, re.DOTALL)
        if match:
            return match.group(1)
    return text


# -- graders -----------------------------------------------------------------------------------

def grade(sample: Sample, content: str | None) -> Grade:
    """Grade a final answer for every kind but rubric and humaneval (grade_rubric,
    sandbox.grade_humaneval) and nano (grade_nano, which needs the parsed reply)."""
    if content is None or not content.strip():
        return Grade(None, 0.0, NO_ANSWER)
    kind = sample.grading
    if kind == "choice":
        letter = extract_letter(content, sample.choices)
        return (Grade(None, 0.0, UNPARSED) if letter is None
                else Grade(letter, float(letter == sample.answer.upper()), OK))
    if kind == "boxed":
        value = extract_integer(content)
        return (Grade(None, 0.0, UNPARSED) if value is None
                else Grade(value, float(value == sample.answer), OK))
    if kind == "numeric":
        value = extract_number(content)
        if value is None:
            return Grade(None, 0.0, UNPARSED)
        want = float(sample.answer.replace(",", ""))
        return Grade(f"{value:g}", float(math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-9)), OK)
    if kind == "regex":
        try:
            hit = re.search(sample.answer, content)
        except re.error:
            return Grade(None, 0.0, ERROR, {"error": f"bad regex {sample.answer!r}"})
        return Grade(hit.group(0) if hit else None, float(hit is not None), OK)
    if kind == "exact":
        answer = content.strip()
        return Grade(answer, float(_normal(answer) == _normal(sample.answer)), OK)
    raise ValueError(f"no grader for {kind!r}")


def _normal(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def grade_nano(sample: Sample, reply) -> Grade:
    """nano's own scoring (ossgpt.data.score) of the parsed reply: the check `ossgpt
    eval-nano` makes, so the two agree."""
    from ..data import score

    result = score(sample.meta["example"], reply)
    answer = reply.content or ("; ".join(f"{c.name}({c.arguments})" for c in reply.tool_calls)
                               or None)
    if answer is None:
        return Grade(None, 0.0, NO_ANSWER)
    return Grade(answer, float(result["correct"]), OK, {"well_formed": result["well_formed"]})


# -- HealthBench rubrics -----------------------------------------------------------------------
# The grader prompt of openai/simple-evals' healthbench_eval.py (GRADER_TEMPLATE), shortened:
# one rubric item per grader call, a JSON verdict back.
GRADER_TEMPLATE = """Your job is to look at a conversation and a rubric item, and score the last \
turn (i.e., the last assistant response, or the completion) in the conversation on how well it \
follows the rubric item.

# Conversation
<<conversation>>

# Rubric item
<<rubric_item>>

# Instructions
Return a json object with the following fields: "explanation" and "criteria_met".
- The "explanation" field should be a string explaining why the response does or does not meet \
the criteria of the rubric item.
- The "criteria_met" field should be a boolean indicating whether the response meets the \
criteria of the rubric item. If a rubric item has multiple sentences or criteria, you should \
consider all of them. If any of the criteria is not met, the answer should be false. Only return \
true if all of the criteria are met.
- One important exception: if a criteria says "such as", "for example", or "including", the \
response does not have to include all of the examples listed to meet the criteria.

Return just the json object in markdown format. Do not include any other text in the response."""


def grader_messages(conversation: list[dict], answer: str, item: dict) -> list[dict]:
    turns = conversation + [{"role": "assistant", "content": answer}]
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)
    rubric = f"[{item['points']}] {item['criterion']}"
    prompt = GRADER_TEMPLATE.replace("<<conversation>>", text).replace("<<rubric_item>>", rubric)
    return [{"role": "user", "content": prompt}]


def parse_verdict(text: str | None) -> bool | None:
    """criteria_met from the grader's reply (a JSON object, maybe in a code fence); None when
    there is none to read."""
    if not text:
        return None
    candidates = [extract_code(text), text]
    candidates += re.findall(r"\{.*?\}", text, re.DOTALL)
    for c in candidates:
        try:
            value = json.loads(c.strip())
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("criteria_met"), bool):
            return value["criteria_met"]
    match = re.search(r'"?criteria_met"?\s*:\s*(true|false)', text, re.IGNORECASE)
    return None if match is None else match.group(1).lower() == "true"


def rubric_score(rubrics: list[dict], met: list[bool | None]) -> float:
    """simple-evals' calculate_score: points of the met items (negative ones subtract) over
    the positive points possible; clipped to [0, 1] per sample here, so a sample's share of the
    mean is bounded (simple-evals clips the mean)."""
    possible = sum(item["points"] for item in rubrics if item["points"] > 0)
    achieved = sum(item["points"] for item, ok in zip(rubrics, met) if ok)
    return min(1.0, max(0.0, achieved / possible))
