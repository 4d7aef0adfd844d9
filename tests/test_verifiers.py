"""Verifiers: label functions vs the checker on hand-made traces, ProcessBench metrics on hand-made cases, the value
head's scoring layout and training."""

import itertools
import shutil

import jax
import numpy as np
import pytest

from framework import verifiers
from framework.models import lm
from framework.search import toy
from framework.tasks import arithmetic
from framework.verifiers import labels, metrics, traces

# Q 23+45+03-17: gold values 23, 68, 71, 54.
PROBLEM = arithmetic.Problem(start=23, ops=("+", "+", "-"), operands=(45, 3, 17))
GOLD = "23+45=68\n68+03=71\n71-17=54\nA 54\n"
WRONG_STEP_1 = "23+45=68\n68+03=72\n72-17=55\nA 55\n"  # step 1 wrong, later steps right from the wrong value
BACK_ON_PATH = "23+45=68\n68+03=70\n70-17=54\nA 54\n"  # steps 1 and 2 wrong, but the value lands back on 54


def test_gold_labels_follow_the_checker():
    assert labels.gold_labels(PROBLEM, GOLD).tolist() == [1, 1, 1, 1]
    assert labels.gold_labels(PROBLEM, WRONG_STEP_1).tolist() == [1, 0, 0, 0]
    assert labels.gold_labels(PROBLEM, BACK_ON_PATH).tolist() == [1, 0, 0, 0]  # right answer, flawed process
    assert labels.gold_labels(PROBLEM, GOLD[:-5] + "54-00=54\nA 54\n").tolist() == [1, 1, 1, 0, 0]  # an extra step
    assert labels.gold_labels(PROBLEM, "23+45=68\nA 68\n").tolist() == [1, 0]  # answered too early
    assert labels.gold_labels(PROBLEM, "23+45=68\n68+0").tolist() == [1]  # an unfinished line has no label
    assert labels.gold_labels(PROBLEM, GOLD + "junk\n").tolist() == [1, 1, 1, 1]  # nothing after the answer counts
    assert labels.outcome_label(PROBLEM, BACK_ON_PATH) == 1.0
    np.testing.assert_array_equal(labels.outcome_labels(PROBLEM, WRONG_STEP_1), [np.nan, np.nan, np.nan, 0.0])


def test_gold_labels_match_check_solution_on_sampled_traces():
    problems = arithmetic.sample_problems(3, 40, num_steps=(1, 5), modulus=10, answer_mod=3)
    policy = toy.ToyPolicy(0.6, branching=3)
    texts = policy.extend(problems, [""] * len(problems), until="answer").texts
    for p, t in zip(problems, texts):
        check = arithmetic.check_solution(p, t)
        lab = labels.gold_labels(p, t)
        assert lab[: p.num_steps].tolist() == [float(x) for x in check.on_gold_path]
        assert lab[-1] == float(check.process_correct and check.answer_correct)
        assert labels.first_error(lab) == (
            None
            if check.process_correct and check.answer_correct
            else check.first_error
            if check.first_error is not None
            else p.num_steps
        )


class _Judge(toy.ToyPolicy):
    """A judge that always recomputes the step right from the value written before it (greedy toy policy)."""

    def __init__(self):
        super().__init__(1.0)


def test_monte_carlo_labels_hard_soft_and_consensus():
    perfect = toy.ToyPolicy(1.0)  # continues right from whatever value was written
    problems, texts = [PROBLEM] * 3, [GOLD, WRONG_STEP_1, BACK_ON_PATH]
    mc = labels.monte_carlo_labels(perfect, problems, texts, n_rollouts=2, seed=0)
    assert [h.tolist() for h in mc.hard] == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 1, 1]]
    assert [s.tolist() for s in mc.soft] == [h.tolist() for h in mc.hard]
    assert mc.rollouts == 3 * 3 * 2  # 3 step lines per trace, 2 rollouts each; answer lines need none

    noisy = labels.monte_carlo_labels(toy.ToyPolicy(0.5, branching=2), problems, texts, n_rollouts=32, seed=1)
    for h, s in zip(noisy.hard, noisy.soft):
        assert np.all((0 <= s) & (s <= 1)) and np.array_equal(h, (s > 0).astype(np.float32))
    assert 0 < noisy.soft[0][0] < 1  # 3 steps to go at p = 0.5: about 1 in 8 rollouts succeeds

    judged = labels.judge_verdicts(_Judge(), problems, texts)
    assert [ok.tolist() for ok in judged.line_ok] == [
        [True, True, True, True],
        [True, False, True, True],  # the judge recomputes 72-17=55 from the written 72: the line itself is right
        [True, False, False, True],
    ]
    cons = labels.consensus_labels(mc.hard, judged.line_ok)
    np.testing.assert_array_equal(cons[0], [1, 1, 1, 1])
    np.testing.assert_array_equal(cons[1], [1, 0, 0, 0])  # judge's prefix verdict agrees with MC everywhere
    np.testing.assert_array_equal(cons[2], [1, 0, np.nan, np.nan])  # MC says good after the lucky step: dropped
    with pytest.raises(ValueError, match="n_rollouts"):
        labels.monte_carlo_labels(perfect, problems, texts, n_rollouts=0)


def test_monte_carlo_label_sets_share_one_set_of_rollouts():
    """Labels for each N_MC from one batch of max(N) rollouts equal labelling with N rollouts alone (the toy
    policy draws per row key, so rollout r of a step prefix is the same draw in both)."""
    policy = toy.ToyPolicy(0.5, branching=2)
    problems, texts = [PROBLEM] * 3, [GOLD, WRONG_STEP_1, BACK_ON_PATH]
    sets = labels.monte_carlo_label_sets(policy, problems, texts, ns=(1, 4, 16), seed=3)
    for n in (1, 4, 16):
        alone = labels.monte_carlo_labels(policy, problems, texts, n_rollouts=n, seed=3)
        for a, b in zip(alone.soft + alone.hard, sets[n].soft + sets[n].hard):
            np.testing.assert_array_equal(a, b)
        assert sets[n].rollouts == alone.rollouts == 9 * n and sets[n].tokens_generated == alone.tokens_generated
    with pytest.raises(ValueError, match="n_rollouts"):
        labels.monte_carlo_label_sets(policy, problems, texts, ns=(4, 0))


def test_earliest_error_f1_and_auroc_on_hand_made_cases():
    r = metrics.earliest_error_f1([None, 2, 1, None], [None, 2, 0, 1])
    assert r["acc_flawed"] == pytest.approx(1 / 3) and r["acc_correct"] == 1.0
    assert r["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert (
        metrics.earliest_error_f1([0, 1], [None, None])["f1"] != metrics.earliest_error_f1([0, 1], [None, None])["f1"]
    )  # NaN: no flawed solutions to be accurate on
    assert metrics.earliest_error_f1([None, 3], [None, 3])["f1"] == 1.0
    assert metrics.predicted_first_error([0.9, 0.6, 0.4, 0.8]) == 2
    assert metrics.predicted_first_error([0.9, 0.6]) is None

    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert metrics.auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 60).astype(float), rng.integers(0, 2, 60)
    pairs = [(a, b) for a, b in itertools.product(s[y == 1], s[y == 0])]
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert metrics.auroc(s, y) == pytest.approx(brute)

    gold = [labels.gold_labels(PROBLEM, t) for t in (GOLD, WRONG_STEP_1, BACK_ON_PATH)]
    perfect = metrics.process_metrics(gold, gold)
    assert perfect["f1"] == 1.0 and perfect["step_auroc"] == 1.0
    lenient = metrics.process_metrics([np.ones(4)] * 3, gold)  # "no error" everywhere
    assert lenient["acc_correct"] == 1.0 and lenient["acc_flawed"] == 0.0 and lenient["f1"] == 0.0


def test_encode_traces_finds_line_ends():
    enc = traces.encode_traces([PROBLEM, PROBLEM], [GOLD, "23+45=68\n68+0"])
    prompt_len = 1 + len(arithmetic.format_prompt(PROBLEM))
    assert enc.line_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert enc.ends[0].tolist() == [prompt_len + 8, prompt_len + 17, prompt_len + 26, prompt_len + 31]
    assert np.all(enc.tokens[np.arange(2)[:, None], enc.ends][enc.line_mask > 0] == traces.NEWLINE_ID)


def _parity_labels(completion: str) -> np.ndarray:
    """A rule readable at each line's end: 1 iff the digit just before the newline is even."""
    return np.asarray([float(int(line[-1]) % 2 == 0) for line in traces.split_lines(completion)], np.float32)


@pytest.fixture(scope="module")
def trained(tiny_cfg):
    """A value head on a random tiny LM trained to read a rule at the line ends of toy traces, plus held-out traces.

    (Learning gold step labels needs a warm start from a policy that can do the arithmetic: that is what the
    scaling experiment does; a random LM cannot learn mod-10 arithmetic in a test's budget.)
    """
    problems = arithmetic.sample_problems(11, 192, num_steps=(1, 3), modulus=10)
    texts = toy.ToyPolicy(0.6, branching=3).extend(problems, [""] * len(problems), until="answer").texts
    lab = [_parity_labels(t) for t in texts]
    params = verifiers.init(lm.init(tiny_cfg, jax.random.key(0)), tiny_cfg, jax.random.key(1))
    params, hist = verifiers.fit(
        params, tiny_cfg, problems[:160], texts[:160], lab[:160], steps=150, batch_size=32, lr=3e-3, log_every=50
    )
    return params, hist, problems[160:], texts[160:], lab[160:]


def test_value_head_learns_a_rule_read_at_line_ends(trained, tiny_cfg):
    params, hist, problems, texts, lab = trained
    assert hist.loss[-1] < 0.5 * hist.loss[0]
    scores = verifiers.Verifier(params, tiny_cfg).score(problems, texts)
    assert [len(s) for s in scores.scores] == [len(x) for x in lab]
    m = metrics.process_metrics(scores.scores, lab)
    assert m["step_auroc"] > 0.95, m  # held-out traces; chance is 0.5


def test_verifier_scores_do_not_depend_on_the_batch(trained, tiny_cfg):
    params, _, problems, texts, _ = trained
    v = verifiers.Verifier(params, tiny_cfg, batch_size=7)  # chunks of 7: several buckets and a ragged last chunk
    together = v.score(problems, texts)
    alone = [v.score([p], [t]).scores[0] for p, t in zip(problems[:5], texts[:5])]
    for a, b in zip(alone, together.scores[:5]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert together.tokens.tolist() == [1 + len(arithmetic.format_prompt(p)) + len(t) for p, t in zip(problems, texts)]
    partial = v.score([problems[0]], [texts[0] + "1+"]).scores[0]  # an unfinished line is not scored
    np.testing.assert_allclose(partial, together.scores[0], atol=1e-5)


def test_packed_rows_give_the_padded_loss(trained, tiny_cfg):
    """Packing several traces per row (segment-masked attention, per-trace positions) leaves every line's logit,
    hence the loss, as in one padded row per trace (what `fit(pack=True)` trains on)."""
    params, _, problems, texts, lab = trained
    enc = traces.encode_traces(problems, texts, seq_len=64, max_lines=8)
    labels_BL, mask_BL = traces.pad_labels(lab, 8)
    idx = np.arange(len(problems))
    (packed,) = verifiers.pack_rows(enc, labels_BL, mask_BL, [idx], seq_len=64)
    assert packed.tokens.shape[0] < len(idx) and packed.tokens.shape[0] % 8 == 0  # fewer rows than traces
    assert packed.mask.sum() == mask_BL.sum() and packed.segment_ids.max() > 1
    loss_p, _ = verifiers.model.loss_fn(params, packed._asdict(), tiny_cfg)
    padded = {"tokens": enc.tokens, "ends": enc.ends, "labels": labels_BL, "mask": mask_BL}
    loss_u, _ = verifiers.model.loss_fn(params, padded, tiny_cfg)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    logits_p = verifiers.model.line_logits(
        params, packed.tokens, packed.ends, tiny_cfg, packed.positions, packed.segment_ids
    )
    logits_u = verifiers.model.line_logits(params, enc.tokens, enc.ends, tiny_cfg)
    rows = verifiers.model._first_fit(enc.lengths, idx, 64)  # the layout pack_rows used: traces per row, in order
    n_lines = enc.line_mask.sum(axis=1).astype(int)
    expected = np.concatenate([np.asarray(logits_u)[i, : n_lines[i]] for row in rows for i in row])
    np.testing.assert_allclose(np.asarray(logits_p)[packed.mask > 0], expected, atol=1e-4)


def _bits(tree):
    return [(np.shape(x), np.asarray(x).tobytes()) for x in jax.tree.leaves(jax.device_get(tree))]


def test_fit_freeze_lm_trains_the_head_only_and_a_killed_fit_resumes_bitwise(trained, tiny_cfg, tmp_path):
    """`fit` is a task on the one loop: freeze_lm is the `train.frozen` regex (the LM keeps its bits even under weight
    decay), and a fit in `checkpoint_dir` that lost its last checkpoint resumes to the same params and history."""
    _, _, problems, texts, lab = trained
    p0 = verifiers.init(lm.init(tiny_cfg, jax.random.key(0)), tiny_cfg, jax.random.key(1))
    kw = dict(steps=6, batch_size=8, log_every=2, freeze_lm=True, weight_decay=0.1, checkpoint_every=2)
    ref, hist = verifiers.fit(p0, tiny_cfg, problems, texts, lab, checkpoint_dir=str(tmp_path), **kw)
    assert _bits(ref["lm"]) == _bits(p0["lm"])
    assert np.all(np.asarray(ref["head"]["w"]) != 0) and hist.steps == [2, 4, 6]
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # killed while writing the last checkpoint
    again, hist2 = verifiers.fit(p0, tiny_cfg, problems, texts, lab, checkpoint_dir=str(tmp_path), **kw)
    assert _bits(again) == _bits(ref) and hist2 == hist


def test_fit_rejects_bad_input(tiny_cfg):
    params = verifiers.init(lm.init(tiny_cfg, jax.random.key(0)), tiny_cfg, jax.random.key(1))
    with pytest.raises(ValueError, match="finished lines but"):
        verifiers.fit(params, tiny_cfg, [PROBLEM], [GOLD], [np.ones(3)], steps=1)
    with pytest.raises(ValueError, match="no line carries a label"):
        verifiers.fit(params, tiny_cfg, [PROBLEM], [GOLD], [np.full(4, np.nan)], steps=1)
    with pytest.raises(ValueError, match="steps"):
        verifiers.fit(params, tiny_cfg, [PROBLEM], [GOLD], [np.ones(4)], steps=0)
