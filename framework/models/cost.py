"""FLOPs conventions of the decoder LM: `flops` for inference (every study's cost figure), `flops_per_token` for MFU.

Glossary: N matmul weights, L layers, H heads, Dh head dim, n tokens of a sequence. Both are re-exported by
`framework.models.lm` (`lm.flops`, `lm.flops_per_token`) and computed from the config alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from framework.models.config import LMConfig


def _matmul_params(c: LMConfig) -> int:
    """Weights a token multiplies through: q/k/v/o projections, the gated MLP, the output layer (and the taps of a
    `short_conv`, one multiply-add per tap and channel)."""
    per_layer = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.d_model * c.d_ff
    per_layer += c.short_conv * c.d_model
    return c.n_layers * per_layer + c.d_model * c.vocab_size


def flops_per_token(cfg: LMConfig | Mapping[str, Any], seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B): 2N per matmul param + 4·L·T·H·Dh for attention, ×3 when training.

    N counts matmul parameters (projections, MLP, output layer); the embedding gather is free. Attention counts
    the full T×T score matrix, as is conventional for MFU, even though causal masking could skip half of it.
    """
    c = LMConfig.from_config(cfg)
    fwd = 2 * _matmul_params(c) + 4 * c.n_layers * seq_len * c.n_heads * c.head_dim
    return float(3 * fwd if training else fwd)


def _visible_pairs(n: np.ndarray, window: int | None) -> np.ndarray:
    """(query, key) pairs a causal pass over n tokens computes: sum over t < n of min(t + 1, window)."""
    if window is None:
        return n * (n + 1) / 2
    m = np.minimum(n, window)
    return m * (m + 1) / 2 + (n - m) * window


def flops(cfg: LMConfig | Mapping[str, Any], prompt_tokens, new_tokens) -> float | np.ndarray:
    """Inference FLOPs of a prefill of `prompt_tokens` tokens followed by `new_tokens` decoded ones (per row).

    The one cost convention of Lumen's studies (search, verifiers, routing, agents). For a sequence of
    n = prompt_tokens + new_tokens tokens (each of them passes the model once: the prompt in the prefill, every
    generated token in the step that feeds it back; counting the last one too keeps scoring a text and generating it
    the same cost):
      matmuls   2 · N · n, with N the matmul weights (q/k/v/o projections, gated MLP, output layer; as
                `flops_per_token`; the embedding gather, norms, softmax and RoPE are free);
      attention 4 · H · Dh per (query, visible key) pair per layer (q·k and p·v, one multiply-add = 2 FLOPs): the
                token at position t sees min(t + 1, window) keys (causal; a layer's sliding window caps it), so a
                full-attention layer computes n(n+1)/2 pairs, not the n² of the MFU convention.
    A KV cache does not change the count (decode steps read the prefix's keys instead of recomputing them: the
    pairs are the same). `prompt_tokens` and `new_tokens` are ints or numpy arrays of per-row counts (broadcast);
    a scalar pair returns a float, arrays return a float64 array. Summing the per-call figures of a run gives its
    cost (the attention term is not additive over calls, the matmul term is).
    """
    c = LMConfig.from_config(cfg)
    counts = []
    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
        a = np.asarray(value)
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"lm.flops: {name} must be token counts (ints), got {value!r}")
        if np.any(a < 0) or np.any(a != np.round(a)):
            raise ValueError(f"lm.flops: {name} must be whole numbers >= 0, got {value!r}")
        counts.append(a.astype(np.float64))
    n = counts[0] + counts[1]
    pairs = sum(_visible_pairs(n, w) for w in c.layer_windows)
    out = 2.0 * _matmul_params(c) * n + 4.0 * c.n_heads * c.head_dim * pairs
    return float(out) if np.ndim(out) == 0 else out
