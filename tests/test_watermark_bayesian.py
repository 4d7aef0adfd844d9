"""SynthID's trained Bayesian detector: it learns from tournament-watermarked text and separates held-out rows far
above chance, its calibrated p-values hold their level on unwatermarked text, and bad inputs are named.

Fast tests make watermarked text without a model: each step draws random high-entropy logits, applies the SynthID
processor `generate` uses to each row's buffer, and samples (one small jitted loop). The slow test trains on real
`generate` output.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import watermark as wm

V, T, PROMPT, R = 64, 16, 4, 256
SID = wm.SynthID(V, keys=(11, 22, 33, 44, 55, 66), ngram_len=3)


@jax.jit
def _tournament_text(key, prompts_RP):
    """Rows of PROMPT given tokens then T tokens sampled under SID from fresh random logits per step."""
    R = prompts_RP.shape[0]
    buf = jnp.concatenate([prompts_RP, jnp.zeros((R, T), jnp.int32)], axis=1)

    def step(i, buf):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        logits = 1.5 * jax.random.normal(k1, (R, V))
        lengths = jnp.full((R,), PROMPT + i, jnp.int32)
        tok = jax.random.categorical(k2, SID(logits, buf, lengths))
        return buf.at[:, PROMPT + i].set(tok.astype(jnp.int32))

    return jax.lax.fori_loop(0, T, step, buf)


def _rows(R, seed, marked):  # noqa: N803
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, V, (R, PROMPT)).astype(np.int32)
    if marked:
        tokens = np.asarray(_tournament_text(jax.random.key(seed), jnp.asarray(prompts)))
    else:
        tokens = np.concatenate([prompts, rng.integers(0, V, (R, T)).astype(np.int32)], axis=1)
    return tokens, np.full(R, PROMPT + T, np.int32), np.full(R, PROMPT, np.int32)


@pytest.fixture(scope="module")
def data():
    # One row count everywhere: each jitted piece compiles once.
    return dict(
        train_marked=_rows(R, 1, True),
        train_clean=_rows(R, 2, False),
        cal_clean=_rows(R, 3, False),
        test_marked=_rows(R, 4, True),
        test_clean=_rows(R, 5, False),
    )


@pytest.fixture(scope="module")
def detector(data):
    fitted = wm.fit_bayesian(SID, data["train_marked"], data["train_clean"], steps=150, batch_size=64)
    return fitted.calibrate(data["cal_clean"], min_rows=200)


def _auc(pos, neg):
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_trained_detector_separates_held_out_rows_far_above_chance(data, detector):
    pos = wm.detect_bayesian(detector, *data["test_marked"])
    neg = wm.detect_bayesian(detector, *data["test_clean"])
    n = np.asarray(pos.num_scored)  # every generated token, less the few whose context repeats within the row
    assert n.max() == T and n.min() >= T - 3 and np.all(np.asarray(pos.enough))
    assert _auc(pos.score, neg.score) > 0.95
    # The calibrated p-values: most watermarked rows at p <= 0.01 within 16 tokens, the clean rows near 1%.
    assert (np.asarray(pos.p_value) <= 0.01).mean() > 0.6
    assert (np.asarray(neg.p_value) <= 0.01).mean() < 0.03
    post_pos, post_neg = np.asarray(pos.posterior), np.asarray(neg.posterior)
    assert np.median(post_pos) > 0.9 > 0.1 > np.median(post_neg)
    # Training moved the model from its initial (untrained) parameters and learnt that a match's chance of two
    # distinct tokens differs across layers.
    beta = np.asarray(detector.params["params"]["likelihood"]["beta"])
    assert np.ptp(beta) > 0.3 and np.all(np.abs(beta + 2.5) > 0.1)


def test_calibrated_pvalues_hold_their_level_on_unwatermarked_text(data, detector):
    """Conformal p-values on exchangeable null rows: P(p <= a) <= a up to sampling error (256 held-out rows), at
    every length up to the calibration's, and never below 1 / (1 + calibration rows)."""
    tokens, lengths, start = data["test_clean"]
    for n in (4, 16):
        p = np.asarray(wm.detect_bayesian(detector, tokens, start + n, start).p_value)
        assert p.min() >= 1 / (R + 1) - 1e-7
        for a in (0.05, 0.2):
            assert (p <= a).mean() <= a + 3 * np.sqrt(a * (1 - a) / len(p)), (n, a)
        assert 0.35 < np.median(p) < 0.65
    assert detector.max_calibrated_tokens == T


def test_bayesian_detector_reports_not_enough_tokens(data, detector):
    tokens, lengths, start = data["test_marked"]
    short_lengths = lengths.copy()
    short_lengths[:2] = PROMPT, PROMPT + 2
    d = wm.detect_bayesian(detector, tokens, short_lengths, start, min_tokens=3)
    np.testing.assert_array_equal(np.asarray(d.num_scored)[:2], [0, 2])  # the prompt is context, never scored
    np.testing.assert_array_equal(np.asarray(d.enough)[:3], [False, False, True])
    np.testing.assert_array_equal(np.asarray(d.p_value)[:2], [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(d.score)[:2], [0.0, 0.0])
    assert np.all(np.isfinite(np.asarray(d.posterior)))


@pytest.mark.slow  # a second calibration table: another compile of the detector
def test_rows_longer_than_the_calibration_get_valid_pvalues(data, detector):
    """A detector calibrated on shorter rows tests a longer row on its first calibrated tokens."""
    short = detector.calibrate((data["cal_clean"][0], data["cal_clean"][2] + 6, data["cal_clean"][2]), min_rows=200)
    assert short.max_calibrated_tokens == 6
    p = np.asarray(wm.detect_bayesian(short, *data["test_clean"]).p_value)
    assert (p <= 0.05).mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(p))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d, det: wm.fit_bayesian(wm.KGW(V), d["train_marked"], d["train_clean"]), "SynthID"),
        (lambda d, det: wm.fit_bayesian(SID, d["train_marked"][0], d["train_clean"]), "triple"),
        (lambda d, det: wm.fit_bayesian(SID, d["train_marked"], d["train_clean"], steps=0), "steps=0"),
        (lambda d, det: wm.fit_bayesian(SID, d["train_marked"], d["train_clean"], learning_rate=-1.0), "learning_rate"),
        (lambda d, det: wm.fit_bayesian(SID, d["train_marked"], d["train_clean"], base_rate=1.0), "base_rate=1.0"),
        (
            lambda d, det: wm.fit_bayesian(
                SID, (d["train_marked"][0], d["train_marked"][2], d["train_marked"][2]), d["train_clean"]
            ),
            "marked has no scored tokens",
        ),
        (lambda d, det: wm.fit_bayesian_g(SID, np.zeros((4, 8, 5)), np.ones((4, 8)), [0, 1, 0, 1]), "len\\(keys\\)=6"),
        (lambda d, det: wm.fit_bayesian_g(SID, np.zeros((4, 8, 6)), np.ones((4, 8)), [1, 1, 1, 1]), "labels"),
        (lambda d, det: wm.detect_bayesian(dataclasses.replace(det, null_NR=None), *d["test_clean"]), "calibrate"),
        (
            lambda d, det: wm.detect_bayesian(
                dataclasses.replace(det, scheme=wm.SynthID(V, keys=(1, 2, 3), ngram_len=3)), *d["test_clean"]
            ),
            "len\\(keys\\)=3",
        ),
        (lambda d, det: wm.detect_bayesian(det, np.array([[1, 2, 3, V]])), "vocab_size=64"),
        (lambda d, det: wm.detect_bayesian(det, np.array([[1, 2]])), "ngram_len=3"),
        (lambda d, det: det.calibrate(d["cal_clean"], min_rows=R + 1), f"min_rows={R + 1}"),
    ],
)
def test_bayesian_bad_inputs_name_the_field(data, detector, make, match):
    with pytest.raises(ValueError, match=match):
        make(data, detector)


@pytest.mark.slow
def test_trained_on_lumen_generations_it_detects_held_out_generations():
    """The full path: g-values of `generate` output with and without the SynthID processor (a random high-entropy
    model), fit, calibrate on other clean generations, detect held-out ones."""
    from framework.inference import generate
    from framework.models import lm

    Vm = 256
    cfg = lm.LMConfig(
        vocab_size=Vm, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64
    )
    params = jax.tree.map(lambda x: 5.0 * x, lm.init(cfg, jax.random.key(0)))
    sid = wm.SynthID(Vm, keys=(5, 6, 7, 8, 9, 10, 11, 12), ngram_len=4)
    sets = {}
    for i, name in enumerate(("train", "cal", "test")):
        rng = np.random.default_rng(i)
        prompts = [rng.integers(3, Vm, int(k)).astype(np.int32) for k in rng.integers(4, 9, 192)]
        kw = dict(max_new_tokens=24, temperature=1.0, stop_tokens=(), rng=jax.random.key(i))
        sets[name, "clean"] = wm.join_generation(prompts, generate(params, cfg, prompts, **kw))
        out = generate(params, cfg, prompts, logits_processors=(sid,), **kw)
        sets[name, "marked"] = wm.join_generation(prompts, out)
    det = wm.fit_bayesian(sid, sets["train", "marked"], sets["train", "clean"], steps=200)
    det = det.calibrate(sets["cal", "clean"], min_rows=96)
    pos = wm.detect_bayesian(det, *sets["test", "marked"])
    neg = wm.detect_bayesian(det, *sets["test", "clean"])
    assert _auc(pos.score, neg.score) > 0.95
    assert (np.asarray(pos.p_value) <= 0.01).mean() > 0.8
    assert (np.asarray(neg.p_value) <= 0.01).mean() < 0.05
