"""Structured output: tool-call arguments that follow the tool's JSON schema and `response_format`
JSON that always parses, by masking the logits of each step.

The reply is harmony, so JSON is only constrained inside the right message: a token-level state
machine watches each message header as it is generated and, when it opens a call to a known
function (or the final channel under `response_format`), hands the message body to an xgrammar
matcher for the schema, which only allows the stop token (<|call|> or <|return|>) once the JSON
is complete. When the client *requires* a tool call (`tool_choice: "required"` or a named
function) or a JSON answer, the headers themselves are forced: the reply opens with analysis,
and the next message must be one of the allowed headers, rendered by harmony exactly as in
training and chosen token by token among them (a trie over their token sequences).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import torch

from ..harmony import tool_name
from ..tokenizer import CALL, END, MESSAGE, RETURN, START, VOCAB_SIZE, get_tokenizer

_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")


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
    return get_tokenizer().encode(
        f"<|start|>assistant to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>",
        allow_special=True)


@dataclass
class _Trie:
    """Forced choice among token sequences; `done` holds the completed one's label."""
    options: dict[str, list[int]]
    pos: int = 0
    done: str | None = None

    def allowed(self) -> list[int]:
        return sorted({seq[self.pos] for seq in self.options.values()})

    def accept(self, token: int) -> None:
        self.options = {k: s for k, s in self.options.items() if s[self.pos] == token}
        self.pos += 1
        for label, seq in self.options.items():
            if len(seq) == self.pos:
                self.done = label


class ReplyConstraint:
    """Per-request logits mask. `tools`: function name -> parameters schema (None: any JSON
    object); `json_schema`: the response_format schema ({} for json_object) or None;
    `require`: None, "tool" (tool_choice required or named: `tools` holds the allowed ones)."""

    def __init__(self, tools: dict[str, dict | None], json_schema: dict | None = None,
                 require_tool: bool = False) -> None:
        self.tools = tools
        self.json_schema = json_schema
        self.require_tool = require_tool
        self.header: list[int] = []        # tokens of the header being generated
        self.in_header = True              # the prompt ended with <|start|>assistant
        self.matcher = None
        self.trie: _Trie | None = None
        self.forcing = require_tool or json_schema is not None
        self.answered = False
        self._bitmask = None
        if self.forcing:
            # First message: analysis (or, for JSON answers, straight to the final answer).
            options = {"analysis": _headers()["analysis"]}
            if json_schema is not None and not require_tool:
                options["final"] = _headers()["first_final"]
            self.trie = _Trie(options)

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
            if self.trie.done is None:
                return
            label, self.trie = self.trie.done, None
            self.in_header, self.header = False, []
            self._open(label)
            return
        if self.matcher is not None:
            self.matcher.accept_token(token)
            if self.matcher.is_terminated():
                self.matcher = None
            return
        if token == START:
            self.in_header, self.header = True, []
        elif self.in_header:
            if token == MESSAGE:
                self.in_header = False
                self._open(self._label(get_tokenizer().decode(self.header + [token])))
            else:
                self.header.append(token)
        elif token == END and self.forcing and not self.answered:
            # Analysis is over: the next message must be an allowed header.
            options = ({f"tool:{n}": _tool_header(n) for n in self.tools} if self.require_tool
                       else {"final": _headers()["final"],
                             **{f"tool:{n}": _tool_header(n) for n in self.tools}})
            self.trie = _Trie(options)

    def _label(self, header: str) -> str:
        recipient = _RECIPIENT.search(header)
        if recipient and recipient.group(1).startswith("functions."):
            return "tool:" + tool_name(recipient.group(1))
        channel = _CHANNEL.search(header)
        return channel.group(1) if channel else "final"

    def _open(self, label: str) -> None:
        """A message body begins: constrain it if it is a known call or a JSON answer."""
        import xgrammar as xgr

        if label.startswith("tool:") and label[5:] in self.tools:
            schema = self.tools[label[5:]]
            self.answered = True
            self.matcher = xgr.GrammarMatcher(
                _compiled(None if schema is None else json.dumps(schema)),
                override_stop_tokens=[CALL])
        elif label == "final" and self.json_schema is not None:
            self.answered = True
            self.matcher = xgr.GrammarMatcher(
                _compiled(json.dumps(self.json_schema) if self.json_schema else None),
                override_stop_tokens=[RETURN])
