"""Search strategies on a toy policy/verifier with a known optimum, batched vs per-problem equality, FLOPs, the LM
policy."""

import dataclasses

import jax
import numpy as np
import pytest

from framework import search, verifiers
from framework.models import lm
from framework.search import revision, toy
from framework.tasks import arithmetic
from framework.verifiers import labels

PROBLEMS = arithmetic.sample_problems(5, 6, num_steps=(2, 5), modulus=100)
ORACLE = toy.OracleScorer()
# Configs to price the toy models' calls with (FLOPs depend on the config alone; nothing is compiled).
COST_CFG = lm.LMConfig(vocab_size=24, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
VERIFIER_COST_CFG = dataclasses.replace(COST_CFG, n_layers=1)
CASES = [
    ("greedy", {}),
    ("majority", {}),
    ("best_of_n", {}),
    ("weighted_best_of_n", {}),
    ("beam", dict(m=4)),
    ("beam", dict(m=2, select="weighted")),
    ("dvts", dict(m=4)),
    ("beam", dict(m=4, lookahead=2)),
    ("dvts", dict(m=2, lookahead=1, aggregation="min")),
]


def test_aggregate_and_vote():
    s = np.array([0.9, 0.5, 0.8])
    assert search.aggregate(s, "last") == 0.8
    assert search.aggregate(s, "min") == 0.5
    assert search.aggregate(s, "product") == pytest.approx(0.36)
    assert search.aggregate(np.zeros(0), "min") == 0.0
    assert search.vote([3, 5, 5, None, 3]) == (3, 0)  # tie: the answer seen first
    assert search.vote([3, 5, 5], [0.9, 0.2, 0.2]) == (3, 0)  # weighted: 0.9 beats 0.4
    assert search.vote([None, None]) == (None, 0)
    with pytest.raises(ValueError, match="aggregation"):
        search.aggregate(s, "mean")


@pytest.mark.parametrize("strategy,kw", [c for c in CASES if c[0] in ("beam", "dvts")])
def test_perfect_prm_finds_the_gold_trace_when_the_candidates_hold_it(strategy, kw):
    # Every parent's M >= branching children cover all options, so the gold line is always a candidate: a perfect
    # PRM must then steer beam search and DVTS onto the gold trace, although the policy alone never writes it
    # (p_correct = 0 outside `cover`).
    policy = toy.ToyPolicy(0.0, branching=2, cover=True)
    res = search.run(strategy, policy, ORACLE, PROBLEMS, n=8, seed=3, **kw)
    for p, t in zip(PROBLEMS, res.traces):
        assert t == arithmetic.format_solution(p)
    assert res.accuracy(PROBLEMS) == 1.0


def test_best_of_n_with_a_perfect_prm_is_pass_at_n():
    policy = toy.ToyPolicy(0.7, branching=3)
    res = search.run("best_of_n", policy, ORACLE, PROBLEMS, n=8, seed=1)
    pool_has_gold = [
        any(labels.gold_labels(p, c)[-1] == 1 for c in cands) for p, cands in zip(PROBLEMS, res.candidates)
    ]
    np.testing.assert_array_equal(res.correct(PROBLEMS), pool_has_gold)
    assert 0 < np.mean(pool_has_gold) < 1  # the budget matters at this p_correct: not a vacuous check
    maj = search.run("majority", policy, None, PROBLEMS, n=8, seed=1)
    assert maj.candidates == res.candidates  # same seed, same samples
    for p, cands, a in zip(PROBLEMS, maj.candidates, maj.answers):
        answers = [search.answer_of(p, c) for c in cands]
        assert answers.count(a) == max(answers.count(x) for x in answers)
    assert maj.tokens_scored.sum() == 0 and res.tokens_scored.sum() > 0


@pytest.mark.parametrize("strategy,kw", CASES)
def test_batched_search_equals_per_problem_search(strategy, kw):
    policy = toy.ToyPolicy(0.5, branching=3)
    batched = search.run(strategy, policy, ORACLE, PROBLEMS, n=8, seed=7, **kw)
    for i, p in enumerate(PROBLEMS):
        alone = search.run(strategy, policy, ORACLE, [p], n=8, seed=7, **kw)
        assert alone.answers[0] == batched.answers[i]
        assert alone.traces[0] == batched.traces[i]
        assert alone.candidates[0] == batched.candidates[i]
        assert alone.tokens_generated[0] == batched.tokens_generated[i]
        assert alone.tokens_scored[0] == batched.tokens_scored[i]
        # A problem's cost depends on its own calls only, not on the batch it was searched in.
        assert alone.flops(COST_CFG, VERIFIER_COST_CFG) == pytest.approx(
            batched.flops_per_problem(COST_CFG, VERIFIER_COST_CFG)[i], rel=1e-12
        )


def test_search_spends_more_with_more_beams_and_lookahead():
    policy = toy.ToyPolicy(0.5, branching=3)
    small = search.run("beam", policy, ORACLE, PROBLEMS, n=4, m=2, seed=0)
    big = search.run("beam", policy, ORACLE, PROBLEMS, n=16, m=4, seed=0)
    look = search.run("beam", policy, ORACLE, PROBLEMS, n=16, m=4, lookahead=2, seed=0)
    assert small.tokens_generated.sum() < big.tokens_generated.sum() < look.tokens_generated.sum()
    assert small.flops(COST_CFG, VERIFIER_COST_CFG) < big.flops(COST_CFG, VERIFIER_COST_CFG)
    assert big.flops(COST_CFG, VERIFIER_COST_CFG) < look.flops(COST_CFG, VERIFIER_COST_CFG)


class _Recorder:
    """Wraps a policy or scorer and logs every call's rows as (problem, prompt tokens, new tokens): the calls a
    search makes, seen from the model's side."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def extend(self, problems, prefixes, **kw):
        out = self.inner.extend(problems, prefixes, **kw)
        self.rows += list(zip(problems, out.prompt_tokens.tolist(), out.tokens.tolist()))
        return out

    def score(self, problems, completions):
        out = self.inner.score(problems, completions)
        self.rows += [(p, t, 0) for p, t in zip(problems, out.tokens.tolist())]
        return out


@pytest.mark.parametrize("how", ["beam_lookahead", "dvts", "revision"])
def test_flops_price_every_model_call_with_lm_flops(how):
    """`SearchResults.flops` = `lm.flops` of every row of every policy call (its prefill and new tokens) plus
    every verifier pass (its tokens read), per problem: search and revision alike, with nothing left out."""
    policy, scorer = _Recorder(toy.ToyPolicy(0.5, branching=3)), _Recorder(ORACLE)
    if how == "revision":
        res = revision.revise(policy, scorer, PROBLEMS, chains=2, revisions=4, seed=0)
    else:
        kw = dict(m=4, lookahead=1) if how == "beam_lookahead" else dict(m=2)
        res = search.run(how.split("_")[0], policy, scorer, PROBLEMS, n=8, seed=0, **kw)
    index = {id(p): i for i, p in enumerate(PROBLEMS)}
    expected_policy, expected_verifier = np.zeros(len(PROBLEMS)), np.zeros(len(PROBLEMS))
    for p, prompt, new in policy.rows:
        expected_policy[index[id(p)]] += lm.flops(COST_CFG, prompt, new)
    for p, tokens, _ in scorer.rows:
        expected_verifier[index[id(p)]] += lm.flops(VERIFIER_COST_CFG, tokens, 0)
    assert expected_policy.min() > 0 and expected_verifier.min() > 0
    assert sum(prompt for _, prompt, _ in policy.rows) > 0  # prefills are priced, not only new tokens
    np.testing.assert_allclose(res.flops_per_problem(COST_CFG), expected_policy, rtol=1e-12)
    np.testing.assert_allclose(
        res.flops_per_problem(COST_CFG, VERIFIER_COST_CFG), expected_policy + expected_verifier, rtol=1e-12
    )
    assert res.flops(COST_CFG, VERIFIER_COST_CFG) == pytest.approx(expected_policy.sum() + expected_verifier.sum())
    for bad in (1000, None, "tiny"):  # one convention: a model config (or a handle with .cfg), never a bare size
        with pytest.raises(ValueError, match="policy must be a model config"):
            res.flops(bad)


def test_run_rejects_bad_arguments():
    policy = toy.ToyPolicy(0.5)
    for kw, match in [
        (dict(strategy="mcts", n=4), "strategy"),
        (dict(strategy="beam", n=4), "beam width m"),
        (dict(strategy="beam", n=6, m=4), "multiple of m"),
        (dict(strategy="best_of_n", n=0), "n must be"),
        (dict(strategy="best_of_n", n=4, lookahead=1), "lookahead"),
        (dict(strategy="beam", n=4, m=2, aggregation="mean"), "aggregation"),
    ]:
        strategy = kw.pop("strategy")
        with pytest.raises(ValueError, match=match):
            search.run(strategy, policy, ORACLE, PROBLEMS, **kw)
    with pytest.raises(ValueError, match="needs a scorer"):
        search.run("dvts", policy, None, PROBLEMS, n=4, m=2)


def test_lm_policy_and_verifier_search_end_to_end(tiny_cfg):
    """A random tiny LM as policy and PRM: one line per extend, and greedy search batched = per problem.

    Shapes are held to one batch bucket and one prompt bucket (slack_lines=0), so generate compiles once.
    """
    params = lm.init(tiny_cfg, jax.random.key(0))
    problems = arithmetic.sample_problems(2, 2, num_steps=1, modulus=10)
    policy = search.LMPolicy(params, tiny_cfg, temperature=1.0, batch_size=8, min_batch=8)
    out = policy.extend(problems, ["", "1+2=3\n"], until="line", call_key=(0, 1))
    assert all(t.endswith("\n") and t.count("\n") == 1 for t in out.texts)
    assert np.all(out.tokens >= 1) and np.all(out.tokens <= search.policy.line_tokens(10))
    prm = verifiers.Verifier(verifiers.init(params, tiny_cfg, jax.random.key(1)), tiny_cfg, batch_size=8, min_batch=8)
    greedy = search.LMPolicy(params, tiny_cfg, temperature=0.0, batch_size=8, min_batch=8)
    batched = search.run("beam", greedy, prm, problems, n=2, m=1, seed=0, slack_lines=0)
    for i, p in enumerate(problems):
        alone = search.run("beam", greedy, prm, [p], n=2, m=1, seed=0, slack_lines=0)
        assert alone.traces[0] == batched.traces[i] and alone.tokens_scored[0] == batched.tokens_scored[i]
        assert alone.tokens_generated[0] == batched.tokens_generated[i]
    assert all(len(c) == 2 for c in batched.candidates)
    assert batched.tokens_generated.sum() > 0 and batched.tokens_scored.sum() > batched.tokens_generated.sum()


def test_retry_data_resolves_to_the_gold_trace():
    for i, p in enumerate(PROBLEMS):
        text, in_loss = revision.retry_example(p, np.random.default_rng(i), error_rate=0.5)
        assert revision.resolve(text) == arithmetic.format_solution(p)
        lines = text.split("\n")[:-1]
        for j in range(len(lines)):  # exactly the retracted lines are out of the loss
            assert in_loss[j] == (j + 1 >= len(lines) or lines[j + 1] != revision.MARKER)
        ex = revision.encode_retry_example(p, np.random.default_rng(i), 0.5, seq_len=128)
        n_in_loss = sum(len(x) + 1 for x, keep in zip(lines, in_loss) if keep) + 1  # + EOS
        assert ex["loss_mask"].sum() == n_in_loss
    assert revision.resolve("1+2=3\n!\n1+2=4\n!\n!\n1+") == "1+"
    b1 = revision.retry_batch(3, seed=0, batch_size=4, seq_len=128, error_rate=0.3, knobs=dict(modulus=10))
    b2 = revision.retry_batch(3, seed=0, batch_size=4, seq_len=128, error_rate=0.3, knobs=dict(modulus=10))
    np.testing.assert_array_equal(b1["tokens"], b2["tokens"])


def test_revision_with_a_perfect_prm_repairs_every_chain():
    policy = toy.ToyPolicy(0.5, branching=3)
    fixed = revision.revise(policy, ORACLE, PROBLEMS, chains=2, revisions=40, seed=0)
    assert fixed.accuracy(PROBLEMS) == 1.0
    for p, t in zip(PROBLEMS, fixed.traces):
        assert revision.resolve(t) == arithmetic.format_solution(p)
        assert revision.MARKER in t or labels.gold_labels(p, t).all()
    plain = revision.revise(policy, ORACLE, PROBLEMS, chains=2, revisions=0, seed=0)
    assert plain.accuracy(PROBLEMS) < 1.0 and "!" not in "".join(plain.traces)
    assert plain.tokens_generated.sum() < fixed.tokens_generated.sum()
    alone = revision.revise(policy, ORACLE, PROBLEMS[:1], chains=2, revisions=40, seed=0)
    assert alone.traces[0] == fixed.traces[0] and alone.tokens_generated[0] == fixed.tokens_generated[0]


def test_search_on_the_mesh_equals_unsharded_search(tiny_cfg):
    """Policy and PRM on the 8 simulated devices (batch split over `data`) give the same samples, choices and token
    counts as on one device: sampled beam search with a one-line greedy lookahead (line extensions, rollouts and
    PRM scoring all go through the mesh). One-step problems and slack_lines=0 keep it to few compiles."""
    from configs import common
    from framework import sharding

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(common.mesh_config())
    assert dict(mesh.shape)["data"] == 8
    params = lm.init(tiny_cfg, jax.random.key(0))
    prm_params = verifiers.init(params, tiny_cfg, jax.random.key(1))
    prm_params["head"]["w"] = jax.random.normal(jax.random.key(2), prm_params["head"]["w"].shape)
    problems = arithmetic.sample_problems(4, 3, num_steps=1, modulus=10)
    runs = {}
    for name, m in (("one device", None), ("mesh", mesh)):
        kw = dict(batch_size=16, min_batch=16, mesh=m)
        policy = search.LMPolicy(params, tiny_cfg, temperature=1.0, **kw)
        prm = verifiers.Verifier(prm_params, tiny_cfg, **kw)
        runs[name] = [search.run("beam", policy, prm, problems, n=4, m=2, lookahead=1, seed=0, slack_lines=0)]
    for a, b in zip(runs["one device"], runs["mesh"]):
        assert a.candidates == b.candidates and a.traces == b.traces and a.answers == b.answers
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        for key in ("tokens_generated", "tokens_prompt", "tokens_scored"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    sharded = search.LMPolicy(params, tiny_cfg, batch_size=16, mesh=mesh)
    assert len(jax.tree.leaves(sharded.params)[0].sharding.device_set) == 8  # the weights live on every device


HF_FOLDER = "tests/assets/hf/llama_nopad"


def test_imported_hf_policy_speaks_the_task_in_its_own_tokens():
    """The bridge between an imported checkpoint's BPE tokenizer and the task's text, without running the model:
    prompt ids are BOS + the question line and prefix in the model's tokens, a line stops at every id whose text
    holds a newline (and EOS), decoded text is mapped into the arithmetic alphabet, and a tokenizer larger than the
    model is refused."""
    from framework.models import hf

    cfg, params, tokenizer = hf.model_from_config({"hf_path": HF_FOLDER})
    policy = search.LMPolicy(params, cfg, tokenizer=tokenizer)
    p = arithmetic.sample_problems(3, 1, num_steps=2, modulus=10)[0]
    ids = policy._encode(p, "1+2=3\n")
    assert (
        ids[0] == cfg.bos_id and ids[1:].tolist() == tokenizer.encode(arithmetic.format_prompt(p) + "1+2=3\n").tolist()
    )
    stops = set(policy._line_stop)
    assert set(cfg.eos_ids) <= stops and tokenizer.encode("\n")[0] in stops
    assert all("\n" in tokenizer.decode(np.asarray([i], np.int32)) for i in stops - set(cfg.eos_ids))
    assert search.policy.to_task_alphabet("12+3é=4\tA 05\n") == "12+3?=4?A 05\n"
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        search.LMPolicy(params, dataclasses.replace(cfg, vocab_size=100), tokenizer=tokenizer)


@pytest.mark.slow
def test_imported_hf_policy_searches_in_its_own_tokens(tiny_cfg):
    """An imported HF checkpoint (a random Llama with a BPE tokenizer) as the policy, a Lumen PRM on the arithmetic
    tokenizer as the scorer: prompts are the question text in the model's tokens, completions come back as task
    text, and FLOPs are `lm.flops` of the imported config on the model's own token counts. Accuracy is not asserted."""
    from framework.models import hf

    cfg, params, tokenizer = hf.model_from_config({"hf_path": HF_FOLDER})
    problems = arithmetic.sample_problems(3, 2, num_steps=1, modulus=10)
    policy = search.LMPolicy(params, cfg, temperature=1.0, batch_size=8, min_batch=8, tokenizer=tokenizer)
    prefixes = ["", "1+2=3\n"]
    out = policy.extend(problems, prefixes, until="line", call_key=(0, 1))
    want = [1 + len(tokenizer.encode(arithmetic.format_prompt(p) + x)) for p, x in zip(problems, prefixes)]
    assert out.prompt_tokens.tolist() == want  # BOS + the question line and prefix, in the model's tokens
    assert all(t.endswith("\n") and t.count("\n") == 1 for t in out.texts)
    alphabet = set(search.policy.tok.ALPHABET)
    assert all(len(t) <= search.policy.line_tokens(10) + 1 and set(t) <= alphabet for t in out.texts)
    assert np.all(out.tokens >= 1) and np.all(out.tokens <= search.policy.line_tokens(10))
    prm = verifiers.Verifier(verifiers.init(lm.init(tiny_cfg, jax.random.key(0)), tiny_cfg, jax.random.key(1)),
                             tiny_cfg, batch_size=8, min_batch=8)  # fmt: skip
    rec_policy, rec_prm = _Recorder(policy), _Recorder(prm)
    res = search.run("beam", rec_policy, rec_prm, problems, n=2, m=1, seed=0, slack_lines=0)
    for p, t in zip(problems, res.traces):  # decoded text the checker and the PRM's character tokenizer read
        assert set(t) <= alphabet and isinstance(arithmetic.check_solution(p, t), arithmetic.CheckResult)
    index = {id(p): i for i, p in enumerate(problems)}
    expected = np.zeros((2, len(problems)))
    for row, (rec, c) in enumerate(((rec_policy, cfg), (rec_prm, tiny_cfg))):
        for p, prompt, new in rec.rows:
            expected[row, index[id(p)]] += lm.flops(c, prompt, new)
    np.testing.assert_allclose(res.flops_per_problem(cfg), expected[0], rtol=1e-12)
    np.testing.assert_allclose(res.flops_per_problem(cfg, tiny_cfg), expected.sum(0), rtol=1e-12)
    assert res.tokens_generated.sum() == sum(new for _, _, new in rec_policy.rows) > 0
