"""ossgpt.eval.grading: answer extraction and graders on right, wrong and malformed answers;
a reply without a final answer scores 0 as "no answer"."""

from __future__ import annotations

import pytest

from ossgpt.eval.backends import Generation, generation_from_tokens
from ossgpt.eval.grading import (extract_integer, extract_letter, grade, parse_verdict,
                                 rubric_score)
from ossgpt.eval.runner import grade_task
from ossgpt.eval.suites import Sample
from ossgpt.tokenizer import get_tokenizer


def sample(grading: str, answer: str, choices=()) -> Sample:
    return Sample("s", [{"role": "user", "content": "q"}], answer, grading, list(choices))


@pytest.mark.parametrize("text,want", [
    ("So the answer is \\boxed{204}.", "204"),
    ("First \\boxed{3}, no wait: \\boxed{\\frac{1}{2} \\to 17}", "17"),
    ("The total is 1,024 apples", "1024"),
    ("Answer: 70. Check: 70 = 7 * 10, so 70", "70"),
    ("no digits at all", None),
])
def test_extract_integer(text: str, want: str | None) -> None:
    assert extract_integer(text) == want


@pytest.mark.parametrize("text,want", [
    ("Answer: C", "C"), ("**Answer:** (b)", "B"), ("The answer is D.", "D"), ("B", "B"),
    ("I think (A) is wrong, so (C)", "C"), ("None of them", None), ("Answer: E", None),
])
def test_extract_letter(text: str, want: str | None) -> None:
    assert extract_letter(text, list("ABCD")) == want


def test_graders_right_wrong_malformed() -> None:
    choice = sample("choice", "B", "ABCD")
    assert grade(choice, "Answer: B").score == 1
    assert grade(choice, "Answer: A").score == 0
    g = grade(choice, "I am not sure.")
    assert (g.score, g.status) == (0, "unparsed")
    boxed = sample("boxed", "42")
    assert grade(boxed, "... \\boxed{42}").score == 1
    assert grade(boxed, "... \\boxed{41}").score == 0
    numeric = sample("numeric", "3.5")
    assert grade(numeric, "It is 3.50 meters").score == 1 and grade(numeric, "4").score == 0
    regex = sample("regex", r"r(ed|ouge)")
    assert grade(regex, "It is red.").score == 1 and grade(regex, "blue").score == 0
    exact = sample("exact", "Paris")
    assert grade(exact, " paris. ").score == 1 and grade(exact, "Lyon").score == 0
    bad = grade(sample("regex", "("), "x")
    assert (bad.score, bad.status) == (0, "error")
    for s in (choice, boxed, numeric, regex, exact):
        g = grade(s, None)
        assert (g.score, g.status, g.answer) == (0, "no answer", None)


def test_reply_without_final_channel_is_no_answer() -> None:
    tok = get_tokenizer()
    # reasoning that names the right answer, then cut off: never graded from the analysis
    tokens = tok.encode("<|channel|>analysis<|message|>The answer is B. Answer: B",
                        allow_special=True)
    g = generation_from_tokens(tokens, "length", None)
    assert g.reasoning.endswith("Answer: B") and g.content == ""
    result = grade_task(sample("choice", "B", "ABCD"), g)
    assert (result.score, result.status) == (0, "no answer")
    # malformed harmony still parses to something, and is graded, never raises
    junk = generation_from_tokens(tok.encode("<|message|><|end|>Answer: B<|start|>",
                                             allow_special=True), "stop", None)
    assert grade_task(sample("choice", "B", "ABCD"), junk).status in ("ok", "no answer")
    failed = grade_task(sample("choice", "B", "ABCD"), Generation(error="HTTP 500: boom"))
    assert (failed.score, failed.status) == (0, "error")


def test_well_formed_reply_is_read_like_the_server() -> None:
    tok = get_tokenizer()
    tokens = tok.encode("<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant"
                        "<|channel|>final<|message|>Answer: B<|return|>", allow_special=True)
    g = generation_from_tokens(tokens, "stop", None)
    assert (g.reasoning, g.content, g.tokens) == ("2+2 is 4.", "Answer: B", len(tokens))
    assert 0 < g.reasoning_tokens < g.tokens
    assert grade_task(sample("choice", "B", "ABCD"), g).score == 1


def test_rubric_verdicts_and_score() -> None:
    assert parse_verdict('```json\n{"explanation": "ok", "criteria_met": true}\n```') is True
    assert parse_verdict('{"criteria_met": false}') is False
    assert parse_verdict("criteria_met: TRUE because") is True
    assert parse_verdict("I cannot tell") is None and parse_verdict(None) is None
    rubrics = [{"criterion": "a", "points": 5}, {"criterion": "b", "points": 5},
               {"criterion": "c", "points": -4}]
    assert rubric_score(rubrics, [True, False, False]) == 0.5
    assert rubric_score(rubrics, [True, False, True]) == pytest.approx(0.1)
    assert rubric_score(rubrics, [False, False, True]) == 0.0          # clipped
    assert rubric_score(rubrics, [True, True, None]) == 1.0            # unreadable: not met
