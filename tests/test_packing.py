"""Packed training rows: the data layout, and the model treating each segment as its own sequence."""

import jax
import jax.numpy as jnp
import numpy as np

from framework.models import lm
from framework.tasks import data, tokenizer


def test_packed_rows_hold_whole_examples_in_stream_order():
    ds = data.make_dataset(seed=3, batch_size=8, seq_len=224, pack=True, num_steps=(1, 8))
    batch = ds[2]
    assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions"}
    per_row = 224 // data.max_seq_len(1)
    for r in range(8):
        seg, tokens = batch["segment_ids"][r], batch["tokens"][r]
        n_seg = seg.max()
        assert n_seg >= 1
        for j in range(1, n_seg + 1):
            idx = np.flatnonzero(seg == j)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments are contiguous"
            assert np.array_equal(batch["positions"][r, idx], np.arange(len(idx)))
            problem = data.arithmetic.problem_at(
                data.split_seed(3, "train"), (2 * 8 + r) * per_row + j - 1, num_steps=(1, 8)
            )
            unpadded = data.encode_example(problem, 224)
            n = int((unpadded["tokens"] != tokenizer.PAD_ID).sum())
            assert np.array_equal(tokens[idx], unpadded["tokens"][:n])
            assert np.array_equal(batch["loss_mask"][r, idx], unpadded["loss_mask"][:n])
        assert np.all(tokens[seg == 0] == tokenizer.PAD_ID)
        assert np.all(batch["loss_mask"][r][seg == 0] == 0)
    assert np.array_equal(ds[2]["tokens"], batch["tokens"]), "a row is a pure function of its index"


def test_packing_raises_the_share_of_target_tokens():
    plain = data.make_dataset(seed=0, batch_size=64, seq_len=224)[0]
    packed = data.make_dataset(seed=0, batch_size=64, seq_len=224, pack=True)[0]
    assert packed["loss_mask"].mean() > 1.5 * plain["loss_mask"].mean()


def test_packed_logits_equal_separate_sequences(tiny_cfg):
    params = lm.init(tiny_cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: 3 * x, params)  # sharper logits: a leak across segments would show
    batch = data.make_dataset(seed=1, batch_size=2, seq_len=112, pack=True, num_steps=(1, 3))[0]
    logits = lm.apply(
        params,
        jnp.asarray(batch["tokens"]),
        tiny_cfg,
        positions_BT=jnp.asarray(batch["positions"]),
        segment_ids_BT=jnp.asarray(batch["segment_ids"]),
    )
    checked = 0
    for r in range(2):
        for j in range(1, batch["segment_ids"][r].max() + 1):
            idx = np.flatnonzero(batch["segment_ids"][r] == j)
            alone = lm.apply(params, jnp.asarray(batch["tokens"][r, idx])[None], tiny_cfg)[0]
            np.testing.assert_allclose(np.asarray(logits[r, idx]), np.asarray(alone), atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 4
