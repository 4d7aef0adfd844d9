"""Character-level tokenizer for the arithmetic task, and token-id validation for every boundary.

Ids: PAD = 0, BOS = 1, EOS = 2, then the characters of `ALPHABET` in order (ids 3..23), so VOCAB_SIZE = 24.
"!" and "?" are reserved for later formats (e.g. a correction marker) and never occur in the base task.

JAX gathers clamp out-of-range indices silently, so ids are validated in numpy (`check_token_ids`) wherever they
enter the model: data batches, generation prompts, decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3
ALPHABET = "0123456789+-*=%QA \n!?"
VOCAB_SIZE = NUM_SPECIAL + len(ALPHABET)
assert VOCAB_SIZE == 24, VOCAB_SIZE

_ID_TO_CHAR = ("", "", "") + tuple(ALPHABET)
# code point -> id for code points < 128; -1 where the character is not in the alphabet.
_CHAR_TO_ID = np.full(128, -1, np.int32)
for _i, _c in enumerate(ALPHABET):
    _CHAR_TO_ID[ord(_c)] = NUM_SPECIAL + _i


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


class CharTokenizer:
    """Character tokenizer over `ALPHABET` plus PAD/BOS/EOS; HF-style attributes so others can be swapped in."""

    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    alphabet: str = ALPHABET

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32) of `text`, no BOS/EOS added; ValueError naming the first unknown character."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not text:
            return np.zeros(0, np.int32)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.where(codes < 128, _CHAR_TO_ID[np.minimum(codes, 127)], -1)
        if np.any(ids < 0):
            pos = int(np.argmax(ids < 0))
            raise ValueError(f"character {text[pos]!r} at position {pos} is not in the tokenizer alphabet {ALPHABET!r}")
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D id sequence: PAD and BOS skipped, stops at the first EOS; bad ids raise ValueError."""
        arr = check_token_ids(ids, VOCAB_SIZE, where="decode")
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D id sequence, got shape {arr.shape}; use decode_batch")
        eos = np.flatnonzero(arr == EOS_ID)
        if eos.size:
            arr = arr[: eos[0]]
        return "".join(_ID_TO_CHAR[i] for i in arr.tolist())

    def decode_batch(self, ids) -> list[str]:
        """`decode` each row of a 2-D [B, T] id array."""
        arr = check_token_ids(ids, VOCAB_SIZE, where="decode_batch")
        if arr.ndim != 2:
            raise ValueError(f"decode_batch expects a 2-D [B, T] array, got shape {arr.shape}")
        return [self.decode(row) for row in arr]


TOKENIZER = CharTokenizer()


def encode(text: str) -> np.ndarray:
    """Token ids (int32) of `text`, no BOS/EOS added; ValueError naming the first unknown character."""
    return TOKENIZER.encode(text)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of a 1-D id sequence: PAD and BOS skipped, stops at the first EOS; bad ids raise ValueError."""
    return TOKENIZER.decode(ids)


def decode_batch(ids) -> list[str]:
    """`decode` each row of a 2-D [B, T] id array."""
    return TOKENIZER.decode_batch(ids)
