"""Optimisers for adapters: plain AdamW and LoRA+ (a larger learning rate for B, via optax.multi_transform)."""

from __future__ import annotations

import jax
import optax

from framework.peft.lora import ADAPTER_KEYS


def adapter_labels(adapters):
    """'a' / 'b' / 'm' for every leaf of an `adapter_params` tree (its last key)."""

    def label(path, _):
        key = getattr(path[-1], "key", None)
        if key not in ADAPTER_KEYS:
            raise ValueError(f"adapter leaf {jax.tree_util.keystr(path)} is not one of {ADAPTER_KEYS}")
        return key

    return jax.tree_util.tree_map_with_path(label, adapters)


def lora_plus(lr: float | optax.Schedule, ratio: float = 16.0, *, weight_decay: float = 0.0, **adamw_kwargs):
    """LoRA+ (Hayou et al. 2024): AdamW with learning rate lr for A (and DoRA's m) and ratio * lr for B."""
    if not ratio > 0:
        raise ValueError(f"LoRA+ ratio must be positive; got {ratio}")
    lr_b = (lambda step: ratio * lr(step)) if callable(lr) else ratio * lr
    make = lambda rate: optax.adamw(rate, weight_decay=weight_decay, **adamw_kwargs)  # noqa: E731
    return optax.multi_transform({"a": make(lr), "b": make(lr_b), "m": make(lr)}, adapter_labels)
