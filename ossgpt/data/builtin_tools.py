"""Synthetic conversations with gpt-oss's built-in tools, for teaching nano to use them.

- `browser`: a question about a fictional town, gadget or person that only the bundled corpus
  (ossgpt/assets/corpus, written by `write_corpus` from `CORPUS`) answers. The assistant searches
  (analysis channel, as gpt-oss calls the browser), opens the right result and answers with the
  fact and a `【cursor†Lx-Ly】` citation of its line. Key: (entity, attribute, phrasing).
- `python`: a computation nano cannot do in its head (a product of 3-4 digit numbers, a sum,
  a sort, the number of digits of a power); the assistant runs one line of code and states the
  printed result. Key: the operands. Every operand is a number: nano copies numbers from the
  question into its code, but not a run of words (the length of a phrase, an earlier kind, stayed
  at 0%: `benchmarks/finetune_nano_tools.py --copy-probe` measures it).

Tool outputs are what the real tools return: `BrowserTool` over the bundled corpus and
`PythonTool`, run while generating (both take well under a millisecond per call once started).
Generators return drafts (key, messages, expected, builtin_tools); tasks.py makes them Examples.
"""

from __future__ import annotations

import atexit
import functools
import json
import random
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"

# -- the corpus ----------------------------------------------------------------------------------
# kind: (folder, intro line, attributes (label, question noun, unit/suffix)). All facts are
# invented, so nano can only know them by reading the page.
_KINDS: dict[str, tuple[str, str, tuple[tuple[str, str, str], ...]]] = {
    "town": ("towns", "{e} is a small town in the fictional land of Orvane.",
             (("Population", "population", " people"), ("Founded", "founding year", ""),
              ("River", "river", ""), ("Mayor", "mayor", ""))),
    "gadget": ("gadgets", "The {e} is a fictional gadget sold in Orvane.",
               (("Price", "price", " dollars"), ("Weight", "weight", " grams"),
                ("Maker", "maker", ""), ("Released", "release year", ""))),
    "person": ("people", "{e} is a fictional person from Orvane.",
               (("Born", "birth year", ""), ("Job", "job", ""), ("Hometown", "hometown", ""),
                ("Pet", "pet", ""))),
}
_NAMES = {
    "town": "Brindlewick Quellmoor Tamsford Oskarvale Pellridge Wrenholt Dunmarrow Caskadel "
            "Fennimore Hollowby".split(),
    "gadget": "Zorvik Radio|Tellune Lamp|Brasko Kettle|Quindle Watch|Morrow Camera|Plinth Fan|"
              "Vesta Scale|Orbin Drill|Kesh Heater|Lumo Clock".split("|"),
    "person": "Ida Penrose|Tobin Marsh|Elsa Varrow|Gideon Pike|Maren Holt|Oswin Crane|"
              "Talia Brook|Rufus Dane|Nell Quarry|Silas Fenwick".split("|"),
}
_RIVERS = "Sallow Mire Tarn Wend Brack Olle Fennet Corrie".split()
_MAKERS = "Tellow Works|Brightforge|Kessel and Sons|Orvane Tools|Quill Labs|Marrow Company".split("|")
_JOBS = "baker|sailor|clockmaker|teacher|painter|miller|beekeeper|librarian|potter|glassblower".split("|")
_PETS = "a grey cat|a small dog|a parrot|a tortoise|two goldfish|a rabbit|a goat|a hedgehog".split("|")


def _values(kind: str, rng: random.Random) -> list[str]:
    """The four facts of one entity, in the order of its kind's attributes."""
    if kind == "town":
        return [str(rng.randint(1200, 9800)), str(rng.randint(1650, 1890)), "the " + rng.choice(_RIVERS),
                rng.choice(_NAMES["person"]).split()[0] + " " + rng.choice(("Ashby", "Corr", "Lind", "Vale"))]
    if kind == "gadget":
        return [str(rng.randint(12, 480)), str(rng.randint(150, 2900)), rng.choice(_MAKERS),
                str(rng.randint(2004, 2023))]
    return [str(rng.randint(1930, 2001)), rng.choice(_JOBS), rng.choice(_NAMES["town"]),
            rng.choice(_PETS)]


@functools.cache
def entities() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(kind, name, facts) of every corpus entry; seeded, so the corpus never changes."""
    rng = random.Random("ossgpt-corpus")
    return tuple((kind, name, tuple(_values(kind, rng))) for kind in _KINDS for name in _NAMES[kind])


def corpus_files() -> dict[str, str]:
    """path -> Markdown text of every corpus file (what `write_corpus` writes)."""
    files = {}
    for kind, name, facts in entities():
        folder, intro, attrs = _KINDS[kind]
        lines = [f"# {name}", "", intro.format(e=name), ""]
        lines += [f"{label}: {value}{unit}." for (label, _, unit), value in zip(attrs, facts)]
        files[f"{folder}/{name.lower().replace(' ', '-')}.md"] = "\n".join(lines) + "\n"
    return files


def write_corpus(folder: str | Path = CORPUS_DIR) -> None:
    """Write the corpus (the bundled one is made by this; tests check it is unchanged)."""
    for path, text in corpus_files().items():
        (Path(folder) / path).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / path).write_text(text, encoding="utf-8")


# -- the real tools ------------------------------------------------------------------------------

@functools.cache
def corpus(folder: str = str(CORPUS_DIR)):
    """The bundled corpus as a browser backend (its BM25 index is cached after the first use)."""
    from ..tools.browser import LocalCorpus
    return LocalCorpus(folder)


def new_browser():
    """A fresh browser over the bundled corpus: its first page is cursor 0, as in a new chat."""
    from ..tools.browser import BrowserTool
    return BrowserTool(corpus())


_python_tool = None


@functools.cache
def run_python(code: str) -> str:
    """What the python tool prints for `code` (self-contained code, so one session serves all).
    Where this machine cannot sandbox, the same interpreter runs unsandboxed: for these
    one-liners the output is the same, and the data stays what the tool really returns."""
    global _python_tool
    from ..tools.python import PythonLimits, PythonTool
    from ..tools.sandbox import unavailable_reason
    if _python_tool is None:
        # 10 s, not 120: evaluation runs code the model wrote, which may loop
        _python_tool = PythonTool(PythonLimits(wall_seconds=10.0),
                                  unsandboxed=unavailable_reason() is not None)
        atexit.register(_python_tool.close)
    return _python_tool.run("data", code)


# -- conversations -------------------------------------------------------------------------------
Draft = tuple[tuple, list[dict], dict, tuple[str, ...]]

_BROWSER_Q = ("What is the {a} of {e}?|Do you know the {a} of {e}?|Look up the {a} of {e}.|"
              "Tell me the {a} of {e}.|What's the {a} of {e}?|Can you find the {a} of {e}?|"
              "{e}: what is its {a}?|I need the {a} of {e}.").split("|")


def _call(i: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{i}", "type": "function", "channel": "analysis", "content_type": "code",
            "function": {"name": name, "arguments": arguments}}


def _result(i: int, name: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{i}", "name": name, "channel": "analysis",
            "content": content}


def _declared(rng: random.Random, own: str) -> tuple[str, ...]:
    # Often only the family's own tool (shorter prompts); sometimes both, so the model learns
    # to pick the right one, as `ossgpt chat --tools browser,python` declares both.
    return ("browser", "python") if rng.random() < 0.3 else (own,)


def _fact(n: int, k: int) -> tuple[str, str, str, str, str, str]:
    """Entity n's attribute k: (entity name, attribute noun, value, unit, the corpus file that
    states it, the line that does)."""
    kind, name, facts = entities()[n]
    folder, _, attrs = _KINDS[kind]
    label, noun, unit = attrs[k]
    return (name, noun, facts[k], unit, f"{folder}/{name.lower().replace(' ', '-')}.md",
            f"{label}: {facts[k]}{unit}.")


@functools.cache
def _browse(n: int, k: int) -> tuple[str, str, int, str, int]:
    """Entity n's attribute k looked up as the model would (search, open the matching result):
    (search arguments, results, link, page, fact's line). Cached: a test split draws the same
    120 lookups thousands of times while it collects its distinct keys."""
    name, noun, _, _, path, fact = _fact(n, k)
    browser = new_browser()
    search_args = json.dumps({"query": f"{name} {noun}", "topn": 3})
    results = browser.call("search", search_args)
    link = next(i for i, target in browser.stack[0].links.items() if target == path)
    page = browser.call("open", json.dumps({"id": int(link)}))
    line = next(i for i, text in enumerate(browser.stack[1].lines) if text == fact)
    return search_args, results, int(link), page, line


def browser_draft(rng: random.Random) -> Draft:
    """search -> open the matching result -> answer with a citation; outputs from BrowserTool."""
    n = rng.randrange(len(entities()))
    k, t = rng.randrange(len(_KINDS[entities()[n][0]][2])), rng.randrange(len(_BROWSER_Q))
    name, noun, value, unit, path, fact = _fact(n, k)
    query = f"{name} {noun}"
    search_args, results, link, page, line = _browse(n, k)
    open_args = json.dumps({"id": link})
    cite = f"【1†L{line}-L{line}】"
    msgs = [{"role": "user", "content": _BROWSER_Q[t].format(a=noun, e=name)},
            {"role": "assistant", "reasoning": f"The user asks for the {noun} of {name}. I do not "
             f"know it, so I will search the documents for {query}.",
             "tool_calls": [_call(0, "browser.search", search_args)]},
            _result(0, "browser.search", results),
            {"role": "assistant", "reasoning": f"Result {link} is {name} ({path}). I will open it.",
             "tool_calls": [_call(1, "browser.open", open_args)]},
            _result(1, "browser.open", page),
            # The fact first, then its line: copying the line after its label is easier for nano
            # than finding the line number first, and a wrong line then spoils only the citation.
            {"role": "assistant", "reasoning": f"The page says {fact} That is line L{line}.",
             "content": f"The {noun} of {name} is {value}{unit} {cite}."}]
    expected = {"tool": "browser.search", "arguments": {"query": query, "topn": 3},
                "final_contains": [value], "cite": {"path": path, "line": line + 1}, "kind": noun}
    return ("browser", n, k, t), msgs, expected, _declared(rng, "browser")


PYTHON_KINDS = ("mul", "sum", "sort", "digits")  # the computations python_draft asks for
_MUL_Q = "What is {a} times {b}?|Compute {a} * {b}.|Multiply {a} by {b}.|{a} x {b} = ?".split("|")
_SUM_Q = "What is the sum of {l}?|Add up {l}.|Sum these numbers: {l}.|What do {l} add up to?".split("|")
_SORT_Q = "Sort these numbers: {l}.|Put {l} in increasing order.|Sort {l} from smallest to largest.".split("|")
_DIGITS_Q = ("How many digits does {a} to the power {b} have?|How many digits are in {a}**{b}?|"
             "Count the digits of {a}^{b}.").split("|")


def python_draft(rng: random.Random) -> Draft:
    """One line of code for a computation; the answer states what PythonTool printed."""
    kind = rng.choice(PYTHON_KINDS)
    if kind == "mul":
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        q, code, key = rng.choice(_MUL_Q).format(a=a, b=b), f"print({a} * {b})", (a, b)
        what = f"{a} times {b}"
    elif kind == "digits":
        a, b = rng.randint(2, 99), rng.randint(10, 99)
        q, code, key = rng.choice(_DIGITS_Q).format(a=a, b=b), f"print(len(str({a} ** {b})))", (a, b)
        what = f"the number of digits of {a} to the power {b}"
    else:
        nums = [rng.randint(10, 999) for _ in range(rng.randint(4, 7))]
        listing = ", ".join(map(str, nums))
        fn, templates = ("sum", _SUM_Q) if kind == "sum" else ("sorted", _SORT_Q)
        q, code, key = rng.choice(templates).format(l=listing), f"print({fn}([{listing}]))", tuple(nums)
        what = f"the {'sum' if kind == 'sum' else 'sorted list'} of {listing}"
    out = run_python(code)
    answer = out.strip()
    msgs = [{"role": "user", "content": q},
            {"role": "assistant", "reasoning": f"I need {what}. I will compute it with python.",
             "tool_calls": [_call(0, "python", code)]},
            _result(0, "python", out),
            # The reasoning restates the operands (nano copies from its own reasoning more surely
            # than from the question); the answer copies the output once, straight from the tool.
            {"role": "assistant", "content": f"The answer is {answer}."}]
    expected = {"tool": "python", "code": code, "final_contains": [answer], "kind": kind}
    return ("python", kind) + key, msgs, expected, _declared(rng, "python")
