"""Structured output: tool-call arguments that follow the tool's JSON schema and `response_format`
JSON that always parses, by masking the logits of each step.

The reply is harmony, so JSON is only constrained inside the right message. The constraint
follows the reply with the same framing and header recognition as the reply parser
(harmony/framing.py): when a body opens under a header that calls an offered function (or the
final channel under `response_format`), an xgrammar matcher for the schema takes over, and it
only allows the stop token (<|call|> or <|return|>) once the JSON is complete. The parser reports
as calls exactly the messages this constrained, and only once their <|call|> came.

When the client *requires* a tool call (`tool_choice: "required"` or a named function), forbids
one (`"none"`) or asks for a JSON answer, the headers themselves are forced: the reply opens with
analysis (or the final answer), and every later message must be one of the allowed headers,
rendered by harmony exactly as in training and chosen token by token among them (a trie over
their token sequences).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from ..harmony import Event, Framer, Header
from ..tokenizer import CALL, RETURN, START, VOCAB_SIZE, get_tokenizer


@functools.lru_cache(maxsize=1)
def _compiler():
    import xgrammar as xgr

    tok = get_tokenizer()
    vocab = []
    for i in range(VOCAB_SIZE):
        # Special and reserved ids get no text: a grammar can never produce them; the stop
        # token of each matcher is allowed explicitly.
        try:
            vocab.append(b"" if tok.is_special(i) else tok.decode_bytes([i]))
        except Exception:
            vocab.append(b"")
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE,
                             stop_token_ids=[RETURN])
    return xgr.GrammarCompiler(info, max_threads=1)


@functools.lru_cache(maxsize=256)
def _compiled(schema_json: str | None):
    compiler = _compiler()
    if schema_json is None:  # json_object, or a tool without parameters: any JSON object
        schema_json = '{"type": "object"}'
    # Compact JSON spaced as json.dumps (and training data) write it: free whitespace would let
    # a model pad forever.
    return compiler.compile_json_schema(schema_json, any_whitespace=False,
                                        separators=(", ", ": "))


def check_schema(schema: dict | None) -> None:
    """Compile a schema now, so a bad one is the client's 400 instead of a failed stream."""
    _compiled(None if schema is None else json.dumps(schema))


@functools.lru_cache(maxsize=1)
def _headers() -> dict[str, list[int]]:
    """Header token sequences as harmony renders them."""
    tok = get_tokenizer()
    return {"analysis": tok.encode("<|channel|>analysis<|message|>", allow_special=True),
            "final": tok.encode("<|start|>assistant<|channel|>final<|message|>", allow_special=True),
            "first_final": tok.encode("<|channel|>final<|message|>", allow_special=True)}


def _tool_header(name: str) -> list[int]:
    if "." in name:  # a built-in tool ("browser.search"): called on analysis, as harmony renders
        return get_tokenizer().encode(
            f"<|start|>assistant to={name}<|channel|>analysis code<|message|>", allow_special=True)
    return get_tokenizer().encode(
        f"<|start|>assistant to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>",
        allow_special=True)


@dataclass
class _Trie:
    """Forced choice among token sequences; `done` once one is complete."""
    options: list[list[int]]
    pos: int = 0
    done: bool = False

    def allowed(self) -> list[int]:
        return sorted({seq[self.pos] for seq in self.options})

    def accept(self, token: int) -> None:
        self.options = [s for s in self.options if s[self.pos] == token]
        self.pos += 1
        self.done = any(len(s) == self.pos for s in self.options)


class ReplyConstraint:
    """Per-request logits mask. `tools`: the functions the reply may call, name -> parameters
    schema (None: any JSON object); `json_schema`: the response_format schema ({} for
    json_object) or None; `tool_choice`: "auto" (headers free), "required" (a call to one of
    `tools`) or "none" (no call header can open)."""

    def __init__(self, tools: dict[str, dict | None], json_schema: dict | None = None,
                 tool_choice: str = "auto") -> None:
        self.tools = {} if tool_choice == "none" else tools
        self.json_schema = json_schema
        self.framer = Framer()
        self.matcher = None
        self.trie: _Trie | None = None
        self._later: list[list[int]] | None = None  # headers allowed after the first message
        self._bitmask = None
        if tool_choice != "auto" or json_schema is not None:
            answer = tool_choice != "required"
            headers = _headers()
            self.trie = _Trie([headers["analysis"]] + [headers["first_final"]] * answer)
            self._later = [_tool_header(n) for n in self.tools] + [headers["final"]] * answer

    @property
    def active(self) -> bool:
        return self.trie is not None or self.matcher is not None

    def apply(self, logits: torch.Tensor) -> None:
        """Mask one row of logits (V,) in place."""
        if self.trie is not None:
            keep = torch.tensor(self.trie.allowed(), device=logits.device)
            kept = logits[keep].clone()
            logits.fill_(float("-inf"))
            logits[keep] = kept
        elif self.matcher is not None:
            import xgrammar as xgr

            if self._bitmask is None:
                self._bitmask = xgr.allocate_token_bitmask(1, VOCAB_SIZE)
            self.matcher.fill_next_token_bitmask(self._bitmask)
            row = logits[None, :VOCAB_SIZE]
            xgr.apply_token_bitmask_inplace(row, self._bitmask.to(logits.device))
            logits[VOCAB_SIZE:] = float("-inf")

    def accept(self, token: int) -> None:
        if self.trie is not None:
            self.trie.accept(token)
            if self.trie.done:
                self.trie = None
        elif self.matcher is not None:
            self.matcher.accept_token(token)
            if self.matcher.is_terminated():
                self.matcher = None
        event = self.framer.push(token)
        if event is Event.OPEN:
            self._open(self.framer.header)
        elif self._later is not None and self.trie is None:
            # Forced headers: after a message's <|end|>, or a <|start|> the model wrote inside
            # an unconstrained body, the next header must be one of the allowed ones.
            if event is Event.END:
                self.trie = _Trie(self._later)
            elif token == START:
                self.trie = _Trie(self._later)
                self.trie.accept(START)

    def _open(self, header: Header) -> None:
        """A message body begins: constrain it if it calls a function or is a JSON answer."""
        import xgrammar as xgr

        if (name := header.call(self.tools)) is not None:
            schema = self.tools[name]
            self.matcher = xgr.GrammarMatcher(
                _compiled(None if schema is None else json.dumps(schema)),
                override_stop_tokens=[CALL])
        elif header.channel == "final" and self.json_schema is not None:
            self.matcher = xgr.GrammarMatcher(
                _compiled(json.dumps(self.json_schema) if self.json_schema else None),
                override_stop_tokens=[RETURN])
