"""Pieces of the serving and routing configs: one arithmetic model entry, the router section."""

from __future__ import annotations

import ml_collections


def model(
    name: str,
    d_model: int,
    n_layers: int,
    *,
    train_steps: int,
    seed: int = 1,
    heads: int = 4,
    lr: float = 3e-3,
    batch_size: int = 32,
    max_seq_len: int = 96,
    d_ff: int | None = None,
) -> ml_collections.ConfigDict:
    """One served/routed arithmetic LM: its name (the API's model name), dims (d_ff defaults to 3 d_model), training
    steps (0 = random weights)."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=heads,
            n_kv_heads=max(heads // 2, 1),
            head_dim=d_model // heads,
            d_ff=3 * d_model if d_ff is None else d_ff,
            max_seq_len=max_seq_len,
            train_steps=train_steps,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
        )
    )


def server(**overrides) -> ml_collections.ConfigDict:
    """Address and batching of the HTTP server (127.0.0.1 unless --config.host says otherwise)."""
    cfg = dict(
        host="127.0.0.1",
        port=8000,
        window_ms=5.0,  # a batch closes once no request has come for this long ...
        max_wait_ms=20.0,  # ... or this long after its first request
        max_batch=64,
        min_batch=1,
        default_max_tokens=32,
        log_level="warning",
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)
