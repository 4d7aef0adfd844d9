"""Hugging Face `tokenizers` (tokenizer.json) behind Lumen's `Tokenizer` protocol, for imported checkpoints.

Glossary: B batch, T tokens, V vocab.

  tok = HFTokenizer.from_pretrained("path/to/hf_folder")   # tokenizer.json + the folder's special ids
  ids = tok.encode("Hello")                                  # int32, no BOS/EOS (the pipeline adds them)
  text = tok.decode(ids_T)                                   # special tokens skipped, stops at the first EOS

Special ids are read, never invented: each of BOS, EOS and PAD comes from the checkpoint's config.json
(`bos_token_id`, `eos_token_id`, `pad_token_id`), else from tokenizer_config.json (`bos_token`, ... looked up in
the vocabulary), else (PAD only) from tokenizer.json's padding setting, else it is None (Llama has no pad). A list
of EOS ids (Llama 3's `eos_token_id`) gives `eos_ids`; `eos_id` is its first.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from framework.tasks.tokenizer import check_token_ids

TOKENIZER_FILE = "tokenizer.json"
_SPECIALS = ("bos", "eos", "pad")


def read_tokenizer_file(path: str | os.PathLike):
    """(`tokenizers.Tokenizer`, its file) for an HF checkpoint folder or a tokenizer.json path.

    FileNotFoundError when there is no tokenizer.json: only the `tokenizers` JSON format is loaded (a sentencepiece
    `tokenizer.model` must be converted first, e.g. with transformers' `AutoTokenizer(...).save_pretrained`).
    """
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    file = path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE
    if not file.exists():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} in {path} (found {found}); only the `tokenizers` JSON format is loaded: convert "
            "a sentencepiece tokenizer.model with transformers' AutoTokenizer(...).save_pretrained first"
        )
    return Tokenizer.from_file(str(file)), file


class HFTokenizer:
    """A `tokenizers.Tokenizer` with Lumen's protocol: int32 ids, explicit special ids (None where absent)."""

    def __init__(
        self,
        tokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: int | Sequence[int] | None = (),
        pad_id: int | None = None,
        name: str = "hf",
    ):
        self._tok = tokenizer
        self.name = name
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        eos = () if eos_ids is None else (eos_ids,) if isinstance(eos_ids, (int, np.integer)) else eos_ids
        self.eos_ids = tuple(int(e) for e in eos)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.pad_id = None if pad_id is None else int(pad_id)
        for field, value in (("bos_id", self.bos_id), ("pad_id", self.pad_id), *(("eos_ids", e) for e in self.eos_ids)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{field} = {value} is outside the tokenizer's vocabulary [0, {self.vocab_size})")

    @property
    def eos_id(self) -> int | None:
        """The first EOS id (None if the tokenizer has none); `eos_ids` holds them all."""
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def tokenizer(self):
        """The wrapped `tokenizers.Tokenizer` (e.g. for `hf.save_hf_checkpoint(..., tokenizer=tok.tokenizer)`)."""
        return self._tok

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id})"
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> HFTokenizer:
        """Loads `path` (an HF checkpoint folder or a tokenizer.json) with its special ids; `overrides` (bos_id,
        eos_ids, pad_id, name) win. FileNotFoundError when there is no tokenizer.json."""
        tok, file = read_tokenizer_file(path)
        kw: dict[str, Any] = dict(special_ids(tok, file.parent), name=str(path))
        kw.update(overrides)
        return cls(tok, **kw)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32) of `text` with no special tokens added (no BOS/EOS: the pipeline adds them)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # tokenizers raises a bare Exception, e.g. WordLevel without an unk token
            raise ValueError(f"tokenizer {self.name!r} cannot encode {text[:80]!r}: {e}") from None
        return np.asarray(ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D id sequence, cut at the first EOS; special tokens (PAD, BOS, ...) skipped unless asked."""
        arr = check_token_ids(ids, self.vocab_size, where="decode")
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D id sequence, got shape {arr.shape}; use decode_batch")
        if self.eos_ids:
            stop = np.flatnonzero(np.isin(arr, self.eos_ids))
            if stop.size:
                arr = arr[: stop[0]]
        return self._tok.decode(arr.tolist(), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        """`decode` each row of a 2-D [B, T] id array."""
        arr = check_token_ids(ids, self.vocab_size, where="decode_batch")
        if arr.ndim != 2:
            raise ValueError(f"decode_batch expects a 2-D [B, T] array, got shape {arr.shape}")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in arr]


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...} (an AddedToken)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_ids(tok, folder: str | os.PathLike) -> dict[str, Any]:
    """{"bos_id", "eos_ids", "pad_id"} of a `tokenizers.Tokenizer` whose checkpoint folder is `folder`.

    Each from config.json's *_token_id, else tokenizer_config.json's *_token (by vocabulary lookup), else (PAD)
    the tokenizer's padding setting, else None / ().
    """
    folder = pathlib.Path(folder)
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    found: dict[str, Any] = {}
    for kind in _SPECIALS:
        value = config.get(f"{kind}_token_id")
        if value is None:
            content = _token_content(tok_config.get(f"{kind}_token"))
            value = None if content is None else tok.token_to_id(content)
        if value is None and kind == "pad" and tok.padding:
            value = tok.padding.get("pad_id")
        found[kind] = value
    eos = found["eos"]
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return {"bos_id": found["bos"], "eos_ids": eos_ids, "pad_id": found["pad"]}


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    if not file.exists():
        return {}
    data = json.loads(file.read_text())
    return data if isinstance(data, dict) else {}
