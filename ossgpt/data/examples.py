"""Synthetic examples as training tokens with a loss mask, and scoring of model replies.

`render_example` produces exactly the tokens `ossgpt chat` would show the model, with the
assistant's own tokens marked for the loss. A conversation is rendered turn by turn: the
prompt before each assistant turn comes from `ossgpt.harmony.render_prompt` (the chat's own
renderer) and must extend the tokens so far, and the turn itself is rendered message by message
with openai-harmony. Rendering the whole conversation at once would not do: harmony drops the
analysis of a finished turn from history, which would delete the very reasoning we train on.

Trained turns are the assistant messages after the last user message (e.g. reasoning + tool
call, then, after the tool result, reasoning + answer). Exchanges before the last user message
are history: rendered as the chat renders history (analysis dropped, `<|end|>`), loss mask 0,
because the model never generates those tokens in that form.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from openai_harmony import Message, Role

from ..harmony import BUILTIN_CALLS, Reply, parse_reply, render_prompt
from ..tokenizer import CALL, END, RETURN, harmony_encoding

if TYPE_CHECKING:  # only for annotations: tasks imports this module
    from .tasks import Example


def render_options(ex: Example) -> dict[str, Any]:
    """The `render_prompt` keyword arguments of an example (what `ossgpt chat` would pass)."""
    return dict(reasoning_effort=ex.reasoning_effort, developer=ex.developer, tools=ex.tools,
                date=ex.date, builtin_tools=ex.builtin_tools)


def trained_turns(messages: list[dict]) -> list[tuple[int, int]]:
    """[start, end) index ranges of the assistant turns after the last user message; a turn
    is a run of consecutive assistant messages (tool results separate turns)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    turns, i = [], last_user + 1
    while i < len(messages):
        if messages[i].get("role") != "assistant":
            i += 1
            continue
        j = i
        while j < len(messages) and messages[j].get("role") == "assistant":
            j += 1
        turns.append((i, j))
        i = j
    if not turns:
        raise ValueError("the example has no assistant turn after its last user message")
    return turns


def _harmony_messages(msg: dict, builtin: set[str]) -> list[Message]:
    """One OpenAI-style assistant message as harmony messages, in the layout `render_prompt`
    uses for history: analysis, then content (final; commentary beside tool calls), then
    each call on commentary to functions.NAME with <|constrain|>json, or, for a built-in tool
    (`builtin`: "browser.search", "python", ...), to its own name with "code"; a call's own
    `channel` and `content_type` win, as in `render_prompt`."""
    out = []
    if msg.get("reasoning"):
        out.append(Message.from_role_and_content(Role.ASSISTANT, msg["reasoning"])
                   .with_channel("analysis"))
    calls = msg.get("tool_calls") or []
    if msg.get("content"):
        out.append(Message.from_role_and_content(Role.ASSISTANT, msg["content"])
                   .with_channel("commentary" if calls else "final"))
    for call in calls:
        fn = call["function"]
        own = fn["name"] in builtin
        out.append(Message.from_role_and_content(Role.ASSISTANT, fn["arguments"])
                   .with_channel(call.get("channel") or "commentary")
                   .with_recipient(fn["name"] if own else "functions." + fn["name"])
                   .with_content_type(call.get("content_type")
                                      or ("code" if own else "<|constrain|>json")))
    return out


def _turn_tokens(msgs: list[dict], prompt: list[int],
                 builtin_tools: Sequence[str] = ()) -> list[int]:
    """The tokens the model generates for one turn, after the prompt's `<|start|>assistant`."""
    enc = harmony_encoding()
    builtin = {call for b in builtin_tools for call in BUILTIN_CALLS[b]}
    tokens: list[int] = []
    for m in msgs:
        for hm in _harmony_messages(m, builtin):
            tokens += enc.render(hm)
    if tokens[:2] != prompt[-2:]:
        raise ValueError("the prompt does not end with the turn's <|start|>assistant")
    tokens = tokens[2:]
    # Training form: a finished reply stops on <|return|> (history shows <|end|> instead); a
    # tool call already ends in <|call|>. Anything else would teach the model not to stop.
    if tokens[-1] == END and not (msgs[-1].get("tool_calls")) and msgs[-1].get("content"):
        tokens[-1] = RETURN
    if tokens[-1] not in (RETURN, CALL):
        raise ValueError("an assistant turn must end with a final answer or a tool call")
    return tokens


def _check_round_trip(msgs: list[dict], tokens: list[int]) -> None:
    """parse_reply must give the turn back: what the chat would show for these tokens."""
    reply = parse_reply(tokens)
    want_calls = [(c["function"]["name"], c["function"]["arguments"])
                  for m in msgs for c in m.get("tool_calls") or []]
    got = (reply.reasoning, reply.content, [(c.name, c.arguments) for c in reply.tool_calls])
    want = ("\n".join(m["reasoning"] for m in msgs if m.get("reasoning")),
            "\n".join(m["content"] for m in msgs if m.get("content")), want_calls)
    if not reply.well_formed or got != want:
        raise ValueError(f"turn does not parse back: got {got!r}, want {want!r}")


def render_example(ex: Example, check: bool = True) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of an example: mask 1 exactly on the tokens the assistant generates
    in its trained turns (from just after each prompt's `<|start|>assistant` through the turn's
    `<|return|>` or `<|call|>`, including the `<|start|>assistant...` headers of later messages
    within the turn), 0 on system, developer, user, tool and history tokens. With `check`, each
    turn's prompt is verified to be a prefix and each turn to parse back to its messages."""
    opts = render_options(ex)
    tokens: list[int] = []
    mask: list[int] = []
    for start, end in trained_turns(ex.messages):
        prompt = render_prompt(ex.messages[:start], **opts)
        if prompt[:len(tokens)] != tokens:
            raise ValueError(f"the prompt before message {start} does not extend the tokens so far")
        mask += [0] * (len(prompt) - len(tokens))
        tokens = list(prompt)
        turn = _turn_tokens(ex.messages[start:end], prompt, ex.builtin_tools)
        if check:
            _check_round_trip(ex.messages[start:end], turn)
        tokens += turn
        mask += [1] * len(turn)
    if tokens[-1] != RETURN:
        raise ValueError("an example must end with a final answer")
    return tokens, mask


def prompt_tokens(ex: Example) -> list[int]:
    """The prompt up to the first trained assistant turn (ends in `<|start|>assistant`): what to
    feed the model when evaluating it on `ex`."""
    return render_prompt(ex.messages[:trained_turns(ex.messages)[0][0]], **render_options(ex))


def gold_turn(ex: Example) -> list[int]:
    """The tokens of the example's own first trained turn (a perfect model's reply)."""
    start, end = trained_turns(ex.messages)[0]
    return _turn_tokens(ex.messages[start:end], prompt_tokens(ex), ex.builtin_tools)


# -- scoring -------------------------------------------------------------------------------------
_REFUSAL_RE = re.compile(r"\b(i don'?t know|i do not know|i can'?t|i cannot|i'?m not able|"
                         r"i am not able|unable|sorry)\b", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(",", " , ").split())


def same_value(a: Any, b: Any) -> bool:
    """JSON values equal up to case and spaces of strings and a small numeric tolerance."""
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


def json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score(example: Example, reply: Reply) -> dict[str, bool]:
    """Check a model's first assistant turn (`ossgpt.harmony.parse_reply` of its tokens)
    against `example.expected`: {"well_formed", "correct"}.

    well_formed: the reply parsed cleanly into analysis + final, or into tool calls whose
    arguments are JSON objects (python's: code). right_tool (examples that expect a call): the
    first call names the expected function and its arguments are a JSON object (python: some
    code). correct: the answer number is the last number of the final content; the capital (or
    country) is named; the reversed list appears; the tool and its arguments match (strings
    case-insensitively, numbers within 1e-6; python: the same code); a refusal is recognised;
    small talk mentions the expected words. Answers must not call tools. The answer after a
    tool result (`final_contains`) is scored by `ossgpt.data.tool_loop`."""
    channels = {m.channel for m in reply.messages if m.role == "assistant"}
    # The python tool's argument is code; every other tool takes a JSON object.
    args = [c.arguments if c.name == "python" else json_object(c.arguments)
            for c in reply.tool_calls]
    if reply.tool_calls:
        well_formed = reply.well_formed and all(a is not None for a in args)
    else:
        well_formed = reply.well_formed and {"analysis", "final"} <= channels
    exp, content = example.expected, reply.content
    right_tool = (bool(reply.tool_calls) and reply.tool_calls[0].name == exp.get("tool")
                  and args[0] is not None and (not isinstance(args[0], str) or args[0].strip()))
    if "code" in exp:  # python: the same code (stripped)
        correct = right_tool and args[0].strip() == exp["code"]
    elif "tool" in exp:
        want = exp["arguments"]
        correct = (right_tool and args[0].keys() == want.keys()
                   and all(same_value(args[0][k], v) for k, v in want.items()))
    elif reply.tool_calls:
        correct = False
    elif exp.get("refusal"):
        correct = bool(_REFUSAL_RE.search(content))
    elif "contains" in exp:
        correct = bool(content.strip()) and all(w.lower() in content.lower()
                                                for w in exp["contains"])
    elif exp.get("match") == "number":
        numbers = re.findall(r"-?\d+", content.replace(",", ""))
        correct = bool(numbers) and numbers[-1] == exp["answer"]
    elif exp.get("match") == "list":
        correct = _norm(exp["answer"]) in _norm(content)
    else:
        correct = re.search(rf"\b{re.escape(exp['answer'])}\b", content, re.IGNORECASE) is not None
    out = {"well_formed": bool(well_formed), "correct": bool(correct)}
    if "tool" in exp:  # the call alone: the right function with a JSON object (python: code)
        out["right_tool"] = bool(right_tool)
    return out
