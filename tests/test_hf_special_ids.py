"""Special ids exactly as the checkpoint has them, through import, generation, calibration, harvest and report.

Goldens (tests/assets/hf, written by real transformers with scripts/golden/hf_goldens.py): `llama_nopad` (MQA, tied,
pad null, bos 1, eos 2, a 2048-token BPE tokenizer.json), `qwen2_nobos` (bos and pad null, eos 2) and `gemma2_ids`
(Gemma's pad 0, eos 1, bos 2).
"""

from __future__ import annotations

import functools
import html
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from hf_golden import ASSETS, PARITY_ATOL

from framework import inference, quant, sae
from framework.models import hf, lm
from framework.sae import report
from framework.sae import store as store_lib
from framework.tasks import tokenizer as tok_lib

CASES = ("llama_nopad", "qwen2_nobos", "gemma2_ids")
# (bos_id, eos_ids, pad_id) each config.json states.
IDS = {"llama_nopad": (1, (2,), None), "qwen2_nobos": (None, (2,), None), "gemma2_ids": (2, (1,), 0)}


@functools.cache
def load(case):
    return hf.load_hf_checkpoint(ASSETS / case)


def golden(case):
    return safetensors.numpy.load_file(str(ASSETS / case / "golden.safetensors"))


def test_special_ids_are_the_checkpoints():
    for case, ids in IDS.items():
        cfg = hf.hf_config_to_lm_config(json.loads((ASSETS / case / "config.json").read_text()))
        assert (cfg.bos_id, cfg.eos_ids, cfg.pad_id) == ids, case
    tok = tok_lib.tokenizer_for(load("llama_nopad")[0], folder=ASSETS / "llama_nopad")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (2048, 1, 2, None)


@pytest.mark.parametrize("case", CASES)
def test_logit_parity_on_real_special_ids(case):
    cfg, params = load(case)
    g = golden(case)
    logits = np.asarray(_apply(params, g["input_ids"].astype(np.int32), cfg))
    assert float(np.abs(logits - g["logits"]).max()) <= PARITY_ATOL


_apply = jax.jit(lm.apply, static_argnums=2)


@pytest.mark.parametrize(
    "case",
    [
        "llama_nopad",
        pytest.param("qwen2_nobos", marks=pytest.mark.slow),
        pytest.param("gemma2_ids", marks=pytest.mark.slow),
    ],
)
def test_greedy_generate_equals_transformers(case):
    """`generate` equals HF greedy token for token on checkpoints without a pad (or a BOS): none is needed."""
    cfg, params = load(case)
    g = golden(case)
    out = inference.generate(params, cfg, g["input_ids"][:, :8].astype(np.int32), max_new_tokens=12, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.tokens), g["greedy_tokens"])


def test_outputs_after_a_stop_are_marked_by_lengths_and_the_callers_pad():
    """Null pad: no token is invented; after a stop the tokens hold -1 (or the caller's pad_value)."""
    cfg, params = load("llama_nopad")
    g = golden("llama_nopad")
    prompts, want = g["input_ids"][:, :8].astype(np.int32), g["greedy_tokens"]
    stop = int(want[0, 3])  # row 0 stops at its 4th token; row 1 wherever that token first appears (if it does)
    first = [int(np.flatnonzero(np.append(row == stop, True))[0]) for row in want]
    lengths = [min(f + 1, want.shape[1]) for f in first]
    for pad_value, fill in ((None, -1), (7, 7)):
        out = inference.generate(
            params, cfg, prompts, max_new_tokens=want.shape[1], stop_tokens=(stop,), pad_value=pad_value
        )
        assert np.asarray(out.lengths).tolist() == lengths
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(np.asarray(out.tokens)[b, :n], want[b, :n])
            assert np.all(np.asarray(out.tokens)[b, n:] == fill)
    with pytest.raises(ValueError, match="pad_value must be None or an int"):
        inference.generate(params, cfg, prompts, max_new_tokens=2, pad_value=1.5)


def test_calibration_drops_only_masked_positions():
    """A model without a pad calibrates on rows of token 0 (content there); a mask drops exactly its zeros."""
    cfg, params = load("qwen2_nobos")
    path = "layers/mlp/down_proj/kernel"
    zeros = np.zeros((2, 8), np.int32)
    xs = quant.methods.collect_inputs(params, cfg, [zeros], [path], max_tokens=1000)
    assert xs[path].shape == (cfg.n_layers, 16, cfg.d_ff)
    mask = np.ones((2, 8), bool)
    mask[:, 5:] = False
    masked = quant.methods.collect_inputs(params, cfg, [{"tokens": zeros, "mask": mask}], [path], max_tokens=1000)
    assert masked[path].shape == (cfg.n_layers, 10, cfg.d_ff)
    with pytest.raises(ValueError, match="no unmasked token"):
        quant.methods.collect_inputs(params, cfg, [{"tokens": zeros, "mask": ~mask & False}], [path], max_tokens=9)


def _random_rows(vocab: int, seed: int = 0) -> np.ndarray:
    """[8, 64] random ids in which 0, 1 and 2 (the arithmetic specials) occur as content many times."""
    rows = np.random.default_rng(seed).integers(0, vocab, size=(8, 64)).astype(np.int32)
    rows[:, ::4] = np.arange(rows[:, ::4].size).reshape(8, 16) % 3
    return rows


def test_harvest_mask_keeps_every_real_token_and_drops_only_the_models_bos():
    for case, (bos, _, pad) in IDS.items():
        cfg = load(case)[0]
        tokens = _random_rows(cfg.vocab_size)
        everything = np.ones(tokens.shape, bool)
        np.testing.assert_array_equal(store_lib.token_mask({"tokens": tokens}, cfg, skip_bos=False), tokens != pad)
        kept = store_lib.token_mask({"tokens": tokens, "mask": everything}, cfg)
        np.testing.assert_array_equal(kept, tokens != bos)  # bos None: every token
        mask = everything.copy()
        mask[:, 50:] = False
        kept = store_lib.token_mask({"tokens": tokens, "mask": mask}, cfg, skip_bos=False)
        np.testing.assert_array_equal(kept, mask)
    # Packed rows: segment 0 is padding, whatever token it holds.
    seg = np.ones((8, 64), np.int32)
    seg[:, 60:] = 0
    kept = store_lib.token_mask({"tokens": _random_rows(96), "segment_ids": seg}, load("qwen2_nobos")[0])
    np.testing.assert_array_equal(kept, seg != 0)


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory):
    """A harvest of llama_nopad (no pad, bos 1) on random rows: every token but the BOS id is kept."""
    cfg, params = load("llama_nopad")
    tokens = _random_rows(cfg.vocab_size, seed=1)
    path = str(tmp_path_factory.mktemp("llama_store"))
    st = store_lib.harvest(params, cfg, ["blocks.1.resid_post"], iter([{"tokens": tokens}]), path, max_tokens=512)
    return cfg, params, tokens, st


def test_harvest_store_holds_the_real_tokens(llama_store):
    cfg, params, tokens, st = llama_store
    assert st.num_tokens == int(np.sum(tokens != 1)) and np.sum(tokens == 0) > 30  # zeros are content here
    idx = st.token_index
    np.testing.assert_array_equal(st.contexts[idx[:, 0], idx[:, 1]], tokens[tokens != 1])
    want = lm.forward(params, tokens, cfg, capture=("blocks.1.resid_post",)).captured["blocks.1.resid_post"]
    np.testing.assert_allclose(st.array("blocks.1.resid_post"), np.asarray(want)[idx[:, 0], idx[:, 1]], atol=1e-5)


def test_feature_report_renders_a_vocabulary_of_thousands(llama_store, tmp_path):
    cfg, params, tokens, st = llama_store
    tok = tok_lib.tokenizer_for(cfg, folder=ASSETS / "llama_nopad")
    sae_cfg = sae.default_config("topk", d_in=cfg.d_model, n_latents=32, k=4, hookpoint="blocks.1.resid_post")
    sae_params = sae.init_params(sae_cfg, jax.random.key(0), np.asarray(st.array("blocks.1.resid_post")))
    summaries = report.feature_summaries(sae_params, sae_cfg, st, params, n_features=4, top=3, tokenizer=tok)
    assert summaries and sum(len(s["contexts"]) for s in summaries) >= 4
    shown = {c["token"] for s in summaries for c in s["contexts"]} | {t for s in summaries for t, _ in s["promoted"]}
    text = report.token_text(tok)
    big = [int(i) for i in np.unique(tokens) if i >= 1000]
    decoded = {i: tok.tokenizer.decode([i]) for i in big}
    assert all(text(i) == d for i, d in decoded.items() if d.strip() == d and d)  # the token's own text
    assert all(text(i) and not text(i).isspace() for i in decoded)  # whitespace tokens shown visibly
    assert len(shown) > 1 and not any(s.startswith("<") and s[1:-1].isdigit() for s in shown)
    page = open(report.write_report(str(tmp_path / "r.html"), summaries, title="llama", header={})).read()
    assert all(f"<mark>{html.escape(c['token'])}</mark>" in page for s in summaries for c in s["contexts"])
    assert report.token_text(None, 2048)(1500) == "<1500>"  # no tokenizer: ids, never the arithmetic alphabet
    assert report.token_text(None)(3) == "0"  # the arithmetic default is unchanged
