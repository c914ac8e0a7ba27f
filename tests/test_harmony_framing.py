"""The shared reading of generated harmony (ossgpt/harmony/framing.py): header recognition on
every header form, against openai-harmony where the library accepts the form and by hand where
it does not, message framing, and that the reply parser and the server's constraint, fed the
same tokens, agree on which message calls which function."""

import itertools

import pytest
from openai_harmony import Author, Message, Role

from ossgpt.harmony import Event, Framer, ReplyParser, read_header
from ossgpt.server.constrain import ReplyConstraint
from ossgpt.tokenizer import MESSAGE, get_tokenizer, harmony_encoding

TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"], "additionalProperties": False},
         "shell": None}


def tokens(text: str) -> list[int]:
    return get_tokenizer().encode(text, allow_special=True)


# -- against openai-harmony, on every header it renders -------------------------------------------

# A content type only beside a recipient: alone, the library reads it as the recipient
# ("<|channel|>analysis json" -> recipient "json"), which would make any such message a call.
RENDERED = [
    Message.from_role_and_content(Role.ASSISTANT, "x").with_channel(channel)
    .with_recipient(recipient).with_content_type(content_type)
    for channel, recipient, content_type in itertools.product(
        ("analysis", "commentary", "final"),
        (None, "functions.get_weather", "browser.search", "lookup_weather"),
        (None, "<|constrain|>json", "json", "code"))
    if recipient or not content_type
] + [Message.from_author_and_content(Author.new(Role.TOOL, name), "{}").with_channel("commentary")
     .with_recipient("assistant") for name in ("functions.get_weather", "browser.search")]


@pytest.mark.parametrize("message", RENDERED, ids=lambda m: "|".join(
    str(x) for x in (m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type)))
def test_read_header_agrees_with_the_library_on_rendered_headers(message):
    rendered = harmony_encoding().render(message)
    header_text = get_tokenizer().decode(rendered[1:rendered.index(MESSAGE)])
    [parsed] = harmony_encoding().parse_messages_from_completion_tokens(rendered, None, strict=True)
    want = (parsed.author.role.value, parsed.author.name, parsed.channel, parsed.recipient,
            parsed.content_type)
    h = read_header(header_text)
    assert (h.role, h.name, h.channel, h.recipient, h.content_type, h.strict) == (*want, True)
    if message.author.role == Role.ASSISTANT:  # the same header after a prompt's <|start|>assistant
        h = read_header(header_text.removeprefix("assistant"), "assistant")
        assert (h.role, h.name, h.channel, h.recipient, h.content_type, h.strict) == (*want, True)


# Forms the library's strict parser also accepts though it never renders them (gpt-oss writes
# the recipient after the channel; openai/harmony's tests).
CHANNEL_FIRST = ["<|channel|>commentary to=functions.get_weather <|constrain|>json",
                 "<|channel|>commentary to=functions.get_weather<|constrain|>json",
                 "<|channel|>commentary to=functions.get_weather json",
                 " to=functions.get_weather<|channel|>commentary<|constrain|>json",
                 "<|channel|>analysis to=functions.get_weather code"]


@pytest.mark.parametrize("text", CHANNEL_FIRST)
def test_read_header_agrees_with_the_library_on_channel_first_headers(text):
    [parsed] = harmony_encoding().parse_messages_from_completion_tokens(
        tokens(text + "<|message|>{}<|call|>"), Role.ASSISTANT, strict=True)
    h = read_header(text, "assistant")
    assert (h.channel, h.recipient, h.content_type, h.strict) == (
        parsed.channel, parsed.recipient, parsed.content_type, True)
    assert h.call(TOOLS) == "get_weather"


# -- every variant, malformed ones written by hand -------------------------------------------------

#: header after <|start|>assistant -> (channel, recipient, the function it calls among TOOLS,
#: strict)
VARIANTS = {
    "recipient_first": (" to=functions.get_weather<|channel|>commentary <|constrain|>json",
                        "commentary", "functions.get_weather", "get_weather", True),
    "channel_first": ("<|channel|>commentary to=functions.get_weather <|constrain|>json",
                      "commentary", "functions.get_weather", "get_weather", True),
    "no_constrain": ("<|channel|>commentary to=functions.get_weather json",
                     "commentary", "functions.get_weather", "get_weather", True),
    "no_content_type": (" to=functions.get_weather<|channel|>commentary",
                        "commentary", "functions.get_weather", "get_weather", True),
    "on_analysis": ("<|channel|>analysis to=functions.get_weather code",
                    "analysis", "functions.get_weather", "get_weather", True),
    "bare_name": ("<|channel|>commentary to=get_weather <|constrain|>json",
                  "commentary", "get_weather", "get_weather", True),
    "json_glued_to_name": ("<|channel|>commentary to=functions.get_weatherjson",
                           "commentary", "functions.get_weatherjson", "get_weather", True),
    "tool_without_parameters": ("<|channel|>commentary to=functions.shell",
                                "commentary", "functions.shell", "shell", True),
    "no_channel": (" to=functions.get_weather <|constrain|>json",
                   None, "functions.get_weather", "get_weather", False),
    "channel_twice": (" to=functions.get_weather<|channel|>commentary<|channel|>commentary "
                      "<|constrain|>json", "commentary", "functions.get_weather", "get_weather",
                      False),
    "constrain_before_recipient": ("<|channel|>commentary<|constrain|>json "
                                   "to=functions.get_weather", "commentary",
                                   "functions.get_weather", "get_weather", False),
    "two_recipients": ("<|channel|>commentary to=functions.get_weather to=functions.shell",
                       "commentary", "functions.get_weather", "get_weather", False),
    "words_in_header": ("<|channel|>commentary I will call to=functions.get_weather json",
                        "commentary", "functions.get_weather", "get_weather", False),
    "unknown_tool": ("<|channel|>commentary to=functions.get_time <|constrain|>json",
                     "commentary", "functions.get_time", None, True),
    "builtin_tool": ("<|channel|>analysis to=browser.search code",
                     "analysis", "browser.search", None, True),
    "namespace_only": ("<|channel|>commentary to=functions. json",
                       "commentary", "functions.", None, True),
    "to_the_user": ("<|channel|>final to=user", "final", "user", None, True),
    "recipient_inside_a_word": ("<|channel|>commentary goto=functions.get_weather",
                                "commentary", None, None, False),
    "recipient_with_spaces": ("<|channel|>commentary to = functions.get_weather",
                              "commentary", None, None, False),
    "content_type_alone": ("<|channel|>commentary <|constrain|>json", "commentary", None, None,
                           True),
    "analysis": ("<|channel|>analysis", "analysis", None, None, True),
    "final": ("<|channel|>final", "final", None, None, True),
    "garbage": ("<|channel|>commentary 183. I will tell the user call get_weather<|channel|>final",
                "commentary", None, None, False),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_header_variants(name):
    text, channel, recipient, call, strict = VARIANTS[name]
    h = read_header(text, "assistant")
    assert (h.role, h.channel, h.recipient, h.call(TOOLS), h.strict) == (
        "assistant", channel, recipient, call, strict)
    # The same header after a <|start|> the model wrote itself.
    h = read_header("assistant" + text)
    assert (h.role, h.channel, h.recipient, h.call(TOOLS), h.strict) == (
        "assistant", channel, recipient, call, strict)


def test_only_the_assistant_calls():
    result = read_header("functions.get_weather to=assistant<|channel|>commentary")
    assert (result.role, result.name, result.recipient, result.call(TOOLS)) == (
        "tool", "functions.get_weather", "assistant", None)
    user = read_header("user to=functions.get_weather<|channel|>commentary")
    assert user.role == "user" and user.call(TOOLS) is None


def test_calls_without_a_tool_list():
    """Without the offered tools (scoring a reply, the chat CLI without --tools), any function
    name is a call; the namespace is dropped."""
    assert read_header("<|channel|>commentary to=functions.get_time", "assistant").call(None) \
        == "get_time"
    assert read_header("<|channel|>analysis to=browser.search code", "assistant").call(None) \
        == "browser.search"
    for text in ("<|channel|>commentary to=functions.", "<|channel|>final to=user",
                 "<|channel|>commentary to=assistant", "<|channel|>commentary"):
        assert read_header(text, "assistant").call(None) is None, text


def test_text_of_headers_never_given_a_message():
    assert read_header("<|channel|>final The answer is 4.", "assistant").text == "The answer is 4."
    assert read_header("I must refuse", "assistant").text == "I must refuse"
    # After a <|start|>, a role without a channel is garbage, not an answer.
    assert read_header("assistant to_unit meters.").text == ""


# -- framing ---------------------------------------------------------------------------------------


def events(text: str, role: str | None = "assistant") -> str:
    framer = Framer(role)
    return " ".join(framer.push(t).value for t in tokens(text))


def test_framing():
    assert events("<|channel|>final<|message|>hi<|return|>") == "header header open content end"
    # <|start|> always begins a header: a body missing its <|end|> ends there.
    assert events("<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b") \
        == "header header open content header header header header open content"
    # Text outside any message opens a headerless body; a terminator there is stray.
    assert events("<|channel|>final<|message|>a<|return|>b<|end|><|end|>") \
        == "header header open content end loose end stray"
    assert events("<|start|>user<|message|>hi<|end|>", role=None) \
        == "header header open content end"
    framer = Framer()
    pushed = [framer.push(t) for t in tokens("<|channel|>final The answer<|return|>")]
    assert pushed[-1] is Event.END
    assert framer.header.text == "The answer" and not framer.in_body


# -- the parser and the constraint agree -----------------------------------------------------------

ANALYSIS = ("<|channel|>analysis<|message|>Weather in Paris: call get_weather.<|end|>"
            "<|start|>assistant")


def follow(text: str) -> tuple[list[str], list[str]]:
    """Feed the same tokens to the constraint and the parser (no masking: these are the model's
    tokens). -> (functions whose body the constraint held to their schema and saw complete,
    functions of the calls the parser reports)."""
    constraint, parser = ReplyConstraint(TOOLS), ReplyParser(TOOLS)
    constrained, opened = [], None
    for t in tokens(text):
        constraint.accept(t)
        parser.push(t)
        if t == MESSAGE:
            opened = constraint.framer.header.call(TOOLS) if constraint.matcher else None
        elif opened and constraint.matcher is None:  # the grammar accepted <|call|>: complete
            constrained.append(opened)
            opened = None
    return constrained, [c.name for c in parser.reply().tool_calls]


@pytest.mark.parametrize("name", VARIANTS)
def test_parser_reports_exactly_the_calls_the_constraint_held(name):
    header, _, _, call, _ = VARIANTS[name]
    body = "{}" if call == "shell" else '{"city": "Paris"}'
    want = ([call], [call]) if call else ([], [])
    # As the reply's first message, after analysis, and after text outside any message.
    for opening in ("", ANALYSIS, "garbage<|end|><|start|>assistant"):
        assert follow(opening + header + "<|message|>" + body + "<|call|>") == want, opening
    # Cut short by the token budget: the constraint held the body, the parser reports no call.
    assert follow(ANALYSIS + header + '<|message|>{"city": "Pa') == ([], [])
