"""Preference pair builders: exact labels on the arithmetic task, flips, length skew, KTO rows, dropped rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from framework import prefopt
from framework.tasks import arithmetic
from framework.tasks.tokenizer import TEXT_TOKENIZER

KNOBS = dict(num_steps=(2, 4), modulus=100)


def _problem(prompt: str) -> arithmetic.Problem:
    """The problem a prompt line states (the builders do not return problems: parse them back)."""
    body = prompt[2:].strip()
    start, rest = int(body[:2]), body[2:]
    ops, operands = tuple(rest[0::3]), tuple(int(rest[i + 1 : i + 3]) for i in range(0, len(rest), 3))
    return arithmetic.Problem(start=start, ops=ops, operands=operands, modulus=100)


def test_chosen_is_gold_and_rejected_has_exactly_one_bad_step():
    pairs, stats = prefopt.arithmetic_pairs(0, 64, **KNOBS)
    assert stats["pairs"] == 64 and stats["flipped"] == 0
    wrong_answers = 0
    for p in pairs:
        prob = _problem(p.prompt)
        good, bad = arithmetic.check_solution(prob, p.chosen), arithmetic.check_solution(prob, p.rejected)
        assert good.process_correct and good.answer_correct
        assert not bad.process_correct
        wrong_answers += not bad.answer_correct
        assert sum(not ok for ok in bad.step_ok) == 1  # later steps are locally right, from the wrong value
        assert bad.num_steps_written == prob.num_steps
    assert wrong_answers >= 62  # the slip reaches the answer unless a later "*00"-like step absorbs every redraw


def test_flip_rate_and_flipped_pairs_prefer_the_wrong_trace():
    pairs, stats = prefopt.arithmetic_pairs(1, 400, flip_rate=0.3, **KNOBS)
    assert abs(stats["flip_rate"] - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 400)  # within 4 binomial standard deviations
    for p in pairs:
        chosen_ok = arithmetic.check_solution(_problem(p.prompt), p.chosen).process_correct
        assert chosen_ok != p.flipped
    clean, _ = prefopt.arithmetic_pairs(1, 400, **KNOBS)
    assert [p.prompt for p in clean] == [p.prompt for p in pairs]  # same problems: only the labels differ


@pytest.mark.parametrize("skew", [5, -7])
def test_length_skew_changes_length_not_correctness(skew):
    pairs, stats = prefopt.arithmetic_pairs(2, 32, length_skew=skew, **KNOBS)
    base, _ = prefopt.arithmetic_pairs(2, 32, **KNOBS)
    assert stats["chosen_chars"] - stats["rejected_chars"] == pytest.approx(
        (base and np.mean([len(p.chosen) - len(p.rejected) for p in base])) + skew
    )
    for p in pairs:
        assert arithmetic.check_solution(_problem(p.prompt), p.chosen).process_correct


def test_encode_pairs_drops_and_counts_bad_rows_with_any_tokenizer():
    rows = [("Hi?", "Yes.", "No"), ("Hi?", "", "No"), ("Q", "same", "same"), ("Why", "Because.", "Dunno")]
    arrays, stats = prefopt.encode_pairs(rows, TEXT_TOKENIZER, seq_len=16)
    assert stats == dict(pairs=2, dropped_empty=1, dropped_identical=1)
    assert arrays["chosen_tokens"].shape == (2, 16) and arrays["rejected_mask"].shape == (2, 16)
    # mask covers the completion and its EOS: len("Yes.") + 1 tokens
    assert arrays["chosen_mask"][0].sum() == 5 and arrays["rejected_mask"][0].sum() == 3
    n_prompt = 1 + len("Hi?")  # BOS + prompt
    assert arrays["chosen_mask"][0, :n_prompt].sum() == 0
    assert TEXT_TOKENIZER.decode(arrays["chosen_tokens"][0, n_prompt : n_prompt + 4]) == "Yes."
    with pytest.raises(ValueError, match="no usable pair"):
        prefopt.encode_pairs([("a", "b", "b")], TEXT_TOKENIZER, seq_len=8)
    with pytest.raises(ValueError, match="pair"):
        prefopt.encode_pairs([("a", "b")], TEXT_TOKENIZER, seq_len=8)


def test_kto_rows_unpair_and_kl_rows_mismatch():
    pairs, _ = prefopt.arithmetic_pairs(3, 4, **KNOBS)
    rows = prefopt.kto_rows(pairs)
    assert [r[2] for r in rows] == [True, False] * 4
    arrays, stats = prefopt.encode_kto(rows + [("Q 01+01\n", "", True)], "arith", seq_len=64)
    assert stats == dict(rows=8, dropped_empty=1)
    assert arrays["desirable"].tolist() == [1, 0] * 4
    # the KL row i is row i's prompt with the completion of the next row of another prompt (rows 0, 1 share one)
    for i, j in ((0, 2), (1, 2), (7, 0)):
        m, k = arrays["mask"][j] > 0, arrays["kl_mask"][i] > 0
        np.testing.assert_array_equal(arrays["tokens"][j][m], arrays["kl_tokens"][i][k])
        start = int(np.argmax(arrays["mask"][i] > 0))  # BOS + row i's prompt come first
        np.testing.assert_array_equal(arrays["tokens"][i][:start], arrays["kl_tokens"][i][:start])


def test_bad_knobs_name_the_field():
    with pytest.raises(ValueError, match="flip_rate"):
        prefopt.arithmetic_pairs(0, 4, flip_rate=1.5)
    with pytest.raises(ValueError, match="step"):
        prefopt.corrupt_trace(arithmetic.problem_at(0, 0, num_steps=2), 5, 1)


def test_sampled_pairs_pair_a_right_sample_with_a_wrong_one(monkeypatch):
    """The pairing logic on stand-in samples (the policy's `generate` is exercised by the trainer's tests)."""
    problems = arithmetic.sample_problems(5, 3, num_steps=2, modulus=100)
    gold = [arithmetic.format_solution(p) for p in problems]
    bad = [prefopt.corrupt_trace(p, 0, 1) for p in problems]
    samples = {0: [bad[0], gold[1], bad[2]], 1: [gold[0], gold[1], bad[2]]}  # problem 1 all right, 2 all wrong
    calls = iter(range(2))
    monkeypatch.setattr(prefopt.pairs.policy_eval, "complete", lambda *a, **k: samples[next(calls)])
    pairs, stats = prefopt.sampled_pairs(None, None, problems, samples=2, rng=jax.random.key(0))
    assert [(p.chosen, p.rejected) for p in pairs] == [(gold[0], bad[0])]
    assert (stats["problems"], stats["all_right"], stats["all_wrong"], stats["pairs"]) == (3, 1, 1, 1)


def test_sampled_pairs_with_gold_chosen_and_perturbed(monkeypatch):
    """chosen="gold": every problem with a wrong sample pairs the gold trace with it (all-wrong problems too);
    `perturb_pairs` pads the chosen side and flips labels by its seed, marking them."""
    problems = arithmetic.sample_problems(5, 3, num_steps=2, modulus=100)
    gold = [arithmetic.format_solution(p) for p in problems]
    bad = [prefopt.corrupt_trace(p, 0, 1) for p in problems]
    samples = {0: [bad[0], gold[1], bad[2]], 1: [gold[0], gold[1], bad[2]]}
    calls = iter(range(2))
    monkeypatch.setattr(prefopt.pairs.policy_eval, "complete", lambda *a, **k: samples[next(calls)])
    pairs, stats = prefopt.sampled_pairs(None, None, problems, samples=2, rng=jax.random.key(0), chosen="gold")
    assert [(p.chosen, p.rejected) for p in pairs] == [(gold[0], bad[0]), (gold[2], bad[2])]
    assert (stats["all_right"], stats["all_wrong"], stats["pairs"]) == (1, 1, 2)
    skewed, s = prefopt.perturb_pairs(pairs, 0, length_skew=3)
    assert [p.chosen for p in skewed] == [gold[0] + "???", gold[2] + "???"] and s["flipped"] == 0
    flipped, s = prefopt.perturb_pairs(pairs * 50, 0, flip_rate=0.3)
    assert all(
        (p.chosen, p.rejected) == ((q.rejected, q.chosen) if p.flipped else (q.chosen, q.rejected))
        for p, q in zip(flipped, pairs * 50)
    )
    assert 10 < s["flipped"] < 50 and flipped == prefopt.perturb_pairs(pairs * 50, 0, flip_rate=0.3)[0]
    with pytest.raises(ValueError, match="chosen"):
        prefopt.sampled_pairs(None, None, problems, rng=jax.random.key(0), chosen="best")
    with pytest.raises(ValueError, match="flip_rate"):
        prefopt.perturb_pairs(pairs, 0, flip_rate=-0.1)
