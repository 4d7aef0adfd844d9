"""Text embedders for the vector-searching memory stores: a Lumen LM's hidden states, and a hashed-trigram baseline.

Glossary: N texts, B batch, T tokens, D model width (= embedding width for the LM embedder).

An embedder has a `name` (recorded in the store's file, so a store is never reopened with another embedder), a
width `dim`, and `__call__(texts) -> x_ND`: float32, one L2-normalised row per text.

- `LMEmbedder(params, cfg)`: the mean over a text's tokens (BOS included) of the activation at a hookpoint
  (default "final_norm") of a Lumen LM, captured with `lm.forward(..., capture=...)`. Texts are tokenized with the
  model's tokenizer (out-of-alphabet characters raise ValueError naming them) and padded to a power-of-two length
  so a few jit shapes serve every batch.
- `HashEmbedder(dim)`: character trigrams of each word hashed (crc32) into `dim` signed buckets. No model, exact
  and cheap: a strong baseline for matching names, and what the benchmarks use to isolate storage costs.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["Embedder", "HashEmbedder", "LMEmbedder"]


class Embedder:
    """The embedder interface (see the module docstring)."""

    name: str
    dim: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


def _normalise(x_ND: np.ndarray) -> np.ndarray:
    norm_N1 = np.linalg.norm(x_ND, axis=-1, keepdims=True)
    return (x_ND / np.maximum(norm_N1, 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=1 << 16)
def _trigram_features(word: str, dim: int) -> tuple[tuple[int, float], ...]:
    """(column, sign) of each character trigram of `#word#` (cached: ledger texts reuse few words)."""
    w = f"#{word}#"
    out = []
    for i in range(len(w) - 2):
        h = zlib.crc32(w[i : i + 3].encode())
        out.append((h % dim, 1.0 if (h >> 20) & 1 else -1.0))
    return tuple(out)


class HashEmbedder(Embedder):
    """Signed hashed character trigrams of the words of a text, L2-normalised (deterministic, no model)."""

    def __init__(self, dim: int = 256):
        if int(dim) <= 0:
            raise ValueError(f"dim = {dim}; expected a positive embedding width")
        self.dim = int(dim)
        self.name = f"hash{self.dim}"

    def _word(self, word: str) -> tuple[tuple[int, float], ...]:
        return _trigram_features(word, self.dim)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        x_ND = np.zeros((len(texts), self.dim), np.float32)
        for n, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                for j, s in self._word(word):
                    x_ND[n, j] += s
        return _normalise(x_ND)


class LMEmbedder(Embedder):
    """Mean-pooled hidden states of a Lumen LM at `hookpoint` (see the module docstring)."""

    def __init__(self, params, cfg, *, hookpoint: str = "final_norm", tokenizer=None, batch_size: int = 64):
        import jax
        import jax.numpy as jnp

        from framework.models import lm
        from framework.tasks import tokenizer as tokenizer_lib

        self.cfg = lm.LMConfig.from_config(cfg)
        lm._parse_hookpoint(hookpoint, self.cfg)  # ValueError for an unknown hookpoint, before any jit
        self.tokenizer = tokenizer or tokenizer_lib.get_tokenizer(self.cfg.tokenizer)
        self.params, self.hookpoint, self.batch_size = params, hookpoint, int(batch_size)
        self.dim = self.cfg.d_model
        self.name = f"lm:{hookpoint}:d{self.dim}"

        @jax.jit
        def pooled(params, tokens_BT, mask_BT):
            h_BTD = lm.forward(params, tokens_BT, self.cfg, capture=(hookpoint,)).captured[hookpoint]
            m_BT1 = mask_BT[..., None].astype(jnp.float32)
            return (h_BTD.astype(jnp.float32) * m_BT1).sum(1) / jnp.maximum(m_BT1.sum(1), 1.0)

        self._pooled = pooled

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ids = [np.concatenate([[self.tokenizer.bos_id], self.tokenizer.encode(t)]) for t in texts]
        longest = max((len(i) for i in ids), default=1)
        if longest > self.cfg.max_seq_len:
            raise ValueError(
                f"a text of {longest - 1} tokens exceeds the embedder's max_seq_len {self.cfg.max_seq_len}"
            )
        T = min(1 << (longest - 1).bit_length(), self.cfg.max_seq_len)
        out = []
        for lo in range(0, len(ids), self.batch_size):
            chunk = ids[lo : lo + self.batch_size]
            tokens_BT = np.zeros((self.batch_size, T), np.int32)
            mask_BT = np.zeros((self.batch_size, T), bool)
            for b, row in enumerate(chunk):
                tokens_BT[b, : len(row)], mask_BT[b, : len(row)] = row, True
            out.append(np.asarray(self._pooled(self.params, tokens_BT, mask_BT))[: len(chunk)])
        x_ND = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return _normalise(x_ND)
