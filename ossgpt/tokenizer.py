"""The o200k_harmony tokenizer of gpt-oss, working offline.

openai-harmony downloads `o200k_base.tiktoken` on first use unless the environment variable
`TIKTOKEN_ENCODINGS_BASE` names a folder holding it; in that case it reads the file from there
and checks its sha256 (openai-harmony 0.0.8, `tiktoken_ext/public_encodings.rs`). The variable is
read on every `load_harmony_encoding` call, not once per process. The exact file ships gzipped in
the PyPI package `bpe-openai`, so we decompress it once into a cache folder and point the
variable there while the encoding loads.

Cache folder: `$OSSGPT_CACHE/encodings`, else `$XDG_CACHE_HOME/ossgpt/encodings`, else
`~/.cache/ossgpt/encodings`.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import openai_harmony
from openai_harmony import HarmonyEncodingName

from .errors import OssgptError

log = logging.getLogger(__name__)

VOCAB_FILE_NAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENCODINGS_BASE_VAR = "TIKTOKEN_ENCODINGS_BASE"

# Special tokens of o200k_harmony. Ids 199998..201087 are all special: the named ones below plus
# `<|reserved_N|>` fillers.
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
FIRST_SPECIAL = STARTOFTEXT
VOCAB_SIZE = 201088  # the model's embedding rows; openai-harmony also knows a stray id 201088


class VocabularyError(OssgptError, RuntimeError):
    """The o200k_base vocabulary file is missing, unreadable or not the expected file."""


# -- the vocabulary file -------------------------------------------------------------------------


def cache_dir() -> Path:
    """The folder where the decompressed vocabulary is kept."""
    if os.environ.get("OSSGPT_CACHE"):
        root = Path(os.environ["OSSGPT_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "ossgpt"
    else:
        root = Path.home() / ".cache" / "ossgpt"
    return root / "encodings"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_vocab_file(path: str | os.PathLike) -> Path:
    """Check that `path` is the exact o200k_base.tiktoken; raise VocabularyError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"vocabulary file {path} does not exist")
    digest = _sha256(path)
    if digest != VOCAB_SHA256:
        raise VocabularyError(
            f"vocabulary file {path} is corrupt or not o200k_base.tiktoken: "
            f"sha256 {digest}, expected {VOCAB_SHA256}; delete it to have it reinstalled"
        )
    return path


def _packaged_vocab() -> bytes:
    """The uncompressed vocabulary from the `bpe-openai` wheel."""
    # find_spec locates the package without importing it (its import builds tokenizers: ~0.6 s).
    spec = importlib.util.find_spec("bpe_openai")
    try:
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the package bpe_openai is not installed")
        source = Path(spec.submodule_search_locations[0]) / "data" / (VOCAB_FILE_NAME + ".gz")
        return gzip.decompress(source.read_bytes())
    except (OSError, EOFError) as e:  # EOFError: truncated gzip
        raise VocabularyError(
            "cannot find o200k_base.tiktoken offline: install the PyPI package `bpe-openai` "
            f"(it ships bpe_openai/data/{VOCAB_FILE_NAME}.gz), or set {ENCODINGS_BASE_VAR} "
            f"to a folder holding {VOCAB_FILE_NAME} ({e})"
        ) from e


def install_vocab(directory: str | os.PathLike | None = None) -> Path:
    """Make sure `directory` (default: `cache_dir()`) holds a verified o200k_base.tiktoken.

    A missing or corrupt file is (re)written from bpe-openai's copy. The write goes to a temporary
    file in the same folder followed by `os.replace`, so concurrent processes never see half a file.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / VOCAB_FILE_NAME
    if target.is_file():
        try:
            return verify_vocab_file(target)
        except VocabularyError as e:
            log.warning("%s; reinstalling it from bpe-openai", e)

    data = _packaged_vocab()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabularyError(
            f"bpe-openai's {VOCAB_FILE_NAME}.gz decompresses to sha256 {digest}, expected "
            f"{VOCAB_SHA256}; reinstall bpe-openai or set {ENCODINGS_BASE_VAR}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=VOCAB_FILE_NAME + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return verify_vocab_file(target)


def vocab_dir() -> Path:
    """The folder to hand openai-harmony: the user's TIKTOKEN_ENCODINGS_BASE if it holds a valid
    file, else our cache folder (installed on demand)."""
    user_dir = os.environ.get(ENCODINGS_BASE_VAR)
    if user_dir:
        try:
            verify_vocab_file(Path(user_dir) / VOCAB_FILE_NAME)
            return Path(user_dir)
        except VocabularyError as e:
            log.warning("ignoring %s=%s: %s", ENCODINGS_BASE_VAR, user_dir, e)
    return install_vocab().parent


_env_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def harmony_encoding() -> openai_harmony.HarmonyEncoding:
    """The HARMONY_GPT_OSS encoding (o200k_harmony), loaded without network access."""
    with _env_lock:
        return _load_encoding()


def _load_encoding() -> openai_harmony.HarmonyEncoding:
    directory = vocab_dir()
    previous = os.environ.get(ENCODINGS_BASE_VAR)
    # Set only while loading: harmony reads the variable inside load_harmony_encoding, and we
    # leave the process environment as we found it.
    os.environ[ENCODINGS_BASE_VAR] = str(directory)
    try:
        return openai_harmony.load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except openai_harmony.HarmonyError as e:
        path = directory / VOCAB_FILE_NAME
        raise VocabularyError(f"openai-harmony cannot load {path}: {e}") from e
    finally:
        if previous is None:
            del os.environ[ENCODINGS_BASE_VAR]
        else:
            os.environ[ENCODINGS_BASE_VAR] = previous


# -- the tokenizer -------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for gpt-oss (o200k_harmony)."""

    STARTOFTEXT = STARTOFTEXT
    ENDOFTEXT = ENDOFTEXT
    RETURN = RETURN
    CONSTRAIN = CONSTRAIN
    CHANNEL = CHANNEL
    START = START
    END = END
    MESSAGE = MESSAGE
    CALL = CALL
    vocab_size = VOCAB_SIZE

    def __init__(self, encoding: openai_harmony.HarmonyEncoding | None = None) -> None:
        self.encoding = encoding if encoding is not None else harmony_encoding()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Unless `allow_special`, text such as "<|end|>" is encoded as
        ordinary characters, so user text can never inject format tokens."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, disallowed_special=())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (special tokens as their text), which may end mid-character."""
        # HarmonyEncoding has no public decode_bytes; surrogateescape round-trips any bytes.
        text = self.encoding.decode(list(ids), errors="surrogateescape")
        return text.encode("utf-8", errors="surrogateescape")

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.encoding.decode(list(ids), errors="replace")

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a format/reserved token rather than text."""
        return token_id >= FIRST_SPECIAL

    def special_token(self, name: str) -> int:
        """The id of a special token given by its text, e.g. "<|call|>"."""
        ids = self.encode(name, allow_special=True)
        if len(ids) != 1 or not self.is_special(ids[0]):
            raise KeyError(f"{name!r} is not a special token")
        return ids[0]


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared Tokenizer."""
    return Tokenizer()


class IncrementalDecoder:
    """Turns a stream of token ids into text, holding back bytes of a character that is split
    across tokens (o200k_base splits many emoji and CJK characters) until it is complete."""

    def __init__(self, tokenizer: Tokenizer | None = None, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; return the text it completes (often "", sometimes several chars)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
