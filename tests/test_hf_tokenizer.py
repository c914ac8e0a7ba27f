"""The tokenizer.json written into Hugging Face layout checkpoints (ossgpt/checkpoint/hf_tokenizer.py)
must tokenize exactly as openai-harmony's o200k_harmony does."""

import hashlib
import json
from pathlib import Path

import pytest

from ossgpt.checkpoint.hf_tokenizer import write_hf_tokenizer
from ossgpt.tokenizer import get_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "Hello, world! I'm here; they'LL see.",
    "héllo naïve café — “quotes” … 12345678 3.14",
    "日本語のテキストと中文字符 emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷",
    "tabs\tand\nnewlines\r\n  indented\n\n\n   x",
    "def f(x):\n    return x**2  # comment ///",
]
SPECIALS = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
            "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
            "<|message|>": 200008, "<|call|>": 200012, "<|reserved_200000|>": 200000,
            "<|reserved_201087|>": 201087}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(directory)
    return directory


def test_encodes_like_harmony(hf_dir):
    fast = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    harmony = get_tokenizer()
    for text in TEXTS:
        ids = fast.encode(text, add_special_tokens=False).ids
        assert ids == harmony.encode(text), text
        assert fast.decode(ids) == text
    rendered = "<|start|>user<|message|>Hi there<|end|><|start|>assistant<|channel|>final<|message|>"
    assert fast.encode(rendered).ids == harmony.encode(rendered, allow_special=True)
    assert fast.get_vocab_size() == 201088


def test_special_tokens_and_config(hf_dir):
    fast = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text, i in SPECIALS.items():
        assert fast.token_to_id(text) == i
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert not list(hf_dir.glob("*.tmp"))


def test_transformers_and_llama_cpp_recognise_it(hf_dir):
    """AutoTokenizer loads it, and the pre-tokenizer hash llama.cpp's convert_hf_to_gguf.py
    computes (get_vocab_base_pre) is the one it maps to "gpt-4o" (o200k)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (199998, 200002, 199999)
    chktxt = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
              "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
              "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
              "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
    digest = hashlib.sha256(str(tok.encode(chktxt)).encode()).hexdigest()
    assert digest == "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e"


def test_hf_checkpoints_ship_a_tokenizer(tiny_hf, tiny_original):
    assert (tiny_hf / "tokenizer.json").is_file() and (tiny_hf / "tokenizer_config.json").is_file()
    assert not (tiny_original / "tokenizer.json").exists()
