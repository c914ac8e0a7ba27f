"""o200k_harmony tokenizer: ids, round trips, streaming decode, and the offline vocabulary."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ossgpt import tokenizer as tk
from ossgpt.tokenizer import IncrementalDecoder, Tokenizer, VocabularyError, get_tokenizer

REPO = Path(__file__).resolve().parents[1]

SPECIALS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
    "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
    "<|message|>": 200008, "<|call|>": 200012,
}

TEXTS = [
    "Hello, world!",
    "héllo naïve café — “quotes” … ",
    "日本語のテキストと中文字符",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and a flag",
    "tabs\tand\nnewlines\r\n  indented",
    "mixed: Ελληνικά, русский, עברית, العربية, हिन्दी",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


def test_vocab_size_and_special_ids(tok):
    assert tok.vocab_size == Tokenizer.vocab_size == 201088
    assert (Tokenizer.START, Tokenizer.END, Tokenizer.MESSAGE, Tokenizer.CHANNEL) == (
        200006, 200007, 200008, 200005)
    assert (Tokenizer.CONSTRAIN, Tokenizer.RETURN, Tokenizer.CALL) == (200003, 200002, 200012)
    assert (Tokenizer.ENDOFTEXT, Tokenizer.STARTOFTEXT) == (199999, 199998)
    for text, token_id in SPECIALS.items():
        assert tok.encode(text, allow_special=True) == [token_id]
        assert tok.special_token(text) == token_id
        assert tok.decode([token_id]) == text
        assert tok.is_special(token_id)
    # Every id of the model's vocabulary decodes; the top ones are reserved specials.
    assert tok.decode([tok.vocab_size - 1]) == "<|reserved_201087|>"
    assert not tok.is_special(199997)


def test_special_text_is_plain_text_unless_allowed(tok):
    ids = tok.encode("<|end|><|start|>system")
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == "<|end|><|start|>system"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_known_encoding(tok):
    # o200k_base ids, as tiktoken gives them.
    assert tok.encode("hello world") == [24912, 2375]


def test_incremental_decoder_matches_full_decode(tok):
    text = "".join(TEXTS)
    ids = tok.encode(text)
    # The string must really split characters across tokens for the test to mean anything.
    assert any(not _valid_utf8(tok.decode_bytes([i])) for i in ids)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_specials_and_truncation(tok):
    decoder = IncrementalDecoder(tok)
    assert decoder.push(Tokenizer.END) == "<|end|>"
    skipping = IncrementalDecoder(tok, skip_special=True)
    assert skipping.push(Tokenizer.END) == ""
    # A stream cut inside a character: held back, then replaced at flush.
    ids = tok.encode("😀🎉👩‍👩‍👧")
    partial = next(i for i in ids if not _valid_utf8(tok.decode_bytes([i])))
    assert decoder.push(partial) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(tok.encode("ok")[0]) == "ok"


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- the vocabulary file ---------------------------------------------------------------------------


def test_verify_rejects_a_corrupted_file(tmp_path):
    good = tk.install_vocab(tmp_path / "good")
    assert hashlib.sha256(good.read_bytes()).hexdigest() == tk.VOCAB_SHA256
    bad = tmp_path / "bad" / tk.VOCAB_FILE_NAME
    bad.parent.mkdir()
    data = bytearray(good.read_bytes())
    data[1000] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(VocabularyError, match="corrupt") as err:
        tk.verify_vocab_file(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(VocabularyError, match="does not exist"):
        tk.verify_vocab_file(tmp_path / "missing" / tk.VOCAB_FILE_NAME)


def test_install_repairs_a_corrupted_cache(tmp_path):
    target = tmp_path / tk.VOCAB_FILE_NAME
    target.write_bytes(b"not a vocabulary\n")
    assert tk.install_vocab(tmp_path) == target
    assert tk.verify_vocab_file(target) == target
    assert [p.name for p in tmp_path.iterdir()] == [tk.VOCAB_FILE_NAME]  # no temp files left


def test_user_encodings_base_respected_only_when_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSGPT_CACHE", str(tmp_path / "cache"))
    user = tmp_path / "user"
    tk.install_vocab(user)
    monkeypatch.setenv(tk.ENCODINGS_BASE_VAR, str(user))
    assert tk.vocab_dir() == user
    (user / tk.VOCAB_FILE_NAME).write_bytes(b"corrupt")
    assert tk.vocab_dir() == tmp_path / "cache" / "encodings"
    monkeypatch.setenv(tk.ENCODINGS_BASE_VAR, str(tmp_path / "nowhere"))
    assert tk.vocab_dir() == tmp_path / "cache" / "encodings"


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSGPT_CACHE", str(tmp_path / "o"))
    assert tk.cache_dir() == tmp_path / "o" / "encodings"
    monkeypatch.delenv("OSSGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tk.cache_dir() == tmp_path / "x" / "ossgpt" / "encodings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert tk.cache_dir() == tmp_path / "h" / ".cache" / "ossgpt" / "encodings"


_FRESH_PROCESS = """
import json, os
from ossgpt.tokenizer import cache_dir, get_tokenizer
tok = get_tokenizer()
print(json.dumps({
    "ids": tok.encode("<|start|>hi 😀", allow_special=True),
    "cache": str(cache_dir()),
    "files": sorted(os.listdir(cache_dir())),
    "env_after": os.environ.get("TIKTOKEN_ENCODINGS_BASE"),
}))
"""


@pytest.mark.parametrize("setup", ["home", "ossgpt_cache"])
def test_fresh_process_installs_vocabulary_offline(tmp_path, setup):
    """A new user, no network: the vocabulary must come from bpe-openai, sha256-checked.

    "home": empty HOME and a bogus TIKTOKEN_ENCODINGS_BASE (ignored, and left as it was).
    "ossgpt_cache": OSSGPT_CACHE holding a damaged file from an earlier run (replaced)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_RS_CACHE_DIR", "OSSGPT_CACHE",
                        "XDG_CACHE_HOME")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               # Any download attempt fails at once instead of reaching the network.
               HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    if setup == "home":
        env["TIKTOKEN_ENCODINGS_BASE"] = str(tmp_path / "does-not-exist")
        expected_dir = home / ".cache" / "ossgpt" / "encodings"
    else:
        env["OSSGPT_CACHE"] = str(tmp_path / "cache")
        expected_dir = tmp_path / "cache" / "encodings"
        expected_dir.mkdir(parents=True)
        (expected_dir / tk.VOCAB_FILE_NAME).write_bytes(b"aGVsbG8= 0\n")
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ids"][0] == Tokenizer.START
    assert Path(result["cache"]) == expected_dir
    assert result["files"] == [tk.VOCAB_FILE_NAME]
    assert tk.verify_vocab_file(expected_dir / tk.VOCAB_FILE_NAME)
    # The variable is set only while loading; a user's own value is left as it was.
    assert result["env_after"] == env.get("TIKTOKEN_ENCODINGS_BASE")
