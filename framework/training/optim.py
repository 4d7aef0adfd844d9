"""AdamW with linear warm-up and cosine decay, gradient clipping, weight decay on matrices only."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax


def lr_schedule(train_cfg: Mapping[str, Any]) -> optax.Schedule:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    steps, warmup = int(train_cfg["steps"]), int(train_cfg["warmup_steps"])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(train_cfg["lr"]),
        warmup_steps=min(warmup, steps),
        decay_steps=max(steps, warmup + 1),
        end_value=float(train_cfg["lr"]) * float(train_cfg["min_lr_ratio"]),
    )


def _decay_mask(params):
    # Decay projection matrices, not norm scales (1-D per layer: ndim <= 2 once stacked) or the embedding.
    def keep(path, x):
        names = [getattr(k, "key", "") for k in path]
        return x.ndim >= 3 or (x.ndim == 2 and "embed" not in names and "scale" not in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optax transformation described by `config.train` (grad_clip, lr, b1, b2, weight_decay, schedule)."""
    parts = []
    if train_cfg["grad_clip"]:
        parts.append(optax.clip_by_global_norm(float(train_cfg["grad_clip"])))
    parts.append(
        optax.adamw(
            lr_schedule(train_cfg),
            b1=float(train_cfg["b1"]),
            b2=float(train_cfg["b2"]),
            weight_decay=float(train_cfg["weight_decay"]),
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
