"""Attacks on watermarked text: edits at rate ε keep the prompt and hit about ε of the text, and they erode the
detector's signal as ε grows."""

import jax
import numpy as np
import pytest

from framework import watermark as wm

V = 1024


def _marked_like(scheme, B=6, T=160, P=8, seed=0):
    """Text that maximally carries a KGW watermark: each token drawn among the green ones of its context."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    cand = np.arange(V)
    green_fn = jax.jit(lambda ctx_BH: scheme.is_green(ctx_BH[:, None, :], cand[None, :]))
    for t in range(P, T):
        green_BV = np.asarray(green_fn(tokens[:, t - scheme.context_width : t]))
        for b in range(B):
            tokens[b, t] = rng.choice(cand[green_BV[b]])
    return tokens, np.full(B, T, np.int32), np.full(B, P, np.int32)


@pytest.fixture(scope="module")
def text():
    scheme = wm.KGW(V, gamma=0.25, delta=2.0)
    return scheme, _marked_like(scheme)


def test_edits_keep_the_prompt_and_hit_about_rate(text):
    scheme, (tokens, lengths, start) = text
    P = start[0]
    sub, sl = wm.attacks.substitute(tokens, lengths, start, rate=0.3, vocab_size=V, seed=1)
    assert np.array_equal(sub[:, :P], tokens[:, :P]) and np.array_equal(sl, lengths)
    changed = np.mean(sub[:, P:] != tokens[:, P:])
    assert 0.22 < changed < 0.36
    dele, dl = wm.attacks.delete(tokens, lengths, start, rate=0.3, seed=1)
    assert np.array_equal(dele[:, :P], tokens[:, :P])
    assert 0.22 < 1 - np.mean((dl - P) / (lengths - P)) < 0.38
    ins, il = wm.attacks.insert(tokens, lengths, start, rate=0.3, vocab_size=V, seed=1)
    assert np.array_equal(ins[:, :P], tokens[:, :P])
    assert 0.22 < np.mean((il - lengths) / (lengths - P)) < 0.38
    other = np.random.default_rng(5).integers(0, V, tokens.shape).astype(np.int32)
    mix, ml = wm.attacks.copy_paste(tokens, lengths, start, other, rate=0.5, seed=1)
    assert np.array_equal(ml, lengths)
    assert np.all(np.abs(np.sum(mix[:, P:] == other[:, P:], 1) - 0.5 * (lengths - P)) <= 3)
    # Reproducible from the seed.
    again, _ = wm.attacks.substitute(tokens, lengths, start, rate=0.3, vocab_size=V, seed=1)
    assert np.array_equal(again, sub)


def test_the_signal_erodes_as_the_edit_rate_grows(text):
    scheme, (tokens, lengths, start) = text
    z = []
    for rate in (0.0, 0.2, 0.5, 0.9):
        att, al = wm.attacks.substitute(tokens, lengths, start, rate=rate, vocab_size=V, seed=2)
        z.append(float(np.mean(np.asarray(wm.detect(scheme, att, al, start).score))))
    assert z[0] > 20 and all(a > b for a, b in zip(z, z[1:])), z
    assert z[-1] < 3


@pytest.mark.slow
def test_regeneration_rewrites_blocks_with_the_attacker_model():
    from framework.models import lm

    cfg = lm.LMConfig(
        vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=128
    )
    params = lm.init(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, (3, 48)).astype(np.int32)
    lengths, start = np.full(3, 48, np.int32), np.full(3, 8, np.int32)
    same, _ = wm.attacks.regenerate(tokens, lengths, start, params=params, cfg=cfg, rate=0.0, span=10)
    assert np.array_equal(same, tokens)
    new, nl = wm.attacks.regenerate(tokens, lengths, start, params=params, cfg=cfg, rate=1.0, span=10)
    assert np.array_equal(nl, lengths) and np.array_equal(new[:, :8], tokens[:, :8])
    assert np.mean(new[:, 8:] != tokens[:, 8:]) > 0.95  # a random model's tokens rarely coincide with the text's
