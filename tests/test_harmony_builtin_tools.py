"""The built-in tools gpt-oss was trained with (browser, python): declared in the system message
token-identically to openai-harmony, their calls parsed on either channel with either content
type, and their results rendered back as the library renders them."""

from __future__ import annotations

import json

import pytest
from openai_harmony import (Author, Conversation, DeveloperContent, Message, Role, SystemContent,
                            ToolDescription)

from ossgpt.harmony import BUILTIN_CALLS, parse_reply, render_conversation, render_prompt
from ossgpt.tokenizer import get_tokenizer

from conftest import PEER_DATA

GOLDEN = PEER_DATA / "harmony"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(),
                                  reason=f"harmony peer data not found at {GOLDEN} (set OSSGPT_SHARED)")
DATE = "2025-06-28"
ALL_BUILTIN_CALLS = {c for calls in BUILTIN_CALLS.values() for c in calls}


def golden_text(name: str) -> str:
    text = (GOLDEN / name).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text, allow_special=True)


def lookup_weather() -> dict:
    return json.loads((GOLDEN / "function_tools.json").read_text())["lookup_weather"]


def system(*builtins: str) -> Message:
    sc = SystemContent.new().with_conversation_start_date(DATE)
    for b in builtins:
        sc = sc.with_browser_tool() if b == "browser" else sc.with_python_tool()
    return Message.from_role_and_content(Role.SYSTEM, sc)


# -- declarations --------------------------------------------------------------------------------


@needs_golden
@pytest.mark.parametrize("builtins, golden", [
    (["browser"], "test_browser_tool_only.txt"),
    (["browser", "python"], "test_browser_and_python_tool.txt"),
])
def test_builtin_tools_declared_like_golden(builtins, golden):
    assert render_prompt([], date=DATE, builtin_tools=builtins) == encode(golden_text(golden))


@needs_golden
def test_browser_and_function_tools_like_golden():
    tokens = render_prompt([], date=DATE, builtin_tools=["browser"], tools=[lookup_weather()])
    assert tokens == encode(golden_text("test_browser_and_function_tool.txt"))


def test_python_only_like_the_library():
    expected = render_conversation(Conversation.from_messages([system("python")]))
    tokens = render_prompt([], date=DATE, builtin_tools=["python"])
    assert tokens == expected
    text = get_tokenizer().decode(tokens)
    assert "## python" in text and "## browser" not in text


@needs_golden
def test_browser_python_and_functions():
    tokens = render_prompt([], date=DATE, builtin_tools=["browser", "python"],
                           tools=[lookup_weather()])
    dev = DeveloperContent.new().with_function_tools([ToolDescription.new(**lookup_weather())])
    library = render_conversation(Conversation.from_messages(
        [system("browser", "python"), Message.from_role_and_content(Role.DEVELOPER, dev)]))
    assert tokens == library
    # The same text put together from the goldens: the browser+functions prompt with the python
    # section of the browser+python one inserted before the channels line.
    browser_python = golden_text("test_browser_and_python_tool.txt")
    python_section = browser_python[browser_python.index("## python"):
                                    browser_python.index("# Valid channels")]
    with_functions = golden_text("test_browser_and_function_tool.txt")
    cut = with_functions.index("# Valid channels")
    assert tokens == encode(with_functions[:cut] + python_section + with_functions[cut:])


def test_builtin_tools_rejects_unknown_and_dedupes():
    with pytest.raises(ValueError, match="builtin_tools"):
        render_prompt([], builtin_tools=["shell"])
    assert render_prompt([], date="", builtin_tools=["browser", "browser"]) == render_prompt(
        [], date="", builtin_tools=["browser"])


# -- tool results rendered back --------------------------------------------------------------------

PAGE = "[0] rust borrow checker\n**viewing lines [0 - 2] of 2**\n\nL0: \nL1: URL: \nL2: # Search Results"


def builtin_turn() -> list[dict]:
    """A turn in progress: a search on analysis, a python run on commentary, both answered."""
    return [
        {"role": "user", "content": "What is the borrow checker? Also compute 2**10."},
        {"role": "assistant", "reasoning": "Search first.", "tool_calls": [
            {"id": "c1", "type": "function", "channel": "analysis", "content_type": "code",
             "function": {"name": "browser.search", "arguments": '{"query": "borrow checker"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": PAGE},
        {"role": "assistant", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "python", "arguments": "print(2**10)"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "1024\n"},
    ]


def library_turn() -> list[Message]:
    def assistant(text, channel):
        return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)

    def tool(name, text, channel):
        return (Message.from_author_and_content(Author.new(Role.TOOL, name), text)
                .with_channel(channel).with_recipient("assistant"))

    return [
        Message.from_role_and_content(Role.USER, "What is the borrow checker? Also compute 2**10."),
        assistant("Search first.", "analysis"),
        assistant('{"query": "borrow checker"}', "analysis").with_recipient("browser.search")
        .with_content_type("code"),
        tool("browser.search", PAGE, "analysis"),
        assistant("print(2**10)", "commentary").with_recipient("python").with_content_type("code"),
        tool("python", "1024\n", "commentary"),
    ]


def test_tool_results_render_like_the_library():
    tokens = render_prompt(builtin_turn(), date=DATE, builtin_tools=["browser", "python"])
    expected = render_conversation(Conversation.from_messages(
        [system("browser", "python")] + library_turn()))
    assert tokens == expected
    text = get_tokenizer().decode(tokens)
    assert ("<|start|>assistant to=browser.search<|channel|>analysis code<|message|>"
            '{"query": "borrow checker"}<|call|><|start|>browser.search to=assistant'
            "<|channel|>analysis<|message|>[0] rust borrow checker") in text
    assert text.endswith("<|start|>python to=assistant<|channel|>commentary<|message|>1024\n"
                         "<|end|><|start|>assistant")


def test_tool_result_channel_and_name_given_explicitly():
    messages = builtin_turn()
    messages[2] = {"role": "tool", "name": "browser.search", "channel": "analysis", "content": PAGE}
    messages[4] = {"role": "tool", "name": "python", "content": "1024\n"}
    assert (render_prompt(messages, date=DATE, builtin_tools=["browser", "python"])
            == render_prompt(builtin_turn(), date=DATE, builtin_tools=["browser", "python"]))


def test_finished_turn_drops_its_analysis_tool_round_trip_like_the_library():
    messages = builtin_turn() + [{"role": "assistant", "content": "It checks borrows. 1024."},
                                 {"role": "user", "content": "thanks"}]
    tokens = render_prompt(messages, date=DATE, builtin_tools=["browser", "python"])
    expected = render_conversation(Conversation.from_messages(
        [system("browser", "python")] + library_turn()
        + [Message.from_role_and_content(Role.ASSISTANT, "It checks borrows. 1024.").with_channel("final"),
           Message.from_role_and_content(Role.USER, "thanks")]))
    assert tokens == expected
    text = get_tokenizer().decode(tokens)
    assert "browser.search" not in text.split("# Valid channels")[1]  # call and result both gone
    assert "<|start|>python to=assistant<|channel|>commentary<|message|>1024" in text


def test_python_without_builtin_is_a_function():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "python", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "ok"}]
    text = get_tokenizer().decode(render_prompt(messages, date=""))
    assert "to=functions.python<|channel|>commentary <|constrain|>json" in text
    assert "<|start|>functions.python to=assistant" in text


# -- parsing the model's calls ---------------------------------------------------------------------

CALLS = [
    # (generated after <|start|>assistant, name, arguments, channel, content_type)
    ('<|channel|>analysis to=browser.search code<|message|>{"query": "harmony format"}<|call|>',
     "browser.search", '{"query": "harmony format"}', "analysis", "code"),
    (' to=browser.open<|channel|>commentary <|constrain|>json<|message|>{"id": 3, "loc": 20}<|call|>',
     "browser.open", '{"id": 3, "loc": 20}', "commentary", "<|constrain|>json"),
    ('<|channel|>commentary to=browser.find json<|message|>{"pattern": "sink"}<|call|>',
     "browser.find", '{"pattern": "sink"}', "commentary", "json"),
    (" to=python<|channel|>analysis code<|message|>import math\nprint(math.pi)<|call|>",
     "python", "import math\nprint(math.pi)", "analysis", "code"),
    ("<|channel|>commentary to=python code<|message|>x = 1<|call|>",
     "python", "x = 1", "commentary", "code"),
]


@pytest.mark.parametrize("tools", [ALL_BUILTIN_CALLS, None], ids=["builtin-names", "any"])
@pytest.mark.parametrize("generated, name, arguments, channel, content_type", CALLS)
def test_builtin_calls_parse_on_either_channel(generated, name, arguments, channel,
                                               content_type, tools):
    reply = parse_reply(encode("<|channel|>analysis<|message|>Let me look.<|end|><|start|>assistant"
                               + generated), tools=tools)
    assert reply.reasoning == "Let me look."
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert (call.name, call.arguments, call.channel, call.content_type) == (
        name, arguments, channel, content_type)


@pytest.mark.parametrize("generated, name, arguments, channel, content_type", CALLS)
def test_parsed_call_renders_back_as_generated(generated, name, arguments, channel, content_type):
    """A call parsed from the model's output, put in history with its channel and content type,
    renders to the library's form of the same message (recipient before the channel)."""
    call = parse_reply(encode(generated), tools=ALL_BUILTIN_CALLS).tool_calls[0]
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"id": "c", "channel": call.channel,
                                                      "content_type": call.content_type,
                                                      "function": {"name": call.name,
                                                                   "arguments": call.arguments}}]}]
    text = get_tokenizer().decode(render_prompt(messages, date="", builtin_tools=["browser", "python"]))
    assert (f"<|start|>assistant to={name}<|channel|>{channel} {content_type}<|message|>"
            f"{arguments}<|call|>") in text


def test_builtin_call_not_offered_is_text():
    """With only function tools offered, a browser call is not a call (the chat loop could not
    run it): it stays the reply's text."""
    reply = parse_reply(encode(CALLS[0][0]), tools={"get_weather"})
    assert reply.tool_calls == [] and reply.reasoning == '{"query": "harmony format"}'
