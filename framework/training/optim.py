"""AdamW with linear warm-up and cosine decay, gradient clipping, weight decay on matrices only; frozen groups.

Without labels the optimiser is `make_optimizer(config.train)`. With labels (`param_labels`: a label per param
leaf, from a task's label function and the `train.frozen` regexes) it is `labelled_optimizer`: frozen groups get
`optax.set_to_zero()` (no update, no weight decay, no Adam moments) and every other label its own AdamW, built from
`config.train` with that label's overrides, after one global gradient clip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from framework import config as config_lib

FROZEN = "frozen"  # the label that is always frozen (the `train.frozen` regexes assign it)
DEFAULT_LABEL = "default"  # the label of every param a task's label function does not name
LABEL_KEYS = ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2")  # per-label overrides
_SCHEDULE_KEYS = ("lr", "warmup_steps", "min_lr_ratio")


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


def _adamw(train_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    return optax.adamw(
        lr_schedule(train_cfg),
        b1=float(train_cfg["b1"]),
        b2=float(train_cfg["b2"]),
        weight_decay=float(train_cfg["weight_decay"]),
        mask=_decay_mask,
    )


def make_optimizer(train_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optax transformation described by `config.train` (grad_clip, lr, b1, b2, weight_decay, schedule)."""
    parts = []
    if train_cfg["grad_clip"]:
        parts.append(optax.clip_by_global_norm(float(train_cfg["grad_clip"])))
    parts.append(_adamw(train_cfg))
    return optax.chain(*parts)


def path_name(path) -> str:
    """A param's key path as the '/'-joined name the `train.frozen` regexes match (e.g. `layers/attn/q_proj/kernel`)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_labels(params, *, label_fn: Callable[[Any], Any] | None = None, frozen: tuple[str, ...] = ()):
    """A label (str) per leaf of `params`: `label_fn(params)`'s (default "default"), or "frozen" where the leaf's
    '/'-joined path fully matches one of the `frozen` regexes (`config.train.frozen`).

    Raises ConfigError naming a regex that does not compile or matches no param, and ValueError if `label_fn`
    returns a tree of another structure or a non-str label.
    """
    if isinstance(frozen, str) or not all(isinstance(x, str) for x in frozen):
        raise config_lib.ConfigError(f"config key 'train.frozen': expected a tuple of regexes, got {frozen!r}")
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    compiled = []
    for pattern in frozen:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as e:
            raise config_lib.ConfigError(f"config key 'train.frozen': {pattern!r} is not a regex ({e})") from e
        if not any(compiled[-1].fullmatch(n) for n in names):
            raise config_lib.ConfigError(
                f"config key 'train.frozen': {pattern!r} matches no param (regexes must match a whole '/'-joined "
                f"path); the params are {names[:12]}{' ...' if len(names) > 12 else ''}"
            )
    if label_fn is None:
        labels = jax.tree.map(lambda _: DEFAULT_LABEL, params)
    else:
        labels = label_fn(params)
        if jax.tree.structure(labels) != jax.tree.structure(params):
            raise ValueError(
                f"Task.param_labels must return a tree of the params' structure; got {jax.tree.structure(labels)} "
                f"for params {jax.tree.structure(params)}"
            )
    flat = jax.tree.leaves(labels)
    bad = [(n, lab) for n, lab in zip(names, flat) if not isinstance(lab, str)]
    if bad:
        raise ValueError(f"Task.param_labels: every label must be a str; {bad[0][0]} has {bad[0][1]!r}")
    flat = [FROZEN if any(c.fullmatch(n) for c in compiled) else lab for n, lab in zip(names, flat)]
    return jax.tree.unflatten(jax.tree.structure(params), flat)


def _check_settings(labels, settings: Mapping[str, Mapping[str, Any] | None]) -> None:
    present = set(jax.tree.leaves(labels))
    for label, over in settings.items():
        if label not in present:
            raise ValueError(
                f"Task.label_settings names label {label!r}, which no param has; the labels are {sorted(present)}"
            )
        if over is not None and (not isinstance(over, Mapping) or set(over) - set(LABEL_KEYS)):
            raise ValueError(
                f"Task.label_settings[{label!r}] = {over!r}: expected None (frozen) or a dict of some of {LABEL_KEYS}"
            )


def trainable_mask(labels, settings: Mapping[str, Mapping[str, Any] | None] | None = None):
    """True for each param leaf that trains: its label is not "frozen" and its settings are not None."""
    settings = settings or {}
    return jax.tree.map(lambda lab: lab != FROZEN and not (lab in settings and settings[lab] is None), labels)


_LABELLED: dict = {}  # equal arguments -> the same transformation, so a task trained again reuses its compiled step


def labelled_optimizer(
    train_cfg: Mapping[str, Any],
    labels,
    settings: Mapping[str, Mapping[str, Any] | None] | None = None,
    *,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """The optimiser for labelled params: frozen labels get `set_to_zero`, every other label AdamW from `train_cfg`
    updated by its `settings` (or `optimizer`, for all trainable params), after one global clip (`grad_clip`).

    Frozen gradients are zeroed first, so the clip sees the trainable gradients only.
    """
    settings = dict(settings or {})
    leaves, treedef = jax.tree.flatten(labels)
    used = ("steps", "grad_clip") + LABEL_KEYS
    key = (
        tuple(train_cfg.get(k) for k in used) if optimizer is None else optimizer,
        tuple(leaves),
        treedef,
        tuple((k, None if v is None else tuple(sorted(dict(v).items()))) for k, v in sorted(settings.items())),
    )
    if key not in _LABELLED:
        if len(_LABELLED) >= 16:
            _LABELLED.clear()
        _LABELLED[key] = _labelled_optimizer(train_cfg, labels, settings, optimizer)
    return _LABELLED[key]


def _labelled_optimizer(train_cfg, labels, settings, optimizer) -> optax.GradientTransformation:
    _check_settings(labels, settings)
    trainable = trainable_mask(labels, settings)
    if not any(jax.tree.leaves(trainable)):
        raise ValueError("every param is frozen (labels / train.frozen): nothing would train")
    zero_frozen = optax.masked(optax.set_to_zero(), jax.tree.map(lambda t: not t, trainable))
    if optimizer is not None:
        if any(v is not None for v in settings.values()):
            raise ValueError("Task.label_settings may only freeze labels (None) when Task.optimizer is given")
        groups = jax.tree.map(lambda t: "trainable" if t else FROZEN, trainable)
        inner = optax.multi_transform({"trainable": optimizer, FROZEN: optax.set_to_zero()}, groups)
        return optax.chain(zero_frozen, inner)
    transforms = {}
    for label, t in zip(jax.tree.leaves(labels), jax.tree.leaves(trainable)):
        if label not in transforms:
            transforms[label] = _adamw({**dict(train_cfg), **(settings.get(label) or {})}) if t else optax.set_to_zero()
    parts = [zero_frozen]
    if train_cfg["grad_clip"]:
        parts.append(optax.clip_by_global_norm(float(train_cfg["grad_clip"])))
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts)


def label_schedules(train_cfg: Mapping[str, Any], labels, settings) -> dict[str, optax.Schedule]:
    """`lr/<label>` -> schedule for each trainable label whose settings change the learning-rate schedule."""
    out = {}
    for label, over in (settings or {}).items():
        if over is not None and label != FROZEN and set(over) & set(_SCHEDULE_KEYS):
            out[f"lr/{label}"] = lr_schedule({**dict(train_cfg), **over})
    return out
