"""Activation store: harvest several hookpoints of a Lumen LM in one forward pass into memory-mapped .npy files.

Layout of a store directory:
  meta.json                      hookpoints, widths, num_tokens, dtype, the LM config, selection rules
  acts/<hookpoint>.npy           [N, D] activations of one hookpoint (np.lib.format; opened with mmap_mode="r")
  contexts.npy                   [R, T] int32 token rows the activations came from
  token_index.npy                [N, 2] int32 (row in contexts, position): where each activation's token sits

Which positions are harvested (`token_mask`): every real token of the batch, whatever its id, and nothing else. A
batch's "mask" (1 = real token) decides when given; otherwise packed "segment_ids" 0 and the model's own pad id
(when it has one) mark padding (a model without a pad, such as Llama or Qwen2, keeps every position of a plain
token array); `skip_bos` then drops the model's own BOS (`model.bos_id`; nothing for a model without one, Qwen2).

Row n of every hookpoint file is the same token, so SAEs on several hookpoints, transcoders (pairs of
hookpoints) and sweeps over hyperparameters all train from one harvest. `batches` streams shuffled batches
through a buffer: contiguous chunks in random order, mixed in a buffer, half of the buffer emitted per refill.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from framework.sae import defaults

_CHUNK = 4096


def _safe(name: str) -> str:
    return name.replace("/", "_")


def check_hookpoints(sae_cfg, model_cfg) -> None:
    """ValueError naming the value and what was expected if the SAE config does not fit the LM's hookpoints."""
    from framework.models import lm

    mcfg = lm.LMConfig.from_config(model_cfg)
    names = lm.hookpoints(mcfg)
    for key in ("hookpoint", "out_hookpoint"):
        name = sae_cfg[key]
        if name is not None and name not in names:
            raise ValueError(
                f"unknown hookpoint sae.{key} = {name!r}; expected 'embed', 'final_norm' or "
                f"'blocks.<0..{mcfg.n_layers - 1}>.<{'|'.join(lm.LAYER_HOOKPOINTS)}>'"
            )
    if sae_cfg.hookpoint is not None and sae_cfg.d_in != mcfg.d_model:
        raise ValueError(
            f"sae.d_in = {sae_cfg.d_in} does not match hookpoint {sae_cfg.hookpoint!r}, whose width is the LM's "
            f"d_model = {mcfg.d_model}"
        )
    if sae_cfg.out_hookpoint is not None:
        if defaults.d_out(sae_cfg) != mcfg.d_model:
            raise ValueError(
                f"sae.d_out = {defaults.d_out(sae_cfg)} does not match out_hookpoint {sae_cfg.out_hookpoint!r}, "
                f"whose width is d_model = {mcfg.d_model}"
            )
        if sae_cfg.hookpoint is None or names.index(sae_cfg.hookpoint) >= names.index(sae_cfg.out_hookpoint):
            raise ValueError(
                f"transcoder hookpoint {sae_cfg.hookpoint!r} must come before out_hookpoint {sae_cfg.out_hookpoint!r}"
            )


class ActivationStore:
    """A harvested store opened read-only (memory-mapped). Use `harvest` to write one."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no activation store at {path!r} (missing meta.json)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.path = path
        self.num_tokens = int(self.meta["num_tokens"])
        self.hookpoints = tuple(self.meta["hookpoints"])
        self.widths = {h: int(w) for h, w in self.meta["widths"].items()}
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: str) -> ActivationStore:
        """Opens the store written by `harvest` at `path`."""
        return cls(path)

    def array(self, hookpoint: str) -> np.ndarray:
        """The [N, D] memory-mapped activations of `hookpoint` (read-only)."""
        if hookpoint not in self.widths:
            raise ValueError(f"hookpoint {hookpoint!r} is not in the store at {self.path}; it holds {self.hookpoints}")
        if hookpoint not in self._arrays:
            mm = np.load(os.path.join(self.path, "acts", _safe(hookpoint) + ".npy"), mmap_mode="r")
            self._arrays[hookpoint] = mm[: self.num_tokens]
        return self._arrays[hookpoint]

    @property
    def contexts(self) -> np.ndarray:
        """[R, T] token rows the activations came from."""
        return np.load(os.path.join(self.path, "contexts.npy"))

    @property
    def token_index(self) -> np.ndarray:
        """[N, 2] (row in `contexts`, position) of every activation row."""
        return np.load(os.path.join(self.path, "token_index.npy"))[: self.num_tokens]

    def resolve(self, sae_cfg) -> tuple[str, str]:
        """(input hookpoint, target hookpoint) an SAE config trains on; the store's only hookpoint if unset."""
        name = sae_cfg.hookpoint
        if name is None:
            if len(self.hookpoints) != 1:
                raise ValueError(f"sae.hookpoint is None but the store holds {self.hookpoints}; name one of them")
            name = self.hookpoints[0]
        out = sae_cfg.out_hookpoint or name
        for key, value in (("hookpoint", name), ("out_hookpoint", out)):
            if value not in self.widths:
                raise ValueError(
                    f"sae.{key} = {value!r} is not in the store at {self.path}; it holds {self.hookpoints}"
                )
        return name, out

    def batches(
        self,
        hookpoints: Sequence[str],
        *,
        batch_size: int,
        seed: int = 0,
        buffer_rows: int | None = None,
        chunk_rows: int = _CHUNK,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless shuffled batches {hookpoint: [B, D] float32}, rows aligned across hookpoints.

        Contiguous chunks of `chunk_rows` rows are read in a seeded random order (a new order every pass) into a
        buffer of `buffer_rows` rows (default max(32 * batch_size, 4 chunks)); when full, the buffer is shuffled and
        half of it is emitted. No row is dropped: a row read is emitted at a later refill if not at this one.
        """
        arrays = {h: self.array(h) for h in hookpoints}
        n = self.num_tokens
        if batch_size > n:
            raise ValueError(f"batch_size = {batch_size} exceeds the store's {n} tokens")
        buffer_rows = min(n, buffer_rows or max(32 * batch_size, 4 * chunk_rows))
        rng = np.random.default_rng(seed)
        starts = np.arange(0, n, chunk_rows)
        buf: dict[str, np.ndarray] = {h: np.zeros((0, arrays[h].shape[1]), np.float32) for h in hookpoints}
        while True:
            for s in rng.permutation(starts):
                for h in hookpoints:
                    buf[h] = np.concatenate([buf[h], np.asarray(arrays[h][s : s + chunk_rows], np.float32)])
                size = len(buf[hookpoints[0]])
                if size < buffer_rows:
                    continue
                perm = rng.permutation(size)
                buf = {h: v[perm] for h, v in buf.items()}
                emit = (size // 2) // batch_size * batch_size
                for i in range(0, emit, batch_size):
                    yield {h: v[i : i + batch_size] for h, v in buf.items()}
                buf = {h: v[emit:] for h, v in buf.items()}


def token_mask(batch: Mapping[str, np.ndarray], model_cfg, *, skip_bos: bool = True) -> np.ndarray:
    """bool [B, T]: the positions of `batch` a harvest keeps (module docstring); ids 0 and 1 are content unless they
    are the model's own pad / BOS."""
    from framework.models import lm

    mcfg = lm.LMConfig.from_config(model_cfg)
    tokens = np.asarray(batch["tokens"])
    if batch.get("mask") is not None:
        keep = np.asarray(batch["mask"])
        if keep.shape != tokens.shape:
            raise ValueError(f"harvest batch 'mask' has shape {keep.shape}; expected the tokens' shape {tokens.shape}")
        keep = keep.astype(bool)
    else:
        keep = np.ones(tokens.shape, bool) if mcfg.pad_id is None else tokens != mcfg.pad_id
        if batch.get("segment_ids") is not None:
            keep &= np.asarray(batch["segment_ids"]) != 0
    if skip_bos and mcfg.bos_id is not None:
        keep = keep & (tokens != mcfg.bos_id)
    return keep


def harvest(
    lm_params,
    model_cfg,
    hookpoints: Sequence[str],
    token_batches: Iterable[Mapping[str, np.ndarray]],
    path: str,
    *,
    max_tokens: int,
    skip_bos: bool = True,
    dtype: str = "float32",
) -> ActivationStore:
    """Runs the LM once per batch capturing every hookpoint in `hookpoints`, writing its real tokens to `path`.

    `token_batches` yields dicts with "tokens" [B, T] and optionally "mask" [B, T] (1 = real token), and
    "positions"/"segment_ids" for packed rows. Kept: `token_mask` (every unmasked position; with `skip_bos` not the
    model's own BOS). Stops after `max_tokens` tokens. Hookpoint names are checked before anything compiles; non-finite activations are an
    error naming the hookpoint.
    """
    from framework.models import lm
    from framework.tasks import tokenizer as tok

    mcfg = lm.LMConfig.from_config(model_cfg)
    names = lm.hookpoints(mcfg)
    hookpoints = list(dict.fromkeys(hookpoints))
    if not hookpoints:
        raise ValueError("harvest needs at least one hookpoint")
    for h in hookpoints:
        if h not in names:
            raise ValueError(
                f"unknown hookpoint {h!r}; expected 'embed', 'final_norm' or "
                f"'blocks.<0..{mcfg.n_layers - 1}>.<{'|'.join(lm.LAYER_HOOKPOINTS)}>'"
            )
    if dtype not in ("float32", "float16"):
        raise ValueError(f"harvest dtype = {dtype!r}; expected 'float32' or 'float16'")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens = {max_tokens}; expected a positive int")
    os.makedirs(os.path.join(path, "acts"), exist_ok=True)
    files = {
        h: np.lib.format.open_memmap(
            os.path.join(path, "acts", _safe(h) + ".npy"), mode="w+", dtype=dtype, shape=(max_tokens, mcfg.d_model)
        )
        for h in hookpoints
    }

    @jax.jit
    def capture(params, tokens, positions, segment_ids):
        out = lm.forward(
            params, tokens, mcfg, positions_BT=positions, segment_ids_BT=segment_ids, capture=tuple(hookpoints)
        )
        return out.captured

    n, rows, index, row_offset = 0, [], [], 0
    for batch in token_batches:
        tokens = tok.check_token_ids(batch["tokens"], mcfg.vocab_size, where="harvest tokens")
        captured = capture(lm_params, jnp.asarray(tokens), _opt(batch.get("positions")), _opt(batch.get("segment_ids")))
        keep = token_mask(batch, mcfg, skip_bos=skip_bos)
        b_idx, t_idx = np.nonzero(keep)
        take = min(len(b_idx), max_tokens - n)
        b_idx, t_idx = b_idx[:take], t_idx[:take]
        for h in hookpoints:
            a = np.asarray(captured[h])[b_idx, t_idx]
            if not np.all(np.isfinite(a)):
                raise ValueError(f"harvested activations at hookpoint {h!r} are not finite (NaN/Inf)")
            files[h][n : n + take] = a.astype(dtype)
        index.append(np.stack([b_idx + row_offset, t_idx], axis=1).astype(np.int32))
        rows.append(tokens.astype(np.int32))
        row_offset += tokens.shape[0]
        n += take
        if n >= max_tokens:
            break
    for f in files.values():
        f.flush()
    del files
    np.save(os.path.join(path, "contexts.npy"), np.concatenate(rows) if rows else np.zeros((0, 0), np.int32))
    np.save(os.path.join(path, "token_index.npy"), np.concatenate(index) if index else np.zeros((0, 2), np.int32))
    meta = {
        "hookpoints": hookpoints,
        "widths": {h: mcfg.d_model for h in hookpoints},
        "num_tokens": int(n),
        "dtype": dtype,
        "skip_bos": skip_bos,
        "model": mcfg.to_dict(),
    }
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return ActivationStore(path)


def _opt(x):
    return None if x is None else jnp.asarray(x)
