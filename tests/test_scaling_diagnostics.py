"""Gold-path ceilings, selection accuracy and the oracle PRM: with the oracle, weighted best-of-N and beam search reach
the gold-path ceiling; a noisier oracle ranks worse; the diagnostics agree with the checker on hand-made traces."""

import dataclasses

import numpy as np
import pytest

from framework import search, verifiers
from framework.models import lm
from framework.search import diagnostics, regimes, toy
from framework.tasks import arithmetic

# Q 23+45+03-17: gold values 23, 68, 71, 54.
PROBLEM = arithmetic.Problem(start=23, ops=("+", "+", "-"), operands=(45, 3, 17))
GOLD = "23+45=68\n68+03=71\n71-17=54\nA 54\n"
BACK_ON_PATH = "23+45=68\n68+03=70\n70-17=54\nA 54\n"  # right answer through a wrong step
WRONG = "23+45=68\n68+03=72\n72-17=55\nA 55\n"
# Hard enough for a toy policy that writes each step right with p = 0.6 (gold trace ~0.6^K): the budget matters.
PROBLEMS = arithmetic.sample_problems(11, 12, num_steps=(3, 6), modulus=10)
COST_CFG = lm.LMConfig(vocab_size=24, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)


def test_on_gold_path_needs_every_step_and_the_answer():
    assert diagnostics.on_gold_path(PROBLEM, GOLD)
    assert diagnostics.on_gold_path(PROBLEM, GOLD + "junk\n")  # nothing after the answer line counts
    assert not diagnostics.on_gold_path(PROBLEM, BACK_ON_PATH)  # the answer is right, the process is not
    assert not diagnostics.on_gold_path(PROBLEM, WRONG)
    assert not diagnostics.on_gold_path(PROBLEM, GOLD[:-5])  # no answer line
    flags = diagnostics.gold_flags([PROBLEM], [[WRONG, GOLD, BACK_ON_PATH]])
    assert flags[0].tolist() == [False, True, False]


def test_selection_accuracy_counts_only_pools_holding_a_gold_sample():
    on_gold = [np.array([False, True, False]), np.array([False, False]), np.array([True, True])]
    scores = [
        [np.array([0.2]), np.array([0.9]), np.array([0.5])],  # top = the gold one: hit
        [np.array([0.9]), np.array([0.1])],  # no gold sample: left out
        [np.array([0.3]), np.array([0.8])],  # top is gold: hit
    ]
    out = diagnostics.selection_accuracy(scores, on_gold)
    assert out == {"selection_accuracy": 1.0, "problems_with_gold": 2, "problems": 3}
    scores[0] = [np.array([0.9]), np.array([0.9]), np.array([0.5])]  # a tie between a gold and a wrong sample
    assert diagnostics.selection_accuracy(scores, on_gold)["selection_accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="problem 0 has 3 scored samples but 2 flags"):
        diagnostics.selection_accuracy(scores, [np.array([True, False])] * 3)


@pytest.fixture(scope="module")
def toy_pool():
    policy = toy.ToyPolicy(0.6, branching=3)
    res = search.run("majority", policy, None, PROBLEMS, n=16, seed=2)
    return policy, res


def test_oracle_weighted_bon_reaches_the_gold_path_ceiling(toy_pool):
    _, pool = toy_pool
    oracle = verifiers.OracleVerifier()
    flat_p = [p for p in PROBLEMS for _ in range(16)]
    flat_t = [c for cands in pool.candidates for c in cands]
    sc = oracle.score(flat_p, flat_t).scores
    lines = [sc[i * 16 : (i + 1) * 16] for i in range(len(PROBLEMS))]
    answers = [[search.answer_of(p, c) for c in cands] for p, cands in zip(PROBLEMS, pool.candidates)]
    flags = diagnostics.gold_flags(PROBLEMS, pool.candidates)
    gold = [p.answer for p in PROBLEMS]
    assert diagnostics.selection_accuracy(lines, flags)["selection_accuracy"] == 1.0
    for n in (1, 4, 8):
        out = diagnostics.subsample_pool(answers, lines, flags, gold, n, np.random.default_rng(n))
        assert 0 < out["gold_pass_at_n"].mean() < 1 or n == 8  # the ceiling binds: not a vacuous check
        np.testing.assert_array_equal(out["weighted_best_of_n_on_gold"], out["gold_pass_at_n"])
        np.testing.assert_array_equal(out["best_of_n_on_gold"], out["gold_pass_at_n"])
        assert np.all(out["weighted_best_of_n"] >= out["gold_pass_at_n"])  # a gold trace always wins the vote
        assert np.all(out["gold_pass_at_n"] <= out["pass_at_n"])


@pytest.mark.parametrize("strategy,kw", [("weighted_best_of_n", {}), ("beam", dict(m=4)), ("beam", dict(m=2))])
def test_oracle_search_reaches_its_own_gold_ceiling(toy_pool, strategy, kw):
    policy, pool = toy_pool
    res = search.run(strategy, policy, verifiers.OracleVerifier(), PROBLEMS, n=8, seed=5, **kw)
    d = diagnostics.search_diagnostics(res, PROBLEMS)
    np.testing.assert_array_equal(d["chosen_on_gold"], d["gold_ceiling"])
    assert np.all(d["correct"] >= d["gold_ceiling"]) and np.all(d["gold_ceiling"] <= d["answer_ceiling"])
    assert d["gold_ceiling"].any()
    if strategy == "beam":
        # Step-wise pruning with a perfect PRM keeps every gold prefix: beam search reaches at least the gold-path
        # pass@16 of 16 independent samples on these problems (the pool above), at a budget of 8.
        assert d["gold_ceiling"].mean() >= np.mean([f.any() for f in diagnostics.gold_flags(PROBLEMS, pool.candidates)])


def test_noisy_oracle_is_deterministic_and_ranks_worse_with_noise(toy_pool):
    _, pool = toy_pool
    flat_p = [p for p in PROBLEMS for _ in range(16)]
    flat_t = [c for cands in pool.candidates for c in cands]
    gold = [verifiers.gold_labels(p, t) for p, t in zip(flat_p, flat_t)]
    aurocs = []
    for noise in (0.0, 2.0, 8.0):
        v = verifiers.OracleVerifier(noise=noise, seed=1)
        s = v.score(flat_p, flat_t).scores
        aurocs.append(verifiers.process_metrics(s, gold)["step_auroc"])
        again = v.score(flat_p[:5][::-1], flat_t[:5][::-1]).scores[::-1]
        for a, b in zip(s[:5], again):
            np.testing.assert_array_equal(a, b)  # a prefix's score depends on nothing but the prefix
        # A prefix scores the same as the line of the longer trace it starts (as with a real PRM).
        t = flat_t[0]
        cut = t.split("\n")
        np.testing.assert_array_equal(v.score([flat_p[0]], ["\n".join(cut[:2]) + "\n"]).scores[0], s[0][:2])
    assert aurocs[0] == 1.0 and aurocs[0] > aurocs[1] > aurocs[2] > 0.5
    tokens = verifiers.OracleVerifier(COST_CFG).score(flat_p[:3], flat_t[:3]).tokens
    assert tokens.tolist() == [len(arithmetic.format_prompt(p)) + 1 + len(t) for p, t in zip(flat_p[:3], flat_t[:3])]


def test_oracle_is_priced_as_the_prm_it_stands_in_for(toy_pool):
    policy, _ = toy_pool
    res = search.run("weighted_best_of_n", policy, verifiers.OracleVerifier(COST_CFG), PROBLEMS[:3], n=4, seed=0)
    big = dataclasses.replace(COST_CFG, n_layers=4)
    assert res.flops(COST_CFG, big) > res.flops(COST_CFG, verifiers.OracleVerifier(COST_CFG)) > res.flops(COST_CFG)
    assert verifiers.OracleVerifier(COST_CFG).num_params == lm.param_count(COST_CFG) + COST_CFG.d_model + 1


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(noise=-1.0), "noise must be a finite number >= 0, got -1.0"),
        (dict(seed=-2), "seed must be an int >= 0"),
        (dict(noise=1.0, margin=0.0), "margin must be > 0 when noise > 0"),
    ],
)
def test_oracle_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        verifiers.OracleVerifier(**kw)


def test_standard_errors_and_interpolation():
    m, se = diagnostics.mean_se([1, 0, 1, 0])
    assert m == 0.5 and se == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    d, se_d = diagnostics.paired_difference([1, 1, 0, 1], [1, 0, 0, 1])
    assert d == 0.25 and se_d == pytest.approx(0.25)
    v = diagnostics.interpolate_at_flops([1.0, 4.0], [np.array([0.0, 1.0]), np.array([1.0, 1.0])], 2.0)
    np.testing.assert_allclose(v, [0.5, 1.0])  # halfway in log FLOPs
    with pytest.raises(ValueError, match="increasing"):
        diagnostics.interpolate_at_flops([2.0, 1.0], [np.zeros(2)] * 2, 1.5)


def test_regime_cell_with_an_oracle_prm_beats_weighted_bon_at_equal_flops():
    """A weak toy policy (each step right with p = 0.5, K = 5..6) and the oracle PRM: beam search keeps every gold
    prefix, so at equal FLOPs it reaches gold-path accuracy that weighted BoN (whose ceiling is ~N * 0.5^K) does not;
    the cell reports it as a paired difference beyond two standard errors, and a pure-noise PRM shows no such gain."""
    policy = toy.ToyPolicy(0.5, branching=3)
    policy.cfg = COST_CFG  # the toy is priced as a small LM
    problems = arithmetic.sample_problems(4, 24, num_steps=(5, 6), modulus=10)
    scorers = {"oracle": verifiers.OracleVerifier(COST_CFG), "noise": verifiers.OracleVerifier(COST_CFG, noise=50.0)}
    ks = np.asarray([p.num_steps for p in problems])
    cell = regimes.map_cell(
        policy, scorers, problems, pool_size=32, budgets=(1, 4, 16, 32), beam_ns=(4,), m=4, seeds=(0, 1),
        groups={"K5": ks == 5, "K6": ks == 6},
    )  # fmt: skip
    assert cell["groups"] == {"all": 24, "K5": int((ks == 5).sum()), "K6": int((ks == 6).sum())}
    oracle, noise = cell["scorers"]["oracle"], cell["scorers"]["noise"]
    assert oracle["quality"]["selection_accuracy"] == 1.0 and oracle["quality"]["step_auroc"] == 1.0
    assert noise["quality"]["step_auroc"] < 0.75
    row = oracle["beam"][4]
    assert not row["extrapolated"] and 1 < row["wbon_n_at_same_flops"] < 32
    assert regimes.beats(row["all"]["on_gold_minus_weighted_best_of_n"]) == 1
    assert row["all"]["on_gold"][0] <= row["all"]["own_gold_ceiling"][0] + 1e-12
    assert regimes.beats(noise["beam"][4]["all"]["on_gold_minus_weighted_best_of_n"]) <= 0
    gold_pass = cell["pool"]["gold_pass_at_n"]["all"]
    assert gold_pass[1][0] <= gold_pass[4][0] <= gold_pass[32][0] <= cell["pool"]["pass_at_n"]["all"][32][0]
    text = regimes.summary({"toy": cell})
    assert "oracle" in text and "*" in text
    with pytest.raises(ValueError, match="multiples of m=4"):
        regimes.map_cell(policy, scorers, problems, pool_size=8, budgets=(1,), beam_ns=(6,), m=4, seeds=(0,))
