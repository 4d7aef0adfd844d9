"""Lumen's SynthID against the reference implementation in `transformers` (fixtures from
scripts/golden/synthid_goldens.py): g-values, the repeated-context mask and the score update are equal, and text
that `transformers` watermarked while generating is detected by Lumen's detector."""

import json

import numpy as np
import pytest

from framework import watermark as wm
from framework.watermark import synthid

ASSETS = "tests/assets/synthid"


@pytest.fixture(scope="module")
def goldens():
    with open(f"{ASSETS}/g_values.json") as f:
        meta = json.load(f)
    return meta, dict(np.load(f"{ASSETS}/g_values.npz"))


def test_g_values_equal_the_reference_for_every_setting(goldens):
    meta, arrays = goldens
    assert len(meta["settings"]) >= 4  # several key sets, n-gram lengths, table sizes and seeds
    for i, setting in enumerate(meta["settings"]):
        ref = arrays[f"g_{i}"]
        ours = np.asarray(wm.compute_g_values(arrays[f"tokens_{i}"], **setting))
        assert ours.shape == ref.shape, (i, setting)
        np.testing.assert_array_equal(ours, ref, err_msg=str(setting))
        assert 0.0 < ref.mean() < 1.0  # the fixture is not degenerate
        table = synthid.SynthID(
            10,
            keys=tuple(setting["keys"]),
            ngram_len=setting["ngram_len"],
            sampling_table_size=setting["sampling_table_size"],
            sampling_table_seed=setting["sampling_table_seed"],
        )
        assert table.g_rate == pytest.approx(float(arrays[f"table_rate_{i}"]), abs=1e-12)


def test_context_repetition_mask_equals_the_reference(goldens):
    meta, arrays = goldens
    for i, s in enumerate(meta["settings"]):
        ours = wm.context_repetition_mask(
            arrays[f"tokens_{i}"], ngram_len=s["ngram_len"], context_history_size=s["context_history_size"]
        )
        np.testing.assert_array_equal(np.asarray(ours), arrays[f"mask_{i}"], err_msg=str(s))
    assert any(arrays[f"mask_{i}"].min() == 0 for i in range(len(meta["settings"])))  # repeats were exercised


def test_score_update_equals_the_reference(goldens):
    _, arrays = goldens
    ours = np.asarray(synthid.tournament_logprobs(arrays["update_scores_in"], arrays["update_scores_g"]))
    ref = arrays["update_scores_out"]
    finite = ref > -1e30  # the reference writes finfo.min where the probability is 0; Lumen keeps -inf
    np.testing.assert_allclose(ours[finite], ref[finite], atol=1e-5)
    assert np.all(np.isneginf(ours[~finite])) and (~finite).any()


@pytest.mark.slow  # compiles three detectors; the g-value and mask equalities above are the fast interop tests
def test_text_watermarked_by_transformers_is_detected_by_lumen(goldens):
    meta, _ = goldens
    gen = np.load(f"{ASSETS}/hf_generated.npz")
    s = meta["generation"]
    scheme = wm.SynthID(
        1000,
        keys=tuple(s["keys"]),
        ngram_len=s["ngram_len"],
        sampling_table_size=s["sampling_table_size"],
        sampling_table_seed=s["sampling_table_seed"],
        context_history_size=s["context_history_size"],
    )
    start = np.full(len(gen["marked"]), gen["prompts"].shape[1])
    for weighted in (False, True):
        det = wm.detect(scheme, gen["marked"], start_B=start, weighted=weighted)
        assert np.all(np.asarray(det.p_value) < 1e-4), det
        assert np.all(np.asarray(det.num_scored) >= 150)
        control = wm.detect(scheme, gen["clean"], start_B=start, weighted=weighted)
        assert np.all(np.asarray(control.p_value) > 1e-4), control
    # A different key set sees nothing in the same text.
    other = wm.SynthID(1000, keys=tuple(k + 1 for k in s["keys"]), ngram_len=s["ngram_len"])
    assert np.all(np.asarray(wm.detect(other, gen["marked"], start_B=start).p_value) > 1e-4)


@pytest.mark.parametrize("table_size", [2**16, 1000])
def test_decode_time_g_values_equal_compute_g_values(table_size):
    """The processor's g-values of every candidate after a context are those `compute_g_values` gives the n-gram
    context + candidate (power-of-two tables take the 32-bit path, others the 64-bit one)."""
    s = wm.SynthID(50, keys=(3, 2**40 + 1, -9), ngram_len=4, sampling_table_size=table_size, sampling_table_seed=5)
    ctx = np.array([[7, 1, 42], [0, 49, 3]], np.int32)
    g_BVM = np.asarray(s.next_token_g(ctx))
    grams = np.concatenate([np.repeat(ctx[:, None, :], 50, 1), np.broadcast_to(np.arange(50), (2, 50))[..., None]], -1)
    ref = np.asarray(s.g_values(grams.reshape(-1, 4))).reshape(2, 50, 3)
    np.testing.assert_array_equal(g_BVM, ref)
