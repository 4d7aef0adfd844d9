"""Tokenizers behind one protocol, the two character tokenizers, and token-id validation for every boundary.

Glossary: B batch, T tokens, V vocab.

A `Tokenizer` (the protocol below) turns text into int32 ids and back: `encode(text)` adds no BOS/EOS (the data
pipeline and generation add them), `decode(ids)` skips PAD/BOS and stops at the first EOS, `decode_batch(ids_BT)`
decodes each row. `pad_id`, `bos_id` and `eos_id` are None where a tokenizer has no such token (Llama has no pad).

The implementations, each named in `LMConfig.tokenizer` and built by `get_tokenizer(name_or_path)`:

  "arith"  the arithmetic task's characters. Ids: PAD = 0, BOS = 1, EOS = 2, then the characters of `ALPHABET` in
           order (ids 3..23), so VOCAB_SIZE = 24. "!" and "?" are reserved for later formats (e.g. a correction
           marker) and never occur in the base task. Existing checkpoints depend on these ids: they never change.
  "text"   printable text (dialogues, messages, tool calls). Ids: PAD = 0, BOS = 1, EOS = 2, then `TEXT_ALPHABET`
           in code-point order: "\\t" = 3, "\\n" = 4, " " = 5, and every printable ASCII character up to "~" = 99,
           so id = ord(c) - 27 for " " <= c <= "~" and TEXT_VOCAB_SIZE = 100.
  "hf"     the `tokenizers` tokenizer.json shipped with an imported checkpoint (`hf_tokenizer.HFTokenizer`); a
           path to a tokenizer.json or to an HF checkpoint folder names one directly.

Out-of-alphabet input to a character tokenizer raises ValueError naming the character and its position.

JAX gathers clamp out-of-range indices silently, so ids are validated in numpy (`check_token_ids`) wherever they
enter the model: data batches, generation prompts, decoding.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3
ALPHABET = "0123456789+-*=%QA \n!?"
VOCAB_SIZE = NUM_SPECIAL + len(ALPHABET)
assert VOCAB_SIZE == 24, VOCAB_SIZE

TEXT_ALPHABET = "\t\n" + "".join(map(chr, range(ord(" "), ord("~") + 1)))  # code-point order
TEXT_VOCAB_SIZE = NUM_SPECIAL + len(TEXT_ALPHABET)
assert TEXT_VOCAB_SIZE == 100 and TEXT_ALPHABET[:3] == "\t\n " and TEXT_ALPHABET[-1] == "~", TEXT_ALPHABET

# Names `get_tokenizer` and `LMConfig.tokenizer` accept besides a path; "hf" needs the checkpoint folder.
HF = "hf"


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers the data pipeline, generation and evaluation."""

    name: str
    vocab_size: int
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32, 1-D) of `text`, no BOS/EOS added."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D id sequence: special tokens skipped, stops at the first EOS."""
        ...

    def decode_batch(self, ids) -> list[str]:
        """`decode` each row of a 2-D [B, T] id array."""
        ...


def check_token_ids(ids, vocab_size: int, *, where: str) -> np.ndarray:
    """Raise ValueError if any id is outside [0, vocab_size); returns the ids as a numpy array.

    The error names the first offending id, its position (a tuple index) and `where` (e.g. "data batch").
    """
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if np.any(bad):
        pos = tuple(int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: token id {int(arr[pos])} at position {pos} is outside [0, {vocab_size}) (shape {arr.shape})"
        )
    return arr


def _decode_rows(tokenizer: Tokenizer, ids) -> list[str]:
    arr = check_token_ids(ids, tokenizer.vocab_size, where="decode_batch")
    if arr.ndim != 2:
        raise ValueError(f"decode_batch expects a 2-D [B, T] array, got shape {arr.shape}")
    return [tokenizer.decode(row) for row in arr]


class CharTokenizer:
    """One id per character of an ASCII `alphabet`, after PAD = 0, BOS = 1, EOS = 2.

    `CharTokenizer()` is the arithmetic tokenizer ("arith"); `TEXT_TOKENIZER` is the printable-text one ("text").
    """

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __init__(self, alphabet: str = ALPHABET, name: str = "arith", *, describe: str | None = None):
        if not alphabet or len(set(alphabet)) != len(alphabet) or any(ord(c) >= 128 for c in alphabet):
            raise ValueError(f"alphabet = {alphabet!r}; expected distinct ASCII characters")
        self.alphabet, self.name = alphabet, name
        self.vocab_size = NUM_SPECIAL + len(alphabet)
        self._describe = describe or repr(alphabet)
        self._id_to_char = ("",) * NUM_SPECIAL + tuple(alphabet)
        # code point -> id for code points < 128; -1 where the character is not in the alphabet.
        self._char_to_id = np.full(128, -1, np.int32)
        for i, c in enumerate(alphabet):
            self._char_to_id[ord(c)] = NUM_SPECIAL + i

    def __repr__(self) -> str:
        return f"CharTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32) of `text`, no BOS/EOS added; ValueError naming the first unknown character."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not text:
            return np.zeros(0, np.int32)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.where(codes < 128, self._char_to_id[np.minimum(codes, 127)], -1)
        if np.any(ids < 0):
            pos = int(np.argmax(ids < 0))
            raise ValueError(
                f"character {text[pos]!r} at position {pos} is not in the {self.name!r} tokenizer alphabet "
                f"{self._describe}"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D id sequence: PAD and BOS skipped, stops at the first EOS; bad ids raise ValueError."""
        arr = check_token_ids(ids, self.vocab_size, where="decode")
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D id sequence, got shape {arr.shape}; use decode_batch")
        eos = np.flatnonzero(arr == EOS_ID)
        if eos.size:
            arr = arr[: eos[0]]
        return "".join(self._id_to_char[i] for i in arr.tolist())

    def decode_batch(self, ids) -> list[str]:
        """`decode` each row of a 2-D [B, T] id array."""
        return _decode_rows(self, ids)


TOKENIZER = CharTokenizer()
TEXT_TOKENIZER = CharTokenizer(
    TEXT_ALPHABET, "text", describe="(printable ASCII ' '..'~', '\\n' and '\\t'; no other control characters)"
)
assert TEXT_TOKENIZER.encode(" ~")[0] == ord(" ") - 27 and TEXT_TOKENIZER.encode("~")[0] == TEXT_VOCAB_SIZE - 1
BUILTIN = {"arith": TOKENIZER, "text": TEXT_TOKENIZER}


def encode(text: str) -> np.ndarray:
    """Arithmetic-tokenizer ids (int32) of `text`, no BOS/EOS added; ValueError naming the first unknown character."""
    return TOKENIZER.encode(text)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Arithmetic-tokenizer text of a 1-D id sequence: PAD and BOS skipped, stops at the first EOS."""
    return TOKENIZER.decode(ids)


def decode_batch(ids) -> list[str]:
    """`decode` each row of a 2-D [B, T] id array with the arithmetic tokenizer."""
    return TOKENIZER.decode_batch(ids)


def is_tokenizer_path(name: str) -> bool:
    """Whether `name` (an `LMConfig.tokenizer` value) reads as a path: a *.json file or a folder, not a name."""
    return name.endswith(".json") or "/" in name or os.sep in name or name in (".", "..")


def check_tokenizer_name(name) -> str:
    """Raise ValueError unless `name` is "arith", "text", "hf" or a path; returns it. Touches no file."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer = {name!r}; expected a non-empty str")
    if name not in BUILTIN and name != HF and not is_tokenizer_path(name):
        raise ValueError(
            f"tokenizer = {name!r} is not one of {[*BUILTIN, HF]} nor a path to a tokenizer.json or an HF checkpoint "
            "folder (a path contains '/' or ends in .json)"
        )
    return name


def get_tokenizer(name_or_path: str | os.PathLike | Tokenizer, *, folder: str | os.PathLike | None = None):
    """The tokenizer named "arith", "text" or "hf", or the HF tokenizer at a tokenizer.json / checkpoint-folder path.

    "hf" is the tokenizer.json of the imported checkpoint in `folder` (what `hf.load_hf_checkpoint` names in
    `LMConfig.tokenizer`); its special ids come from the folder's config.json and tokenizer_config.json. A
    `Tokenizer` instance is returned as it is.
    """
    if isinstance(name_or_path, Tokenizer) and not isinstance(name_or_path, (str, os.PathLike)):
        return name_or_path
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    name = check_tokenizer_name(name_or_path)
    if name in BUILTIN:
        return BUILTIN[name]
    from framework.tasks.hf_tokenizer import HFTokenizer

    if name == HF:
        if folder is None:
            raise ValueError(
                "tokenizer = 'hf' names the tokenizer.json of an imported checkpoint: pass its folder "
                "(get_tokenizer('hf', folder=path)) or give the path itself"
            )
        return HFTokenizer.from_pretrained(folder)
    return HFTokenizer.from_pretrained(pathlib.Path(name))


def tokenizer_for(cfg, *, folder: str | os.PathLike | None = None):
    """The tokenizer `cfg.tokenizer` names (an LMConfig), checked to fit the model: every id it emits and its
    special ids are inside `cfg.vocab_size`, and the BOS/EOS/PAD the model config uses are the tokenizer's."""
    tok = get_tokenizer(cfg.tokenizer, folder=folder)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.name!r} has {tok.vocab_size} ids, more than model.vocab_size = {cfg.vocab_size}"
        )
    check_special_ids(cfg, tok)
    return tok


def check_special_ids(cfg, tok) -> None:
    """Raise ValueError if the model config's BOS/EOS/PAD disagree with a tokenizer's (None on either side passes:
    a tokenizer without a pad leaves the model's padding id free, as HF's imported configs have it)."""
    pairs = [("bos_id", cfg.bos_id, tok.bos_id), ("pad_id", cfg.pad_id, tok.pad_id)]
    bad = [f"model.{f}={m} but the tokenizer's is {t}" for f, m, t in pairs if None not in (m, t) and m != t]
    if tok.eos_id is not None and tuple(cfg.eos_ids) and tok.eos_id not in cfg.eos_ids:
        bad.append(f"model.eos_ids={tuple(cfg.eos_ids)} lacks the tokenizer's EOS {tok.eos_id}")
    if bad:
        raise ValueError(f"model config and tokenizer {tok.name!r} disagree: " + "; ".join(bad))
