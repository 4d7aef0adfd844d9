"""Tests for the grain batch pipeline of the arithmetic task."""

import itertools

import grain
import numpy as np
import pytest

from framework.tasks import arithmetic as A
from framework.tasks import data as D
from framework.tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode

SEQ = D.max_seq_len(8)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_max_seq_len_values():
    assert D.max_seq_len(8) == 108 and D.max_seq_len(8, answer_mod=7) == 111
    assert D.max_seq_len(1) == 1 + len("Q 23+45\n") + len("23+45=68\nA 68\n") + 1


def test_shapes_and_dtypes():
    ds = D.make_dataset(seed=0, batch_size=5, seq_len=SEQ + 4)
    assert isinstance(ds, grain.MapDataset)
    b = ds[0]
    assert set(b) == {"tokens", "loss_mask", "prompt_lengths", "num_steps"}
    assert b["tokens"].shape == (5, SEQ + 4) and b["tokens"].dtype == np.int32
    assert b["loss_mask"].shape == (5, SEQ + 4) and b["loss_mask"].dtype == np.float32
    assert b["prompt_lengths"].shape == (5,) and b["prompt_lengths"].dtype == np.int32
    assert b["num_steps"].shape == (5,) and b["num_steps"].dtype == np.int32
    assert b["tokens"].min() >= 0 and b["tokens"].max() < VOCAB_SIZE


@pytest.mark.parametrize("answer_mod", [None, 7])
def test_examples_are_the_indexed_problems_and_mask_covers_solution(answer_mod):
    seed, bsz, i = 3, 4, 2
    ds = D.make_dataset(seed=seed, batch_size=bsz, seq_len=SEQ + 3, answer_mod=answer_mod)
    b = ds[i]
    for j in range(bsz):
        p = A.problem_at(D.split_seed(seed, "train"), i * bsz + j, answer_mod=answer_mod)
        prompt, sol = A.format_prompt(p), A.format_solution(p)
        toks, mask, pl = b["tokens"][j], b["loss_mask"][j], b["prompt_lengths"][j]
        n = 1 + len(prompt) + len(sol) + 1
        assert toks[0] == BOS_ID and toks[n - 1] == EOS_ID and np.all(toks[n:] == PAD_ID)
        assert pl == 1 + len(prompt) and b["num_steps"][j] == p.num_steps
        assert decode(toks[1:pl]) == prompt and decode(toks[pl:]) == sol
        assert np.flatnonzero(mask).tolist() == list(range(pl, n))  # solution + EOS, nothing else
        assert set(np.unique(mask)) <= {0.0, 1.0}


def test_loss_on_all_covers_every_token_after_bos():
    b = D.make_dataset(seed=0, batch_size=3, seq_len=SEQ, loss_on="all")[0]
    for toks, mask in zip(b["tokens"], b["loss_mask"]):
        n = int(np.flatnonzero(toks == EOS_ID)[0]) + 1
        assert np.flatnonzero(mask).tolist() == list(range(1, n))


def test_determinism():
    a = D.make_dataset(seed=5, batch_size=4, seq_len=SEQ, num_steps=(2, 6))
    b = D.make_dataset(seed=5, batch_size=4, seq_len=SEQ, num_steps=(2, 6))
    for i in [0, 1, 17, 10**9]:
        assert _equal(a[i], b[i])
    assert not _equal(a[0], a[1])
    assert not _equal(a[0], D.make_dataset(seed=6, batch_size=4, seq_len=SEQ, num_steps=(2, 6))[0])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_step_matches_skipping(prefetch):
    ds = D.make_dataset(seed=1, batch_size=3, seq_len=SEQ)
    full = list(itertools.islice(D.batch_iterator(ds, prefetch=prefetch), 9))
    resumed = list(itertools.islice(D.batch_iterator(ds, start_step=6, prefetch=prefetch), 3))
    assert all(_equal(x, y) for x, y in zip(full[6:], resumed, strict=True))
    assert all(_equal(full[i], ds[i]) for i in range(9))


def test_finite_dataset_and_iterator_end():
    ds = D.make_dataset(seed=1, batch_size=2, seq_len=SEQ, num_batches=4)
    assert len(ds) == 4
    assert len(list(D.batch_iterator(ds, start_step=1))) == 3


def test_train_and_eval_streams_differ():
    kw = dict(seed=0, batch_size=8, seq_len=SEQ)
    train, ev = D.make_dataset(split="train", **kw), D.make_dataset(split="eval", **kw)
    assert not _equal(train[0], ev[0])
    assert D.split_seed(0, "train") != D.split_seed(0, "eval")
    with pytest.raises(ValueError, match="split"):
        D.make_dataset(split="validation", **kw)


def test_knobs_pass_through():
    b = D.make_dataset(seed=0, batch_size=6, seq_len=40, num_steps=3, ops="+", modulus=10)[0]
    assert np.all(b["num_steps"] == 3)
    texts = [decode(t) for t in b["tokens"]]
    assert all(set(t) <= set("0123456789+=QA \n") for t in texts)
    assert all(len(t.splitlines()[0]) == len("Q 1+2+3+4") for t in texts)


def test_too_short_seq_len_raises():
    with pytest.raises(ValueError, match="seq_len") as err:
        D.make_dataset(seed=0, batch_size=2, seq_len=SEQ - 1)
    assert "num_steps" in str(err.value)
    D.make_dataset(seed=0, batch_size=2, seq_len=SEQ, num_steps=8)[0]  # exactly enough
    p = A.problem_at(0, 0, num_steps=8)
    with pytest.raises(ValueError, match="seq_len"):
        D.encode_example(p, SEQ - 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_step=3), "unknown task knob"),
        (dict(loss_on="prompt"), "loss_on"),
        (dict(batch_size=0), "batch_size"),
        (dict(ops="+/"), "unknown op"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kw = dict(seed=0, batch_size=2, seq_len=SEQ) | kwargs
    with pytest.raises(ValueError, match=match):
        D.make_dataset(**kw)


def test_collate_and_encode_prompt():
    ps = A.sample_problems(0, 3, num_steps=2)
    b = D.collate(ps, seq_len=40)
    assert b["tokens"].shape == (3, 40)
    for p, toks, pl in zip(ps, b["tokens"], b["prompt_lengths"]):
        prompt = D.encode_prompt(p)
        assert prompt.dtype == np.int32 and prompt[0] == BOS_ID
        assert np.array_equal(toks[:pl], prompt)
        assert np.array_equal(prompt[1:], encode(A.format_prompt(p)))


def test_data_batches_with_out_of_range_ids_are_rejected_naming_id_and_position():
    """The pipeline's boundary check (every batch passes it): jnp.take would clamp a bad id silently."""
    good = D.collate(A.sample_problems(0, 2, num_steps=(1, 2)), seq_len=D.max_seq_len(2))
    bad = dict(good, tokens=good["tokens"].copy())
    bad["tokens"][1, 3] = VOCAB_SIZE
    with pytest.raises(ValueError, match=rf"data batch: token id {VOCAB_SIZE} at position \(1, 3\)"):
        D._checked(bad)
    bad["tokens"][1, 3] = -1
    with pytest.raises(ValueError, match=r"token id -1 at position \(1, 3\)"):
        D._checked(bad)


def _direct_batch(seed, bsz, i, seq_len, loss_on="solution", split="train", **knobs):
    """Batch i built straight from the task's primitives: problem_at, format_*, the arithmetic character ids."""
    out = {"tokens": [], "loss_mask": [], "prompt_lengths": [], "num_steps": []}
    for j in range(bsz):
        p = A.problem_at(D.split_seed(seed, split), i * bsz + j, **knobs)
        prompt = [BOS_ID, *encode(A.format_prompt(p))]
        ids = prompt + [*encode(A.format_solution(p)), EOS_ID]
        tokens = np.full(seq_len, PAD_ID, np.int32)
        tokens[: len(ids)] = ids
        mask = np.zeros(seq_len, np.float32)
        mask[len(prompt) if loss_on == "solution" else 1 : len(ids)] = 1
        for k, v in zip(out, (tokens, mask, np.int32(len(prompt)), np.int32(p.num_steps))):
            out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "seed, kw", [(0, {}), (7, dict(loss_on="all", num_steps=(2, 5))), (3, dict(answer_mod=7, split="eval"))]
)
def test_arithmetic_batches_are_bitwise_the_direct_encoding(seed, kw):
    """The arithmetic task through the general (prompt, completion) pipeline: same keys, order, dtypes and bits."""
    knobs = {k: v for k, v in kw.items() if k not in ("loss_on", "split")}
    ds = D.make_dataset(seed=seed, batch_size=3, seq_len=SEQ + 5, **kw)
    general = D.make_text_dataset(
        D.arithmetic_source(**knobs),
        "arith",
        seed=seed,
        batch_size=3,
        seq_len=SEQ + 5,
        loss_on="all" if kw.get("loss_on") == "all" else "completion",
        split=kw.get("split", "train"),
    )
    for i in (0, 4, 10**7):
        want = _direct_batch(seed, 3, i, SEQ + 5, kw.get("loss_on", "solution"), kw.get("split", "train"), **knobs)
        for got in (ds[i], general[i]):
            assert list(got) == list(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
