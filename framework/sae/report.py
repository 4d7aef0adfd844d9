"""Feature report: per latent, its top-activating contexts (token highlighted), density and promoted output tokens.

`feature_summaries` computes the numbers (usable in a notebook); `write_report` renders them as one static HTML page.
Tokens are shown with the model's own tokenizer (`token_text`: an HF tokenizer.json for an imported checkpoint, any
vocabulary size), the arithmetic characters by default, and as `<id>` for a model whose tokenizer is unknown.
Promoted tokens: the latent's unit decoder direction, scaled by the final RMSNorm's gain, through the unembedding
(the direct logit effect of writing that direction into the residual stream just before the final norm).
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from framework.sae import model
from framework.tasks import tokenizer as tok

_VISIBLE = {"\n": "⏎", " ": "␣", "\t": "⇥"}


def _char_text(i: int, alphabet: str = tok.ALPHABET) -> str:
    if i in (tok.PAD_ID, tok.BOS_ID, tok.EOS_ID):
        return {tok.PAD_ID: "<pad>", tok.BOS_ID: "<bos>", tok.EOS_ID: "<eos>"}[i]
    ch = alphabet[i - tok.NUM_SPECIAL]
    return _VISIBLE.get(ch, ch)


def _hf_text(tokenizer, i: int) -> str:
    """One id's text: its decoded string (special tokens by name), else its vocabulary entry, else `<id>`."""
    raw = tokenizer.tokenizer if hasattr(tokenizer, "tokenizer") else tokenizer
    text = raw.decode([int(i)], skip_special_tokens=False)
    if not text:
        text = raw.id_to_token(int(i)) or f"<{i}>"
    return "".join(_VISIBLE.get(c, c) for c in text) if text.isspace() else text.replace("\n", "⏎")


def token_text(tokenizer=None, vocab_size: int | None = None) -> Callable[[int], str]:
    """`fn(id) -> str` rendering one token for the report, with the model's own tokenizer.

    tokenizer: a `framework.tasks.tokenizer.CharTokenizer` ("arith"/"text"), an `HFTokenizer` or a raw
    `tokenizers.Tokenizer`, or None: the arithmetic characters when `vocab_size` fits them (the default), else `<id>`.
    """
    if tokenizer is None:
        if vocab_size is None or vocab_size <= tok.VOCAB_SIZE:
            return _char_text
        return lambda i: f"<{int(i)}>"
    if isinstance(tokenizer, tok.CharTokenizer):
        return functools.partial(_char_text, alphabet=tokenizer.alphabet)
    return functools.lru_cache(maxsize=None)(functools.partial(_hf_text, tokenizer))


def top_activations(sae_params, sae_cfg, x_ND: np.ndarray, latents, *, top: int = 8, chunk: int = 4096):
    """(values [len(latents), top], rows [len(latents), top], density [L]) over the rows of x (chunked)."""
    enc = jax.jit(lambda p, x: model.encode(p, sae_cfg, x))
    latents = np.asarray(latents)
    best_v = np.full((len(latents), top), -np.inf, np.float32)
    best_r = np.zeros((len(latents), top), np.int64)
    fired = np.zeros(sae_cfg.n_latents, np.int64)
    for start in range(0, len(x_ND), chunk):
        f = np.asarray(enc(sae_params, jnp.asarray(x_ND[start : start + chunk], jnp.float32)))
        fired += np.sum(f != 0, axis=0)
        sub = f[:, latents].T  # [n, c]
        vals = np.concatenate([best_v, sub], axis=1)
        rows = np.concatenate([best_r, np.arange(start, start + len(f))[None].repeat(len(latents), 0)], axis=1)
        order = np.argsort(-vals, axis=1)[:, :top]
        best_v, best_r = np.take_along_axis(vals, order, 1), np.take_along_axis(rows, order, 1)
    return best_v, best_r, fired / max(len(x_ND), 1)


def promoted_tokens(sae_params, sae_cfg, lm_params, *, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [L, top], logit effects [L, top]) of each latent's decoder direction through the unembedding."""
    dirs = np.asarray(model.decoder_directions(sae_params, sae_cfg))
    gain = np.asarray(lm_params["final_norm"]["scale"])
    W_U = (
        np.asarray(lm_params["lm_head"]["kernel"])
        if "lm_head" in lm_params
        else np.asarray(lm_params["embed"]["embedding"]).T
    )
    logits = (dirs * gain) @ W_U
    ids = np.argsort(-logits, axis=1)[:, :top]
    return ids, np.take_along_axis(logits, ids, 1)


def feature_summaries(
    sae_params,
    sae_cfg,
    store,
    lm_params=None,
    *,
    n_features: int = 24,
    top: int = 8,
    seed: int = 0,
    tokenizer=None,
) -> list[dict[str, Any]]:
    """Summaries of `n_features` latents that fire (a seeded sample): contexts, density and promoted tokens.

    `tokenizer`: the model's own (see `token_text`); None shows the arithmetic characters, or `<id>` for a model
    whose vocabulary (the store's `meta["model"]`) is larger.
    """
    _token_text = token_text(tokenizer, store.meta.get("model", {}).get("vocab_size"))
    name, _ = store.resolve(sae_cfg)
    x = store.array(name)
    all_vals, all_rows, density = top_activations(sae_params, sae_cfg, x, np.arange(sae_cfg.n_latents), top=top)
    alive = np.flatnonzero(density > 0)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(alive, size=min(n_features, len(alive)), replace=False))
    vals, rows = all_vals[chosen], all_rows[chosen]
    index, contexts = store.token_index, store.contexts
    promoted = promoted_tokens(sae_params, sae_cfg, lm_params) if lm_params is not None else None
    out = []
    for j, latent in enumerate(chosen):
        ctxs = []
        for v, r in zip(vals[j], rows[j]):
            if not np.isfinite(v) or v <= 0:
                continue
            row, pos = index[r]
            toks = contexts[row]
            lo = max(0, pos - 24)
            ctxs.append(
                {
                    "activation": float(v),
                    "before": [_token_text(int(t)) for t in toks[lo:pos]],
                    "token": _token_text(int(toks[pos])),
                    "after": [_token_text(int(t)) for t in toks[pos + 1 : pos + 4]],
                }
            )
        item = {"latent": int(latent), "density": float(density[latent]), "contexts": ctxs}
        if promoted is not None:
            ids, effects = promoted[0][latent], promoted[1][latent]
            item["promoted"] = [(_token_text(int(i)), float(e)) for i, e in zip(ids, effects)]
        out.append(item)
    return out


def write_report(path: str, summaries: list[dict[str, Any]], *, title: str, header: dict[str, Any]) -> str:
    """Writes the summaries as a static HTML page at `path`; returns the path."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
        ".ctx{font-family:monospace;white-space:pre}mark{background:#fb0;font-weight:bold}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
        f"<h1>{e(title)}</h1><table>",
    ]
    parts += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in header.items()]
    parts.append("</table>")
    for s in summaries:
        parts.append(f"<h2>latent {s['latent']}</h2><p>density {s['density']:.4%}")
        if "promoted" in s:
            promo = ", ".join(f"<code>{e(t)}</code> ({v:+.2f})" for t, v in s["promoted"])
            parts.append(f" &middot; promotes: {promo}")
        parts.append("</p><table><tr><th>activation</th><th>context</th></tr>")
        for c in s["contexts"]:
            text = e("".join(c["before"])) + f"<mark>{e(c['token'])}</mark>" + e("".join(c["after"]))
            parts.append(f"<tr><td>{c['activation']:.3f}</td><td class='ctx'>{text}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
