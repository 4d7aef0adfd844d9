"""Tests for the tokenizers (arithmetic, printable text, HF wrapper), the registry and token-id validation."""

import dataclasses
import json
import os
import pathlib

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


# ------------------------------------------------------------------------------------------ the protocol, "text"
TEXT = tokenizer.TEXT_TOKENIZER


def _tiny_bpe(tmp_path, *, specials=("<pad>", "<s>", "</s>"), padding=True):
    """A byte-level BPE trained here on a few strings (no download), saved as tokenizer.json."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello there, fox!"] * 3, trainer)
    if padding and "<pad>" in specials:
        tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return _tiny_bpe(tmp_path_factory.mktemp("bpe"))


def test_every_tokenizer_meets_the_protocol(bpe_dir):
    hf_tok = tokenizer.get_tokenizer(bpe_dir)
    for tok, name in [(tokenizer.TOKENIZER, "arith"), (TEXT, "text"), (hf_tok, str(bpe_dir))]:
        assert isinstance(tok, tokenizer.Tokenizer) and tok.name == name
        ids = tok.encode("hello" if tok is not tokenizer.TOKENIZER else "Q 12+34\n")
        assert ids.dtype == np.int32 and ids.ndim == 1 and 0 <= ids.min() and ids.max() < tok.vocab_size
        assert tok.decode(ids) == ("hello" if tok is not tokenizer.TOKENIZER else "Q 12+34\n")
        assert tok.decode_batch(np.stack([ids, ids])) == [tok.decode(ids)] * 2
        for special in (tok.pad_id, tok.bos_id, tok.eos_id):
            assert special is None or 0 <= special < tok.vocab_size
    assert not isinstance("arith", tokenizer.Tokenizer)


def test_text_tokenizer_id_layout():
    assert (TEXT.pad_id, TEXT.bos_id, TEXT.eos_id, TEXT.vocab_size) == (0, 1, 2, 100)
    assert TEXT.encode("\t\n").tolist() == [3, 4]
    printable = "".join(chr(c) for c in range(32, 127))
    assert TEXT.encode(printable).tolist() == [ord(c) - 27 for c in printable] == list(range(5, 100))
    assert tokenizer.TEXT_ALPHABET == "\t\n" + printable


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=60))
def test_text_tokenizer_round_trips_printable_text_or_names_the_first_bad_character(text):
    try:
        ids = TEXT.encode(text)
    except ValueError as err:
        pos = next(i for i, c in enumerate(text) if c not in tokenizer.TEXT_ALPHABET)
        assert f"character {text[pos]!r} at position {pos}" in str(err) and "'text'" in str(err)
    else:
        assert all(c in tokenizer.TEXT_ALPHABET for c in text)
        assert TEXT.decode(np.concatenate([[TEXT.bos_id], ids, [TEXT.eos_id, 7, TEXT.pad_id]])) == text


@pytest.mark.parametrize("text, pos", [('{"tool": "add"}\r\n', 15), ("naïve", 2), ("a\x00", 1)])
def test_text_tokenizer_oov_error(text, pos):
    with pytest.raises(ValueError, match=rf"character .* at position {pos} is not in the 'text' tokenizer"):
        TEXT.encode(text)


def test_text_decode_checks_ids():
    with pytest.raises(ValueError, match=r"decode: token id 100 at position \(1,\)"):
        TEXT.decode([5, 100])


# ------------------------------------------------------------------------------------------------- HF wrapper
def test_hf_wrapper_round_trip_and_special_ids_from_the_tokenizer(bpe_dir):
    tok = tokenizer.get_tokenizer(str(bpe_dir / "tokenizer.json"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, None, None)  # pad from the padding setting; no config files
    text = "hello there, quick fox!"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text)  # merges learnt
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([[tok.pad_id], ids, [tok.pad_id]])) == text
    assert tok.decode([tok.pad_id, *ids], skip_special_tokens=False) == "<pad>" + text
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} at position \(0,\)"):
        tok.decode([tok.vocab_size])


def test_hf_special_ids_from_the_checkpoint_config(tmp_path):
    folder = _tiny_bpe(tmp_path / "ckpt")
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": None}))
    tok = tokenizer.get_tokenizer("hf", folder=folder)
    # pad_token_id null in config.json: falls back to the tokenizer's padding setting, never an invented id.
    assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (1, (2, 0), 2, 0)
    ids = tok.encode("hello fox")
    assert tok.decode([1, *ids, 2, *tok.encode("world")]) == "hello fox"  # stops at the first EOS
    assert tok.decode([1, *ids, 0, 9]) == "hello fox"  # 0 is an EOS too
    with pytest.raises(ValueError, match="pass its folder"):
        tokenizer.get_tokenizer("hf")


def test_hf_tokenizer_without_pad_or_bos(tmp_path):
    """Llama-like: no pad anywhere. tokenizer_config.json names BOS/EOS as strings or AddedToken dicts."""
    folder = _tiny_bpe(tmp_path / "nopad", specials=("<s>", "</s>"), padding=False)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}})
    )
    tok = tokenizer.get_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    assert isinstance(tok, tokenizer.Tokenizer)
    (folder / "tokenizer_config.json").unlink()
    assert (tokenizer.get_tokenizer(folder).bos_id, tokenizer.get_tokenizer(folder).eos_id) == (None, None)


def test_hf_encode_failure_is_a_value_error(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    word = HFTok(models.WordLevel({"<pad>": 0, "hello": 1, "fox": 2}, unk_token=None))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer.get_tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("hello fox").tolist() == [1, 2] and tok.vocab_size == 3
    with pytest.raises(ValueError, match="cannot encode 'hello cat'"):
        tok.encode("hello cat")


def test_hf_asset_checkpoint_tokenizer():
    """The llama_gqa test asset: special ids from its config.json agree with hf.load_hf_tokenizer's vocabulary."""
    folder = pathlib.Path(__file__).parent / "assets" / "hf" / "llama_gqa"
    tok = tokenizer.get_tokenizer("hf", folder=folder)
    raw = tok.tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (raw.token_to_id("<pad>"), raw.token_to_id("<s>"), 2)
    assert tok.decode(tok.encode("Q 12+34\nA 46\n")).replace(" ", "") == "Q12+34\nA46\n"


# --------------------------------------------------------------------------------------------- registry, config
def test_get_tokenizer_names_and_errors(tmp_path):
    assert tokenizer.get_tokenizer("arith") is tokenizer.TOKENIZER
    assert tokenizer.get_tokenizer("text") is TEXT
    assert tokenizer.get_tokenizer(TEXT) is TEXT
    with pytest.raises(ValueError, match=r"tokenizer = 'gpt2' is not one of \['arith', 'text', 'hf'\]"):
        tokenizer.get_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizer.get_tokenizer(tmp_path)


def test_lmconfig_names_its_tokenizer(tiny_cfg, bpe_dir):
    from framework.models import lm

    assert tiny_cfg.tokenizer == "arith" and tokenizer.tokenizer_for(tiny_cfg) is tokenizer.TOKENIZER
    old = {k: v for k, v in tiny_cfg.to_dict().items() if k != "tokenizer"}  # a config.json written before the field
    assert lm.LMConfig.from_config(old) == tiny_cfg
    text_cfg = dataclasses.replace(tiny_cfg, tokenizer="text", vocab_size=128)
    assert tokenizer.tokenizer_for(text_cfg) is TEXT and hash(text_cfg) != hash(tiny_cfg)
    with pytest.raises(ValueError, match=r"tokenizer 'text' has 100 ids, more than model.vocab_size = 24"):
        tokenizer.tokenizer_for(dataclasses.replace(tiny_cfg, tokenizer="text"))
    with pytest.raises(ValueError, match=r"model.tokenizer = 'bpe' is not one of"):
        dataclasses.replace(tiny_cfg, tokenizer="bpe")
    with pytest.raises(ValueError, match=r"model.bos_id=5 but the tokenizer's is 1"):
        dataclasses.replace(tiny_cfg, bos_id=5)
    with pytest.raises(ValueError, match=r"model.eos_ids=\(7,\) lacks the tokenizer's EOS 2"):
        dataclasses.replace(tiny_cfg, tokenizer="text", eos_ids=(7,))
    path_cfg = dataclasses.replace(tiny_cfg, tokenizer=str(bpe_dir), vocab_size=512, bos_id=None, eos_ids=())
    assert tokenizer.tokenizer_for(path_cfg).vocab_size <= 512  # a path is only opened when asked for


def test_imported_checkpoint_names_the_hf_tokenizer(tmp_path):
    from framework.models import hf

    folder = pathlib.Path(__file__).parent / "assets" / "hf" / "llama_gqa"
    cfg, params = hf.load_hf_checkpoint(folder)
    assert cfg.tokenizer == "hf"
    tok = tokenizer.tokenizer_for(cfg, folder=folder)
    assert tok.vocab_size <= cfg.vocab_size and tok.bos_id == cfg.bos_id
    arith_cfg = dataclasses.replace(cfg, tokenizer="arith")
    out = hf.save_hf_checkpoint(params, arith_cfg, tmp_path / "out")  # the tokenizer is no config.json field
    assert "tokenizer" not in json.loads((out / "config.json").read_text())
    assert hf.load_hf_checkpoint(out)[0] == cfg
