"""Seeded generators of synthetic harmony conversations for the nano model.

Each family makes OpenAI-style chats whose assistant turns carry short step-by-step `reasoning`
(harmony's analysis channel) and a checkable `content` (final channel) or `tool_calls`.

Train/test split: every example has a *key* (operand pair, country x phrasing, city x phrasing,
list of items, ...) and a stable hash of the key puts it in train or test, whatever the seed.
Keys combine atoms (countries, cities, words, phrasings) but atoms are never held out: every
token a test example uses also occurs in training (the model keeps only used vocabulary rows,
and capitals must be memorised), so the test measures unseen combinations and phrasings.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from ..demo_tools import DEMO_TOOLS, UNKNOWN_PLACES, WEATHER, sample_exchange
from .builtin_tools import browser_draft, python_draft

FAMILIES = ("addition", "subtraction", "capitals", "strings", "tools", "refusal", "smalltalk")
# Arithmetic is the hardest to learn (carries, borrows, number <-> digit mappings): weight it.
DEFAULT_WEIGHTS = {"addition": 0.25, "subtraction": 0.25, "capitals": 0.12, "strings": 0.12,
                   "tools": 0.14, "refusal": 0.08, "smalltalk": 0.04}
TEST_SIZE = 200
EFFORTS = ("low", "medium", "high")
DEV_INSTRUCTIONS = ("You are a helpful assistant.", "Answer briefly.", "Be concise and accurate.",
                    "You are a friendly demo assistant.")
CAPABILITIES = ("I can add and subtract numbers, name the capitals of countries, work with short "
                "lists and words, and use the demo weather and unit tools when they are enabled.")


# 60 countries and capitals, all of them in training (facts must be memorised).
CAPITALS: dict[str, str] = dict(p.split(":") for p in (
    "France:Paris;Germany:Berlin;Italy:Rome;Spain:Madrid;Portugal:Lisbon;Belgium:Brussels;"
    "Austria:Vienna;Switzerland:Bern;Poland:Warsaw;Sweden:Stockholm;Norway:Oslo;"
    "Denmark:Copenhagen;Finland:Helsinki;Ireland:Dublin;Greece:Athens;Turkey:Ankara;"
    "Russia:Moscow;Ukraine:Kyiv;Hungary:Budapest;Czechia:Prague;Romania:Bucharest;"
    "Bulgaria:Sofia;Croatia:Zagreb;Serbia:Belgrade;Iceland:Reykjavik;Egypt:Cairo;Kenya:Nairobi;"
    "Nigeria:Abuja;Ethiopia:Addis Ababa;Morocco:Rabat;Ghana:Accra;Senegal:Dakar;Tunisia:Tunis;"
    "Algeria:Algiers;Japan:Tokyo;China:Beijing;India:New Delhi;South Korea:Seoul;"
    "Thailand:Bangkok;Vietnam:Hanoi;Indonesia:Jakarta;Malaysia:Kuala Lumpur;Pakistan:Islamabad;"
    "Iran:Tehran;Iraq:Baghdad;Saudi Arabia:Riyadh;Qatar:Doha;Jordan:Amman;Lebanon:Beirut;"
    "Nepal:Kathmandu;Mongolia:Ulaanbaatar;Australia:Canberra;New Zealand:Wellington;"
    "Canada:Ottawa;Mexico:Mexico City;Brazil:Brasilia;Argentina:Buenos Aires;Chile:Santiago;"
    "Peru:Lima;Cuba:Havana").split(";"))
WORDS = ("cat dog sun moon tree book fish bird star rock cup hat ship car lamp rain snow milk egg "
         "apple bread river cloud stone chair door key ring leaf frog").split()
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
SPELL_WORDS = ("banana strawberry apple letter coffee bottle hello balloon rabbit pepper tomato "
               "potato cherry butter paper summer kitten giraffe elephant mississippi orange "
               "pizza garden window yellow").split()

Messages = list[dict]


@dataclass
class Example:
    """One synthetic conversation; `ossgpt.data.render_example` turns it into training tokens.

    `expected` describes the correct FIRST assistant turn after the last user message:
    {"answer": str, "match": "number"|"contains"|"list"}, {"tool": name, "arguments": {...}},
    {"refusal": True} or {"contains": [str, ...]}. Tool examples add "final_contains": what
    the answer after the tool result should mention."""
    family: str
    messages: Messages
    tools: list[dict] | None = None
    reasoning_effort: str = "medium"
    date: str = ""
    developer: str | None = None
    expected: dict = field(default_factory=dict)
    key: tuple = ()  # what the split hashes: (family whose rule applies, item...)
    builtin_tools: tuple[str, ...] = ()  # "browser", "python": declared in the system message


def _ex(key: tuple, messages: Messages, expected: dict, tools: list[dict] | None = None,
        developer: str | None = None) -> Example:
    """A draft example; `_finish` adds the family, date, effort and history."""
    return Example(key[0], messages, tools, developer=developer, expected=expected, key=key)


def _qa(question: str, reasoning: str, content: str) -> Messages:
    return [{"role": "user", "content": question},
            {"role": "assistant", "reasoning": reasoning, "content": content}]


# -- arithmetic ----------------------------------------------------------------------------------
# o200k splits digit runs into chunks of up to 3 ("1998" -> "199" "8") and a space before a
# number is its own token, so "348" is ONE token the model cannot see inside. The reasoning first
# spells each operand as single-digit tokens, zero-padded to a common width ("75 is 0 7 5"), then
# works one column at a time on single digits, then reassembles the answer from its digits.

_COLUMNS = ("Units", "Tens", "Hundreds")
_ADD_Q = ("What is {a} + {b}?|Compute {a} plus {b}.|{a}+{b}=?|What's {a} plus {b}?|"
          "Add {a} and {b}.|Calculate {a} + {b}|{a} + {b}|What is the sum of {a} and {b}?|"
          "how much is {a}+{b}|Please work out {a} + {b}.").split("|")
_SUB_Q = ("What is {a} - {b}?|Compute {a} minus {b}.|{a}-{b}=?|What's {a} minus {b}?|"
          "Subtract {b} from {a}.|Calculate {a} - {b}|{a} - {b}|"
          "What is the difference between {a} and {b}?|how much is {a}-{b}|"
          "Please work out {a} - {b}.").split("|")


def _operand(rng: random.Random) -> int:
    digits = rng.choices((1, 2, 3), (0.1, 0.2, 0.7))[0]
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def column_reasoning(a: int, b: int, op: str) -> str:
    """Worked column arithmetic, units first, for `a + b` or `a - b` (a >= b), e.g.
    'Digits: 348 is 3 4 8, 75 is 0 7 5. Units: 8 + 5 = 13, write 3 carry 1. Tens: 4 + 7 + 1
    = 12, write 2 carry 1. Hundreds: 3 + 0 + 1 = 4, write 4. Digits from left: 4 2 3.
    So 348 + 75 = 423.'"""
    w = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(w), str(b).zfill(w)
    steps = [f"Digits: {a} is {' '.join(da)}, {b} is {' '.join(db)}."]
    out, carry = [], 0  # carry: the carry of addition or the borrow of subtraction
    for i in range(w):
        x, y = int(da[-1 - i]), int(db[-1 - i])
        expr = f"{x} {op} {y}" + (f" {op} 1" if carry else "")
        if op == "+":
            s = x + y + carry
            carry, d = divmod(s, 10)
            step = f"{expr} = {s}, write {d}" + (" carry 1." if carry else ".")
        elif x - y - carry < 0:
            d, carry = 10 + x - y - carry, 1
            step = f"{expr} is negative, borrow: 1{expr} = {d}, write {d} borrow 1."
        else:
            d, carry = x - y - carry, 0
            step = f"{expr} = {d}, write {d}."
        out.append(d)
        steps.append(f"{_COLUMNS[i]}: {step}")
    if carry and op == "+":
        out.append(1)
        steps.append("The last carry 1 is the leading digit.")
    result = a + b if op == "+" else a - b
    steps.append(f"Digits from left: {' '.join(map(str, out[::-1]))}. So {a} {op} {b} = {result}.")
    return " ".join(steps)


def _arithmetic(rng: random.Random, op: str) -> Example:
    a, b = _operand(rng), _operand(rng)
    if op == "-":
        a, b = max(a, b), min(a, b)  # non-negative results only
    result = a + b if op == "+" else a - b
    q = rng.choice(_ADD_Q if op == "+" else _SUB_Q).format(a=a, b=b)
    # a + b and b + a share a key: the held-out pair is held out in both orders.
    key = ("addition", min(a, b), max(a, b)) if op == "+" else ("subtraction", a, b)
    return _ex(key, _qa(q, column_reasoning(a, b, op), f"{a} {op} {b} = {result}."),
               {"answer": str(result), "match": "number"})


_addition = functools.partial(_arithmetic, op="+")
_subtraction = functools.partial(_arithmetic, op="-")


# -- capitals ------------------------------------------------------------------------------------
_CAP_Q = ("What is the capital of {c}?|What's the capital of {c}?|"
          "Which city is the capital of {c}?|Name the capital of {c}.|capital of {c}?|"
          "Tell me the capital city of {c}.|What city is the capital of {c}?|"
          "Do you know the capital of {c}?|In {c}, which city is the capital?|"
          "I'm planning a trip to {c}. What is its capital?|"
          "Which city serves as the capital of {c}?|what is the capital city of {c}").split("|")
_CAP_REV = ("{k} is the capital of which country?|Which country has {k} as its capital?|"
            "Of which country is {k} the capital?|{k} is the capital of what country?").split("|")


def _capitals(rng: random.Random) -> Example:
    country = rng.choice(list(CAPITALS))
    cap = CAPITALS[country]
    if rng.random() < 0.75:
        t = rng.randrange(len(_CAP_Q))
        msgs = _qa(_CAP_Q[t].format(c=country),
                   f"The user asks for the capital of {country}. I remember: the capital of "
                   f"{country} is {cap}.", f"The capital of {country} is {cap}.")
        return _ex(("capitals", "cap", country, t), msgs, {"answer": cap, "match": "contains"})
    t = rng.randrange(len(_CAP_REV))
    msgs = _qa(_CAP_REV[t].format(k=cap),
               f"The user asks which country has {cap} as its capital. I remember: {cap} is the "
               f"capital of {country}.", f"{cap} is the capital of {country}.")
    return _ex(("capitals", "rev", country, t), msgs, {"answer": country, "match": "contains"})


# -- strings -------------------------------------------------------------------------------------
_REV_Q = ("Reverse this list: {l}.|Reverse the order of: {l}|Please reverse: {l}|"
          "Write these in reverse order: {l}.|What is {l} backwards?").split("|")
_CNT_Q = ("How many items are in this list: {l}?|Count the items: {l}.|"
          "How many things are in: {l}?|Count these: {l}").split("|")
_LET_Q = ("How many times does the letter {x} appear in {w}?|How many {x}'s are in {w}?|"
          "Count the letter {x} in the word {w}.|"
          "In the word {w}, how many times does {x} occur?").split("|")


def _strings(rng: random.Random) -> Example:
    kind = rng.choice(("reverse", "count", "letter"))
    if kind == "letter":
        word = rng.choice(SPELL_WORDS)
        x = rng.choice(word) if rng.random() < 0.7 else rng.choice(LETTERS)
        steps, n = [], 0
        for ch in word:  # one letter per step with a running count: no hidden counting
            n += ch == x
            steps.append(f"{ch} yes {n}" if ch == x else f"{ch} no")
        times = "time" if n == 1 else "times"
        msgs = _qa(rng.choice(_LET_Q).format(x=x, w=word),
                   f"Spell {word}: {', '.join(word)}. Check each letter for {x}: "
                   f"{', '.join(steps)}. So {x} appears {n} {times}.",
                   f"The letter {x} appears {n} {times} in {word}.")
        return _ex(("strings", "letter", word, x), msgs, {"answer": str(n), "match": "number"})
    items = rng.sample(WORDS if rng.random() < 0.75 else LETTERS, rng.randint(3, 6))
    listing = ", ".join(items)
    # Numbering the items turns reversing and counting into look-ups by position.
    numbered = " ".join(f"{i + 1} {w}." for i, w in enumerate(items))
    if kind == "reverse":
        back = ", ".join(items[::-1])
        steps = " ".join(f"{i + 1} {items[i]}." for i in reversed(range(len(items))))
        msgs = _qa(rng.choice(_REV_Q).format(l=listing),
                   f"Number the items: {numbered} Read them from last to first: {steps} "
                   f"Reversed: {back}.", f"Reversed: {back}.")
        return _ex(("strings", "reverse", tuple(items)), msgs, {"answer": back, "match": "list"})
    msgs = _qa(rng.choice(_CNT_Q).format(l=listing),
               f"Number the items: {numbered} The last number is {len(items)}.",
               f"There are {len(items)} items.")
    return _ex(("strings", "count", tuple(items)), msgs,
               {"answer": str(len(items)), "match": "number"})


# -- tools ---------------------------------------------------------------------------------------
def _tools(rng: random.Random) -> Example:
    dev = rng.choice(DEV_INSTRUCTIONS) if rng.random() < 0.3 else None
    if rng.random() < 0.12:  # tools declared, but the question needs none: answer directly
        inner = rng.choice(_HISTORY)(rng)
        turn = inner.messages[-1]
        turn["reasoning"] = "No tool is needed for this. " + turn["reasoning"]
        # The key keeps the question's own family, hence its split: a held-out capitals or
        # arithmetic question never turns up in training with tools declared.
        return _ex(inner.key, inner.messages, inner.expected, DEMO_TOOLS, dev)
    key, msgs, exp = sample_exchange(rng)
    return _ex(("tools",) + key, msgs, exp, DEMO_TOOLS, dev)


# -- refusal and small talk ----------------------------------------------------------------------
_NO_TOOLS = "no weather or unit tools are available right now."
# category: ("|"-separated question templates, fillers for {x}, reasoning, answer)
_REFUSALS: dict[str, tuple[str, ...]] = {
    "future": ("Who won the {x} World Cup?|Who will win the election in {x}?|What will the weather "
               "be like in {x}?", "2030|2034|2042|2050", "This asks about events after my "
               "knowledge cutoff.", "I don't know. I have no knowledge of those events."),
    "creative": ("Write a poem about {x}.|Tell me a story about {x}.|Write an essay on {x}.|"
                 "Can you write a song about {x}?",
                 "the sea|love|cats|the moon|autumn|a robot|friendship",
                 "This asks for creative writing, which I cannot do.",
                 "Sorry, I can't help with that. " + CAPABILITIES),
    "personal": ("What is my {x}?|Do you know my {x}?|Can you tell me my {x}?",
                 "name|age|address|favorite color|phone number|password", "This asks for personal "
                 "details about the user, which I do not have.",
                 "I don't know that. I can't know personal details about you."),
    "knowledge": ("What is the population of {x}?|Who is the president of {x}?|What language do "
                  "people speak in {x}?|What is the history of {x}?", "|".join(list(CAPITALS)[:20]),
                  "This is not about a capital, and I only know capitals.",
                  "I don't know. I only know the capitals of countries, not other facts."),
    "math": ("What is {x}?|Compute {x}.|Can you calculate {x}?", "12 times 34|144 divided by 12|"
             "the square root of 81|2 to the power of 10|1234 + 5678|9876 - 5432|7 * 8|100 / 4",
             "I can only add and subtract numbers below 1000, and this is something else.",
             "Sorry, I can't do that. I can only add and subtract numbers below 1000."),
    "fake_capital": ("What is the capital of {x}?|Which city is the capital of {x}?",
                     "|".join(UNKNOWN_PLACES), "I do not know a country with that name.",
                     "I don't know. I don't know of a country with that name."),
    "no_weather": ("What's the weather in {x}?|Is it raining in {x} right now?|How warm is it in "
                   "{x} today?", "|".join(list(WEATHER)[:12]),
                   "This needs the weather tool, and no tools are declared.",
                   "Sorry, I can't check the weather: " + _NO_TOOLS),
    "no_convert": ("Convert {x}.|Can you convert {x}?|How much is {x}?", "10 km to miles|5 kg to "
                   "pounds|30 celsius to fahrenheit|100 feet to meters", "This needs the unit "
                   "tool, and no tools are declared.",
                   "Sorry, I can't convert units: " + _NO_TOOLS),
}


def _refusal(rng: random.Random) -> Example:
    cat = rng.choice(list(_REFUSALS))
    templates, fillers, reasoning, answer = _REFUSALS[cat]
    templates = templates.split("|")
    t, x = rng.randrange(len(templates)), rng.choice(fillers.split("|"))
    msgs = _qa(templates[t].format(x=x), reasoning + " I should say so briefly.", answer)
    # Sometimes with tools declared (never where the point is their absence): out-of-domain
    # questions must not be turned into tool calls.
    tools = DEMO_TOOLS if not cat.startswith("no_") and rng.random() < 0.2 else None
    return _ex(("refusal", cat, t, x), msgs, {"refusal": True}, tools)


# (questions, answer, words the answer must contain); None: the date, from the system message.
_SMALLTALK: tuple[tuple[str, str | None, list[str]], ...] = (
    ("Hi|Hello!|Hey there|Good morning!|hello", "Hello! How can I help you today?", ["help"]),
    ("Thanks!|Thank you.|thanks a lot", "You're welcome!", ["welcome"]),
    ("Who are you?|What are you?|Tell me about yourself.",
     "I'm a small demo assistant. " + CAPABILITIES, ["demo"]),
    ("What can you do?|How can you help me?|What are you good at?", CAPABILITIES, ["add"]),
    ("What is today's date?|What's the date today?|What day is it today?", None, []),
)


def _smalltalk(rng: random.Random) -> Example:
    k = rng.randrange(len(_SMALLTALK))
    questions, answer, contains = _SMALLTALK[k]
    questions = questions.split("|")
    t = rng.randrange(len(questions))
    day = _random_date(rng)
    reasoning = "Small talk. A short friendly answer is enough."
    if answer is None:
        reasoning = "The user asks for the date. The system message gives the current date."
        answer, contains = f"Today's date is {day}.", [day]
    # The date is part of the key: few phrasings, so the test holds out (phrasing, date) pairs
    # rather than phrasings, whose words would then never be trained.
    ex = _ex(("smalltalk", k, t, day), _qa(questions[t], reasoning, answer), {"contains": contains})
    ex.date = day
    return ex


# -- multiplication: never in nano's mixture, the new skill of the fine-tuning demo ---------------
_MUL_Q = ("What is {a} times {b}?|{a} times {b}?|Compute {a} times {b}.|How much is {a} times {b}?|"
          "What's {a} times {b}?|Calculate {a} times {b}|Multiply {a} by {b}.|"
          "What is {a} multiplied by {b}?|{a} x {b} = ?|Please work out {a} times {b}.").split("|")


def _multiplication(rng: random.Random) -> Example:
    """Single-digit products: a fact table to memorise, with held-out phrasings (as capitals)."""
    a, b, t = rng.randint(2, 9), rng.randint(2, 9), rng.randrange(len(_MUL_Q))
    msgs = _qa(_MUL_Q[t].format(a=a, b=b),
               f"The user asks for {a} times {b}. I remember: {a} times {b} is {a * b}.",
               f"{a} times {b} = {a * b}.")
    return _ex(("multiplication", a, b, t), msgs, {"answer": str(a * b), "match": "number"})


# -- local time: a tool nano never saw, whose name it cannot write (the tool fine-tuning demo) -----
LOCAL_TIME_TOOL = {"type": "function", "function": {
    "name": "get_local_time",
    "description": "Get the current local time in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "The city, e.g. Tokyo"}}},
}}
_TIME_Q = ("What time is it in {c}?|What's the local time in {c}?|Tell me the time in {c}.|"
           "Current time in {c}?|Do you know what time it is in {c}?|time in {c}|"
           "What is the time in {c} right now?|Can you check the local time in {c}?").split("|")


def _local_time(rng: random.Random) -> Example:
    """Call get_local_time for the city asked about (the demo tools are often offered beside
    it, so the right one must be chosen), then report the time. Held out: city x phrasing."""
    city, t = rng.choice(list(WEATHER)), rng.randrange(len(_TIME_Q))
    clock = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
    call = {"id": "call_0", "type": "function", "function": {
        "name": "get_local_time", "arguments": json.dumps({"city": city})}}
    msgs = [{"role": "user", "content": _TIME_Q[t].format(c=city)},
            {"role": "assistant", "tool_calls": [call], "reasoning":
             f"The user asks for the local time in {city}. I will call get_local_time with city {city}."},
            {"role": "tool", "tool_call_id": "call_0", "name": "get_local_time",
             "content": json.dumps({"city": city, "local_time": clock})},
            {"role": "assistant", "reasoning": f"The tool says it is {clock} in {city}.",
             "content": f"It is {clock} in {city}."}]
    tools = [LOCAL_TIME_TOOL] + (DEMO_TOOLS if rng.random() < 0.5 else [])
    return _ex(("local_time", city, t), msgs,
               {"tool": "get_local_time", "arguments": {"city": city}, "final_contains": [clock]},
               tools)


# -- built-in tools: browser and python (ossgpt/data/builtin_tools.py), never in nano's mixture ----
def _builtin(draft: Callable[[random.Random], tuple]) -> Callable[[random.Random], Example]:
    def make(rng: random.Random) -> Example:
        key, msgs, expected, builtin = draft(rng)
        ex = _ex(key, msgs, expected)
        ex.builtin_tools = builtin
        return ex
    return make


_browser, _python = _builtin(browser_draft), _builtin(python_draft)


def chat_record(ex: Example) -> dict:
    """An example as a line of chat fine-tuning data (`ossgpt finetune --data`)."""
    dev = [{"role": "developer", "content": ex.developer}] if ex.developer else []
    record = {"messages": dev + ex.messages, "reasoning_effort": ex.reasoning_effort,
              "date": ex.date}
    if ex.tools:
        record["tools"] = ex.tools
    if ex.builtin_tools:
        record["builtin_tools"] = list(ex.builtin_tools)
    return record


# -- splits and streams --------------------------------------------------------------------------
_GENERATORS: dict[str, tuple[Callable[[random.Random], Example], float]] = {
    # family: (generator, share of keys held out for test)
    "addition": (_addition, 0.1), "subtraction": (_subtraction, 0.1), "capitals": (_capitals, 0.2),
    "strings": (_strings, 0.1), "tools": (_tools, 0.15), "refusal": (_refusal, 0.2),
    "smalltalk": (_smalltalk, 0.2), "multiplication": (_multiplication, 0.2),
    "local_time": (_local_time, 0.2), "browser": (_browser, 0.2), "python": (_python, 0.1),
}
# Questions for earlier exchanges of multi-turn chats, and for the tools family's direct answers.
_HISTORY = (_addition, _subtraction, _capitals, _strings)


def is_test_key(key: tuple) -> bool:
    """Whether an example's key belongs to the test split: a stable md5 hash (not the salted
    hash()) against the share held out by the family that `key[0]` names; seed-independent."""
    h = int(hashlib.md5(repr(key).encode()).hexdigest()[:12], 16) / 16 ** 12
    return h < _GENERATORS[key[0]][1]


def _random_date(rng: random.Random) -> str:
    # Dates over 13 years, so the model copes with whatever date `ossgpt chat` renders (today).
    day = datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randrange(13 * 365))
    return day.isoformat()


def _finish(family: str, ex: Example, rng: random.Random) -> Example:
    """Add the context: date, effort, developer instructions, sometimes earlier exchanges."""
    day = ex.date or _random_date(rng)
    if not ex.tools:
        ex.developer = rng.choice(DEV_INSTRUCTIONS) if rng.random() < 0.2 else None
    history: Messages = []
    for _ in range(rng.choices((0, 1, 2), (0.85, 0.1, 0.05))[0]):
        while is_test_key((h := rng.choice(_HISTORY)(rng)).key):
            pass  # history is trained on too, so it must never hold a test question
        history += h.messages
    ex.family, ex.messages, ex.date = family, history + ex.messages, day
    ex.reasoning_effort = rng.choice(EFFORTS)
    return ex


def examples(family: str, split: Literal["train", "test"] = "train",
             seed: int = 0) -> Iterator[Example]:
    """Examples of one family: endless for "train"; for "test" a fixed list of up to
    TEST_SIZE examples with distinct keys (fewer where a family has fewer test keys)."""
    if family not in _GENERATORS or split not in ("train", "test"):
        raise ValueError(f"unknown family {family!r} or split {split!r}; families: {FAMILIES}")
    return _stream(family, split, seed)


def _stream(family: str, split: str, seed: int) -> Iterator[Example]:
    gen = _GENERATORS[family][0]
    rng = random.Random(f"{family}/{split}/{seed}")
    if split == "train":
        while True:
            if not is_test_key((ex := gen(rng)).key):
                yield _finish(family, ex, rng)
    seen: set[tuple] = set()
    for _ in range(TEST_SIZE * 200):  # bounded: small families run out of test keys
        ex = gen(rng)
        if ex.key not in seen and is_test_key(ex.key):
            seen.add(ex.key)
            yield _finish(family, ex, rng)
            if len(seen) == TEST_SIZE:
                return


def mixture(seed: int = 0, weights: dict[str, float] | None = None) -> Iterator[Example]:
    """Endless training examples, families drawn at random in proportion to `weights`."""
    weights = dict(weights or DEFAULT_WEIGHTS)
    names = [f for f in weights if weights[f] > 0]
    streams = {f: examples(f, "train", seed) for f in names}
    rng = random.Random(f"mixture/{seed}")
    while True:
        yield next(streams[rng.choices(names, [weights[f] for f in names])[0]])

