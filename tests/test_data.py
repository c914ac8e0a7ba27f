"""Tests of the synthetic data (ossgpt.data) and the demo tools (ossgpt.demo_tools)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import pytest

from ossgpt.data import (FAMILIES, TEST_SIZE, Example, examples, gold_turn, is_test_key, mixture,
                         prompt_tokens, render_example, score, trained_turns)
from ossgpt.demo_tools import DEMO_TOOLS, UNITS, WEATHER, run_tool
from ossgpt.harmony import parse_reply, render_prompt
from ossgpt.tokenizer import CALL, RETURN, START, get_tokenizer


def take(family: str, split: str = "train", n: int = 30, seed: int = 0) -> list[Example]:
    return list(itertools.islice(examples(family, split, seed), n))


@pytest.fixture(scope="module")
def test_sets() -> dict[str, list[Example]]:
    return {f: list(examples(f, "test", 0)) for f in FAMILIES}


# -- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic(family):
    assert take(family, seed=3) == take(family, seed=3)
    assert take(family, seed=3) != take(family, seed=4)
    assert take(family, "test", 20) == take(family, "test", 20)


def test_mixture_deterministic_and_weighted():
    a = list(itertools.islice(mixture(7), 300))
    assert a == list(itertools.islice(mixture(7), 300))
    counts = {f: sum(ex.family == f for ex in a) for f in FAMILIES}
    assert all(counts.values())
    assert counts["addition"] > counts["smalltalk"]
    only = list(itertools.islice(mixture(7, {"capitals": 1.0}), 20))
    assert {ex.family for ex in only} == {"capitals"}


def test_bad_arguments():
    with pytest.raises(ValueError):
        examples("poetry", "train", 0)
    with pytest.raises(ValueError):
        examples("addition", "valid", 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_test_disjoint(family, test_sets):
    test = test_sets[family]
    assert 0 < len(test) <= TEST_SIZE
    assert len({ex.key for ex in test}) == len(test)
    assert all(is_test_key(ex.key) for ex in test)
    test_keys = {ex.key for ex in test}
    for ex in take(family, n=1500, seed=11):
        assert ex.key not in test_keys and not is_test_key(ex.key)


def test_test_sets_are_full_for_large_families(test_sets):
    for family in ("addition", "subtraction", "strings", "tools", "smalltalk"):
        assert len(test_sets[family]) == TEST_SIZE, family
    # Every capital is memorised from training, so every country has training examples.
    from ossgpt.data.tasks import CAPITALS
    assert len(CAPITALS) >= 60
    seen = {ex.key[2] for ex in take("capitals", n=3000)}
    assert seen == set(CAPITALS)


def test_history_never_holds_test_questions():
    test_questions = {ex.messages[-2]["content"] for f in ("addition", "capitals")
                      for ex in examples(f, "test", 0)}
    multi = [ex for ex in itertools.islice(mixture(5), 3000)
             if sum(m["role"] == "user" for m in ex.messages) > 1]
    assert len(multi) > 100
    for ex in multi:
        start = trained_turns(ex.messages)[0][0]
        for m in ex.messages[:start - 1]:
            assert m["role"] != "user" or m["content"] not in test_questions


def test_arithmetic_reasoning_and_answers():
    for ex in take("addition", n=200) + take("subtraction", n=200):
        a, op, b = ex.messages[-1]["content"].rstrip(".").split(" ")[:3]
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert result >= 0 and ex.expected["answer"] == str(result)
        assert ex.messages[-1]["reasoning"].endswith(f"= {result}.")
        assert 0 <= int(a) <= 999 and 0 <= int(b) <= 999
    r = take("addition", n=1)[0].messages[-1]["reasoning"]
    assert r.startswith("Digits: ") and "Units: " in r and "Digits from left:" in r


def test_contexts_vary():
    exs = list(itertools.islice(mixture(1), 400))
    assert {ex.reasoning_effort for ex in exs} == {"low", "medium", "high"}
    assert len({ex.date for ex in exs}) > 300
    assert any(ex.developer for ex in exs) and any(not ex.developer for ex in exs)
    tools = [ex for ex in exs if ex.family == "tools"]
    assert tools and all(ex.tools == DEMO_TOOLS for ex in tools)
    assert any("tool" not in ex.expected for ex in tools)  # tools declared, answered directly
    no_weather = [ex for ex in take("refusal", n=300) if ex.key[1] == "no_weather"]
    assert no_weather and all(ex.tools is None for ex in no_weather)


# -- rendering -----------------------------------------------------------------------------------


def _sample(family: str, test_sets: dict) -> list[Example]:
    exs = take(family, n=40, seed=2) + test_sets[family][:20]
    if family == "tools":  # make sure each kind of tool turn is there
        exs += [ex for ex in take(family, n=200, seed=9) if ex.key[:2] == ("tools", "weather")][:5]
    return exs


@pytest.mark.parametrize("family", FAMILIES)
def test_render_masks(family, test_sets):
    tok = get_tokenizer()
    assistant = tok.encode("assistant")
    for ex in _sample(family, test_sets):
        tokens, mask = render_example(ex)
        assert len(tokens) == len(mask) and set(mask) <= {0, 1}
        assert tokens[-1] == RETURN and mask[-1] == 1
        turns = trained_turns(ex.messages)
        runs = [(i, j) for i, j in _runs(mask)]
        assert len(runs) == len(turns)
        for (i, j), (start, end) in zip(runs, turns):
            # each turn: its prompt (the chat's rendering) is a prefix, ending <|start|>assistant
            prompt = render_prompt(ex.messages[:start], reasoning_effort=ex.reasoning_effort,
                                   developer=ex.developer, tools=ex.tools, date=ex.date)
            assert tokens[:len(prompt)] == prompt and len(prompt) == i
            assert tokens[i - 2:i] == [START] + assistant
            assert tokens[j - 1] in (RETURN, CALL)
            last = ex.messages[end - 1]
            assert tokens[j - 1] == (CALL if last.get("tool_calls") else RETURN)
            reply = parse_reply(tokens[i:j])
            assert reply.well_formed
            assert reply.reasoning == "\n".join(m["reasoning"] for m in ex.messages[start:end])
            contents = [m.get("content") or "" for m in ex.messages[start:end]]
            assert reply.content == "\n".join(contents)
            assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
                (c["function"]["name"], json.loads(c["function"]["arguments"]))
                for m in ex.messages[start:end] for c in m.get("tool_calls") or []]
        # no assistant stop token and no user/tool text is trained outside the runs
        zero = [t for t, m in zip(tokens, mask) if m == 0]
        assert RETURN not in zero and CALL not in zero
        assert prompt_tokens(ex) == tokens[:runs[0][0]]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def test_multi_turn_history_is_not_trained():
    tok = get_tokenizer()
    ex = next(ex for ex in mixture(4) if sum(m["role"] == "user" for m in ex.messages) > 1)
    tokens, mask = render_example(ex)
    first_answer = next(m for m in ex.messages if m["role"] == "assistant")
    history = tokens[:prompt_tokens(ex).__len__()]
    assert first_answer["content"] in tok.decode(history)          # shown as history ...
    assert first_answer["reasoning"] not in tok.decode(history)    # ... without its analysis
    assert not any(mask[:len(history)])


def test_tool_turns_are_trained_results_are_not():
    tok = get_tokenizer()
    ex = next(ex for ex in examples("tools", "train", 0) if "tool" in ex.expected)
    tokens, mask = render_example(ex)
    trained = tok.decode([t for t, m in zip(tokens, mask) if m])
    untrained = tok.decode([t for t, m in zip(tokens, mask) if not m])
    i = trained_turns(ex.messages)[0][0]
    result = ex.messages[i + 1]["content"]
    assert result in untrained and result not in trained
    assert _call(ex)["arguments"] in trained
    assert ex.messages[i + 2]["content"] in trained


def _call(ex: Example) -> dict:
    """The function of the first tool call of the example's first trained turn."""
    return ex.messages[trained_turns(ex.messages)[0][0]]["tool_calls"][0]["function"]


# -- scoring -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_score_gold_reply(family, test_sets):
    for ex in test_sets[family] + take(family, n=20):
        result = score(ex, parse_reply(gold_turn(ex)))
        assert result["well_formed"] and result["correct"]
        assert result.get("right_tool", True) and ("right_tool" in result) == ("tool" in ex.expected)


def _wrong(ex: Example) -> Example:
    """The example with a wrong first trained turn."""
    ex = copy.deepcopy(ex)
    start, _ = trained_turns(ex.messages)[0]
    turn, exp = ex.messages[start], ex.expected
    if "tool" in exp:
        args = dict(exp["arguments"])
        key = "city" if "city" in args else "value"
        args[key] = "Nowhere" if key == "city" else args[key] + 1
        _call(ex)["arguments"] = json.dumps(args)
    elif exp.get("refusal"):
        turn["content"] = "The answer is 42."
    elif "contains" in exp:
        turn["content"] = "OK."
    elif exp["match"] == "number":
        turn["content"] = f"The answer is {int(exp['answer']) + 1}."
    elif exp["match"] == "list":
        turn["content"] = ", ".join(exp["answer"].split(", ")[::-1])
    else:
        turn["content"] = "I think it is Springfield."
    return ex


@pytest.mark.parametrize("family", FAMILIES)
def test_score_wrong_reply(family, test_sets):
    for ex in test_sets[family][:30]:
        result = score(ex, parse_reply(gold_turn(_wrong(ex))))
        # wrong arguments, right function: the call alone still counts as the right tool
        want = {"well_formed": True, "correct": False} | ({"right_tool": True} if "tool" in ex.expected else {})
        assert result == want, (ex.messages, result)


def test_score_malformed_and_misplaced_replies():
    tok = get_tokenizer()
    ex = take("addition", "test", 1)[0]
    plain = parse_reply(tok.encode(ex.messages[-1]["content"]))  # no harmony markup at all
    assert score(ex, plain)["well_formed"] is False
    tool_ex = next(e for e in examples("tools", "test", 0) if "tool" in e.expected)
    bad = copy.deepcopy(tool_ex)
    _call(bad)["arguments"] = '{"city": '
    assert score(tool_ex, parse_reply(gold_turn(bad))) == {"well_formed": False, "correct": False,
                                                          "right_tool": False}
    # a tool call where an answer is expected is wrong, and an answer where a call is expected
    assert score(ex, parse_reply(gold_turn(tool_ex)))["correct"] is False
    assert score(tool_ex, parse_reply(gold_turn(ex)))["correct"] is False


def test_score_tolerances():
    ex = next(e for e in examples("tools", "test", 0) if e.expected.get("tool") == "get_weather")
    city = ex.expected["arguments"]["city"]
    upper = copy.deepcopy(ex)
    _call(upper)["arguments"] = json.dumps({"city": city.upper()})
    assert score(ex, parse_reply(gold_turn(upper)))["correct"]
    conv = next(e for e in examples("tools", "test", 0)
                if e.expected.get("tool") == "convert_units")
    args = dict(conv.expected["arguments"], value=float(conv.expected["arguments"]["value"]) + 1e-9)
    close = copy.deepcopy(conv)
    _call(close)["arguments"] = json.dumps(args)
    assert score(conv, parse_reply(gold_turn(close)))["correct"]


# -- demo tools ----------------------------------------------------------------------------------


def test_demo_tool_schemas():
    assert [t["function"]["name"] for t in DEMO_TOOLS] == ["get_weather", "convert_units"]
    for tool in DEMO_TOOLS:
        assert tool["type"] == "function"
        fn = tool["function"]
        assert fn["description"] and fn["parameters"]["type"] == "object"
        props = fn["parameters"]["properties"]
        assert set(fn["parameters"]["required"]) <= set(props)
        for p in props.values():
            assert p["type"] in ("string", "number")
            assert set(p.get("enum", [])) <= set(UNITS)
        json.dumps(tool)  # plain JSON
    text = get_tokenizer().decode(render_prompt([{"role": "user", "content": "hi"}],
                                                tools=DEMO_TOOLS, date="2025-01-01"))
    assert "type get_weather = (_: {" in text and "type convert_units" in text
    assert len(WEATHER) >= 40


def test_run_tool_outputs():
    assert json.loads(run_tool("get_weather", '{"city": "Paris"}')) == {
        "city": "Paris", "temperature_c": 18, "condition": "cloudy"}
    assert json.loads(run_tool("get_weather", '{"city": " paris, France"}'))["city"] == "Paris"
    oslo = '{"city": "Oslo"}'
    assert run_tool("get_weather", oslo) == run_tool("get_weather", oslo)

    def conv(v, f, t):
        return json.loads(run_tool("convert_units", json.dumps(
            {"value": v, "from_unit": f, "to_unit": t})))
    assert conv(10, "km", "miles") == {"value": 10, "from_unit": "km", "to_unit": "miles",
                                       "result": 6.21}
    assert conv(100, "celsius", "fahrenheit")["result"] == 212
    assert conv(212, "fahrenheit", "celsius")["result"] == 100
    assert conv(1, "kg", "pounds")["result"] == 2.2
    assert conv(1, "meters", "feet")["result"] == 3.28
    assert conv(3, "miles", "miles")["result"] == 3
    assert conv(5, "kilometers", "mi")["to_unit"] == "miles"  # aliases
    assert math.isclose(conv(10, "feet", "meters")["result"], 3.05)


@pytest.mark.parametrize("name,arguments", [
    ("get_weather", '{"city": "Atlantis"}'), ("get_weather", "{}"), ("get_weather", "not json"),
    ("get_weather", "[1, 2]"), ("get_weather", '{"city": 5}'), ("get_weather", ""),
    ("convert_units", '{"value": 1, "from_unit": "km", "to_unit": "kg"}'),
    ("convert_units", '{"value": 1, "from_unit": "parsec", "to_unit": "km"}'),
    ("convert_units", '{"value": "ten", "from_unit": "km", "to_unit": "miles"}'),
    ("convert_units", '{"value": true, "from_unit": "km", "to_unit": "miles"}'),
    ("convert_units", '{"value": NaN, "from_unit": "km", "to_unit": "miles"}'),
    ("convert_units", '{"value": 1e308, "from_unit": "miles", "to_unit": "km"}'),
    ("convert_units", '{"value": 1}'), ("launch_rockets", "{}"), ("get_weather", None),
])
def test_run_tool_errors_are_json(name, arguments):
    out = json.loads(run_tool(name, arguments))
    assert isinstance(out, dict) and isinstance(out.get("error"), str) and out["error"]


def test_tool_data_uses_run_tool():
    for ex in take("tools", n=60):
        if "tool" not in ex.expected:
            continue
        i = trained_turns(ex.messages)[0][0]  # after any history
        call = ex.messages[i]["tool_calls"][0]["function"]
        assert ex.messages[i + 1]["content"] == run_tool(call["name"], call["arguments"])
        assert all(w.lower() in ex.messages[i + 2]["content"].lower()
                   for w in ex.expected["final_contains"])


def test_gold_turn_is_the_example_itself():
    ex = take("tools", n=1)[0]
    tokens, mask = render_example(ex)
    first = gold_turn(ex)
    start = len(prompt_tokens(ex))
    assert tokens[start:start + len(first)] == first
    assert json.loads(json.dumps(dataclasses.asdict(ex)))  # plain, JSON-serialisable data
