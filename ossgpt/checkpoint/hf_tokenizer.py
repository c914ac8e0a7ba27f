"""`tokenizer.json` and `tokenizer_config.json` for Hugging Face layout checkpoints, built offline.

Real HF gpt-oss repositories ship a `tokenizer.json` (a `tokenizers` byte-level BPE); tools such
as transformers' AutoTokenizer and llama.cpp's `convert_hf_to_gguf.py` need it. We build the same
kind of file from the verified o200k_base vocabulary (see ossgpt/tokenizer.py) plus the
o200k_harmony special tokens at the ids openai-harmony gives them, with plain JSON: no tiktoken
or tokenizers needed. The merges are derived from the ranks as transformers' TikTokenConverter
does. Building takes a few seconds, so the result is cached (`hf-tokenizer/` beside the
`encodings/` cache folder of ossgpt/tokenizer.py).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
from pathlib import Path

from .. import tokenizer as tok
from ..files import write_atomic

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_CACHE_NAME = "o200k_harmony.tokenizer.json"
_FORMAT_VERSION = "1"   # bump when the generated JSON changes, to rebuild cached copies

# o200k_base's pre-tokenizer regex (tiktoken's `o200k_base` pat_str).
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

NAMED_SPECIAL = {tok.STARTOFTEXT: "<|startoftext|>", tok.ENDOFTEXT: "<|endoftext|>",
                 tok.RETURN: "<|return|>", tok.CONSTRAIN: "<|constrain|>", tok.CHANNEL: "<|channel|>",
                 tok.START: "<|start|>", tok.END: "<|end|>", tok.MESSAGE: "<|message|>",
                 tok.CALL: "<|call|>"}


def special_tokens() -> dict[int, str]:
    """id -> text of every o200k_harmony special token (named ones and `<|reserved_N|>`)."""
    return {i: NAMED_SPECIAL.get(i, f"<|reserved_{i}|>") for i in range(tok.FIRST_SPECIAL, tok.VOCAB_SIZE)}


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_tokenizer_json() -> dict:
    """The tokenizer.json contents for o200k_harmony."""
    ranks = _read_ranks(tok.vocab_dir() / tok.VOCAB_FILE_NAME)
    table = _byte_to_unicode()
    text = lambda b: "".join(table[c] for c in b)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        # Every split of a token whose halves are both tokens is a merge producing it, at the
        # token's rank (TikTokenConverter.extract_vocab_merges_from_model).
        local = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, text(a), text(b)) for a, b in local]
    merges.sort(key=lambda m: m[0])   # stable: ties keep the order above
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in special_tokens().items()]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,
                  "vocab": {text(t): r for t, r in sorted(ranks.items(), key=lambda x: x[1])},
                  "merges": [[a, b] for _, a, b in merges]},
    }


def tokenizer_config() -> dict:
    """tokenizer_config.json: the special tokens and the model's stop/pad tokens."""
    specials = special_tokens()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials[tok.STARTOFTEXT], "eos_token": specials[tok.RETURN],
        "pad_token": specials[tok.ENDOFTEXT],
        "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i, s in specials.items()},
    }


def cached_tokenizer_json() -> Path:
    """A cached tokenizer.json for o200k_harmony (built on first use, ~30 MB)."""
    path = tok.cache_dir().parent / "hf-tokenizer" / _CACHE_NAME
    stamp = path.with_name(path.name + ".version")
    if not (path.is_file() and stamp.is_file() and stamp.read_text() == _FORMAT_VERSION):
        write_atomic(path, json.dumps(build_tokenizer_json(), ensure_ascii=False).encode())
        write_atomic(stamp, _FORMAT_VERSION.encode())
    return path


def write_hf_tokenizer(directory: str | os.PathLike) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `directory` (an HF layout checkpoint)."""
    directory = Path(directory)
    tmp = directory / (TOKENIZER_FILE + ".tmp")
    shutil.copyfile(cached_tokenizer_json(), tmp)
    os.replace(tmp, directory / TOKENIZER_FILE)
    write_atomic(directory / CONFIG_FILE, (json.dumps(tokenizer_config(), indent=2) + "\n").encode())
    return directory / TOKENIZER_FILE
