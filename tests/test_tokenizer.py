"""Tests for the character tokenizer and token-id validation."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.tasks import arithmetic, tokenizer
from framework.tasks.tokenizer import (
    ALPHABET,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    CharTokenizer,
    check_token_ids,
    decode,
    decode_batch,
    encode,
)


def test_constants():
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert len(ALPHABET) == len(set(ALPHABET)) == 21
    assert VOCAB_SIZE == 24
    assert encode(ALPHABET).tolist() == list(range(3, 24))


def test_tokenizer_class_attributes():
    tok = CharTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (24, 0, 1, 2)
    assert tok.decode(tok.encode("Q 12+34\n")) == "Q 12+34\n"


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), answer_mod=st.one_of(st.none(), st.integers(2, 99)))
def test_round_trip_on_problem_text(seed, answer_mod):
    (p,) = arithmetic.sample_problems(seed, 1, answer_mod=answer_mod)
    text = arithmetic.format_prompt(p) + arithmetic.format_solution(p)
    ids = encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 3 and ids.max() < VOCAB_SIZE
    assert decode(ids) == text
    framed = np.concatenate([[BOS_ID], ids, [EOS_ID], [PAD_ID] * 3])
    assert decode(framed) == text


def test_decode_skips_pad_bos_and_stops_at_eos():
    ids = [BOS_ID, *encode("12"), PAD_ID, *encode("3"), EOS_ID, *encode("45")]
    assert decode(ids) == "123"
    assert decode([]) == ""
    assert decode(np.array([EOS_ID, 5], np.int32)) == ""


def test_encode_empty():
    out = encode("")
    assert out.dtype == np.int32 and out.shape == (0,)


@pytest.mark.parametrize("text, char, pos", [("Q 1x", "'x'", 3), ("é", "'é'", 0), ("12\t", "'\\t'", 2)])
def test_oov_character_raises_naming_it(text, char, pos):
    with pytest.raises(ValueError) as err:
        encode(text)
    assert char in str(err.value) and f"position {pos}" in str(err.value)


@pytest.mark.parametrize("ids, bad", [([3, 24, 5], "24"), ([3, 4, -1], "-1")])
def test_decode_out_of_range_id_raises(ids, bad):
    with pytest.raises(ValueError) as err:
        decode(ids)
    pos = ids.index(int(bad))
    assert f"token id {bad}" in str(err.value) and f"({pos},)" in str(err.value)


def test_decode_rejects_2d_and_floats():
    with pytest.raises(ValueError, match="decode_batch"):
        decode(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="integers"):
        decode(np.array([3.0, 4.0]))


def test_decode_batch():
    ids = np.stack([np.pad(encode("12"), (0, 2)), np.pad(encode("3456"), (0, 0))])
    assert decode_batch(ids) == ["12", "3456"]


def test_check_token_ids_names_position_and_where():
    ids = np.full((2, 5), 3, np.int32)
    ids[1, 3] = 99
    with pytest.raises(ValueError) as err:
        check_token_ids(ids, VOCAB_SIZE, where="generate prompt 3")
    msg = str(err.value)
    assert "generate prompt 3" in msg and "99" in msg and "(1, 3)" in msg
    assert check_token_ids(ids[:1], VOCAB_SIZE, where="ok") is not None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_encode_either_round_trips_or_raises_value_error(text):
    try:
        ids = encode(text)
    except ValueError:
        assert any(c not in ALPHABET for c in text)
    else:
        assert decode(ids) == text


def test_decode_accepts_jax_arrays():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jnp = pytest.importorskip("jax.numpy")
    assert tokenizer.decode(jnp.asarray(encode("A 07\n"))) == "A 07\n"
