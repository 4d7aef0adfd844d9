"""The general (prompt, completion) pipeline with non-arithmetic tokenizers: the string task with the printable-text
tokenizer, a plain callable source, and an HF BPE without BOS or pad."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.models import lm
from framework.tasks import data as D
from framework.tasks import text, tokenizer
from framework.tasks.hf_tokenizer import HFTokenizer
from framework.training.loss import next_token_loss

TEXT = tokenizer.TEXT_TOKENIZER
SOURCE = text.string_source()
SEQ = SOURCE.max_tokens


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_string_task_examples_are_exact_and_deterministic():
    s = D.split_seed(0, "train")
    ex = [SOURCE.example(s, i) for i in range(50)]
    assert all(text.solve(e.prompt) == e.completion for e in ex)
    assert {e.prompt.split(":")[0] for e in ex} == {"copy", "reverse"}
    assert all(3 <= e.fields["length"] <= 12 for e in ex)
    assert [SOURCE.example(s, i) for i in range(50)] == ex
    assert SOURCE.example(s + 1, 0) != ex[0]
    with pytest.raises(ValueError, match="expected 'op: s"):
        text.solve("sort: abc\n")


def test_batches_hold_the_indexed_examples_with_the_mask_on_the_completion():
    seed, bsz, i = 4, 5, 3
    ds = D.make_text_dataset(SOURCE, "text", seed=seed, batch_size=bsz, seq_len=SEQ + 2)
    b = ds[i]
    assert list(b) == ["tokens", "loss_mask", "prompt_lengths", "length"]
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (bsz, SEQ + 2)
    assert b["loss_mask"].dtype == np.float32 and b["length"].dtype == b["prompt_lengths"].dtype == np.int32
    assert 0 <= b["tokens"].min() and b["tokens"].max() < TEXT.vocab_size
    for j in range(bsz):
        ex = SOURCE.example(D.split_seed(seed, "train"), i * bsz + j)
        toks, mask, pl = b["tokens"][j], b["loss_mask"][j], b["prompt_lengths"][j]
        n = 1 + len(ex.prompt) + len(ex.completion) + 1
        assert toks[0] == TEXT.bos_id and toks[n - 1] == TEXT.eos_id and np.all(toks[n:] == TEXT.pad_id)
        assert pl == 1 + len(ex.prompt) and b["length"][j] == ex.fields["length"]
        assert TEXT.decode(toks[1:pl]) == ex.prompt and TEXT.decode(toks[pl:]) == ex.completion
        assert np.flatnonzero(mask).tolist() == list(range(pl, n))
    all_mask = D.make_text_dataset(SOURCE, "text", seed=seed, batch_size=bsz, seq_len=SEQ, loss_on="all")[i]
    for toks, mask in zip(all_mask["tokens"], all_mask["loss_mask"]):
        n = int(np.flatnonzero(toks == TEXT.eos_id)[0]) + 1
        assert np.flatnonzero(mask).tolist() == list(range(1, n))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_determinism_and_resume_from_a_step(prefetch):
    kw = dict(seed=2, batch_size=3, seq_len=SEQ)
    ds = D.make_text_dataset(SOURCE, "text", **kw)
    assert _equal(ds[7], D.make_text_dataset(text.string_source(), TEXT, **kw)[7])
    full = list(itertools.islice(D.batch_iterator(ds, prefetch=prefetch), 8))
    resumed = list(itertools.islice(D.batch_iterator(ds, start_step=5, prefetch=prefetch), 3))
    assert all(_equal(x, y) for x, y in zip(full[5:], resumed, strict=True))
    assert not _equal(ds[0], ds[1])
    assert not _equal(ds[0], D.make_text_dataset(SOURCE, "text", **(kw | dict(seed=3)))[0])
    assert not _equal(ds[0], D.make_text_dataset(SOURCE, "text", split="eval", **kw)[0])


def test_rows_shard_equals_the_slice_of_the_global_batch():
    ds = D.make_text_dataset(SOURCE, "text", seed=0, batch_size=6, seq_len=SEQ)
    part = D.make_text_dataset(SOURCE, "text", seed=0, batch_size=6, seq_len=SEQ, rows=(2, 5))
    assert _equal(part[4], {k: v[2:5] for k, v in ds[4].items()})


def _packed(seq=96, bsz=4):
    return D.make_text_dataset(SOURCE, "text", seed=1, batch_size=bsz, seq_len=seq, pack=True)[2]


def test_packed_text_rows_hold_whole_examples():
    seq, bsz = 96, 4
    batch = _packed(seq, bsz)
    assert list(batch) == ["tokens", "loss_mask", "segment_ids", "positions"]
    per_row = seq // SOURCE.min_tokens
    for r in range(bsz):
        seg = batch["segment_ids"][r]
        assert seg.max() >= 2
        for j in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == j)
            ex = SOURCE.example(D.split_seed(1, "train"), (2 * bsz + r) * per_row + j - 1)
            alone = D.encode_text_example(ex, TEXT, seq)
            n = int(alone["loss_mask"].nonzero()[0][-1]) + 1
            assert np.array_equal(batch["tokens"][r, idx], alone["tokens"][:n])
            assert np.array_equal(batch["loss_mask"][r, idx], alone["loss_mask"][:n])
            assert np.array_equal(batch["positions"][r, idx], np.arange(n))
        assert np.all(batch["tokens"][r, seg == 0] == TEXT.pad_id) and np.all(batch["loss_mask"][r, seg == 0] == 0)


@pytest.mark.slow
def test_a_tiny_lm_named_for_the_text_tokenizer_reads_packed_text_batches():
    """End to end: at init (near-zero logits) the loss over the completion tokens is ~ln(V) with V = 100."""
    batch = _packed()
    cfg = lm.LMConfig(
        vocab_size=TEXT.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        max_seq_len=96,
        tokenizer="text",
    )
    assert tokenizer.tokenizer_for(cfg) is TEXT
    tokens = jnp.asarray(batch["tokens"])
    pos, seg = jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])
    logits = lm.apply(lm.init(cfg, jax.random.key(0)), tokens, cfg, positions_BT=pos, segment_ids_BT=seg)
    loss, metrics = next_token_loss(logits, tokens, jnp.asarray(batch["loss_mask"]))
    assert float(metrics["tokens"]) == batch["loss_mask"][:, 1:].sum()
    assert abs(float(loss) - np.log(TEXT.vocab_size)) < 0.05


def test_too_long_examples_error_or_truncate():
    with pytest.raises(ValueError, match=rf"longest example of source 'string' is {SEQ} tokens but seq_len = 20"):
        D.make_text_dataset(SOURCE, "text", seed=0, batch_size=2, seq_len=20)
    unbounded = dataclasses.replace(SOURCE, max_tokens=None)  # lengths unknown: checked example by example
    ds = D.make_text_dataset(unbounded, "text", seed=0, batch_size=4, seq_len=20)
    with pytest.raises(ValueError, match=r"example \d+ of source 'string' is \d+ tokens but seq_len = 20"):
        [ds[i] for i in range(20)]
    cut = D.make_text_dataset(SOURCE, "text", seed=0, batch_size=4, seq_len=20, too_long="truncate")
    full = D.make_text_dataset(SOURCE, "text", seed=0, batch_size=4, seq_len=SEQ)
    for i in range(3):
        a, b = cut[i], full[i]
        assert np.array_equal(a["tokens"], b["tokens"][:, :20])
        assert np.array_equal(a["loss_mask"], b["loss_mask"][:, :20])
        assert np.array_equal(a["prompt_lengths"], np.minimum(b["prompt_lengths"], 20))
    packed = D.make_text_dataset(unbounded, "text", seed=0, batch_size=2, seq_len=20, pack=True, too_long="truncate")
    assert packed[0]["tokens"].shape == (2, 20)


def test_a_callable_source_and_an_hf_tokenizer_without_bos_or_pad(tmp_path):
    from test_tokenizer import _tiny_bpe

    folder = _tiny_bpe(tmp_path / "tok", specials=("<s>", "</s>"), padding=False)
    tok = HFTokenizer.from_pretrained(folder, eos_ids=1)  # no config files: name the EOS
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, None)

    def source(stream_seed, index):  # a plain callable of (stream_seed, index) returning two strings
        return (f"say {index % 3}:", " hello fox" * (1 + index % 2))

    ds = D.make_text_dataset(source, tok, seed=0, batch_size=4, seq_len=24)
    b = ds[1]
    assert list(b) == ["tokens", "loss_mask", "prompt_lengths"]
    for j in range(4):
        prompt, completion = source(None, 4 + j)
        p, c = tok.encode(prompt), tok.encode(completion)
        n, pl = len(p) + len(c) + 1, b["prompt_lengths"][j]
        assert pl == len(p) and np.array_equal(b["tokens"][j, :n], np.concatenate([p, c, [1]]))
        assert np.all(b["tokens"][j, n:] == tok.eos_id)  # no pad: padding is EOS, never a target
        assert np.flatnonzero(b["loss_mask"][j]).tolist() == list(range(pl, n))
        assert tok.decode(b["tokens"][j, pl:]) == completion
    assert np.array_equal(D.encode_text_prompt("say 1:", tok), tok.encode("say 1:"))


def test_collate_text_and_encode_text_prompt():
    exs = [("copy: ab\n", "ab\n"), D.TextExample("reverse: ab\n", "ba\n")]
    b = D.collate_text(exs, "text", seq_len=20)
    assert b["tokens"].shape == (2, 20) and list(b) == ["tokens", "loss_mask", "prompt_lengths"]
    prompt = D.encode_text_prompt("copy: ab\n", "text")
    assert prompt[0] == TEXT.bos_id and np.array_equal(b["tokens"][0, : len(prompt)], prompt)
    assert TEXT.decode(b["tokens"][1, b["prompt_lengths"][1] :]) == "ba\n"
    with pytest.raises(ValueError, match="is 17 tokens but seq_len = 8"):
        D.collate_text([("copy: abcdef\n", "x\n")], "text", seq_len=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_on="solution"), r"loss_on = 'solution'; expected one of \('completion', 'all'\)"),
        (dict(too_long="drop"), r"too_long = 'drop'"),
        (dict(batch_size=0), r"batch_size = 0"),
        (dict(split="dev"), r"split = 'dev'"),
        (dict(tokenizer="gpt2"), r"tokenizer = 'gpt2' is not one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kw = dict(seed=0, batch_size=2, seq_len=SEQ, tokenizer="text") | kwargs
    with pytest.raises(ValueError, match=match):
        D.make_text_dataset(SOURCE, **kw)


def test_bad_sources_raise():
    def wrong_fields(s, i):
        return D.TextExample("copy: a\n", "a\n", {"len": 1})

    with pytest.raises(ValueError, match=r"example 0 has fields \['len'\]; the source declares \['length'\]"):
        source = D.TextSource(wrong_fields, fields=("length",))
        D.make_text_dataset(source, "text", seed=0, batch_size=1, seq_len=9)[0]
    with pytest.raises(ValueError, match="prompt and completion must be str"):
        D.make_text_dataset(lambda s, i: ("a", 3), "text", seed=0, batch_size=1, seq_len=9)[0]
    with pytest.raises(ValueError, match=r"character 'é' at position 6 is not in the 'text' tokenizer"):
        D.make_text_dataset(lambda s, i: ("copy: é\n", "é\n"), "text", seed=0, batch_size=1, seq_len=9)[0]
    with pytest.raises(ValueError, match=r"character '[cr]' at position 0 is not in the 'arith' tokenizer"):
        D.make_text_dataset(SOURCE, "arith", seed=0, batch_size=1, seq_len=SEQ)[0]
    with pytest.raises(ValueError, match="min_tokens"):
        D.TextSource(wrong_fields, min_tokens=0)


def test_a_tokenizer_without_eos_is_rejected(tmp_path):
    from test_tokenizer import _tiny_bpe

    tok = tokenizer.get_tokenizer(_tiny_bpe(tmp_path / "t", specials=("<s>",), padding=False))
    assert tok.eos_id is None
    with pytest.raises(ValueError, match="has no EOS id"):
        D.make_text_dataset(SOURCE, tok, seed=0, batch_size=1, seq_len=SEQ)
