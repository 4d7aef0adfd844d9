"""Routing on real (tiny, untrained) Lumen models: the outcome table, an online cascade, the hidden-state router."""

import numpy as np
import pytest

from experiments.routing import random_params
from framework import inference
from framework.models import lm
from framework.routing import cascade, routers
from framework.routing.table import Model, OutcomeTable, build_table
from framework.tasks import arithmetic, data


@pytest.fixture(scope="module")
def models():
    out = []
    for i, d in enumerate((16, 32)):
        cfg = lm.LMConfig(
            vocab_size=24,
            d_model=d,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            head_dim=d // 2,
            d_ff=2 * d,
            max_seq_len=64,
            scan_layers=False,
        )
        out.append(Model(f"m{i}", random_params(cfg, i), cfg))
    return out


@pytest.fixture(scope="module")
def problems():
    return arithmetic.sample_problems(3, 8, num_steps=(1, 2), modulus=10)


@pytest.fixture(scope="module")
def table(models, problems):
    return build_table(models, problems, batch_size=8, samples=2, seed=0)


def test_table_is_one_graded_pass_per_model(table, models, problems, tmp_path):
    prompts = [data.encode_prompt(p) for p in problems]
    max_new = max(arithmetic.solution_length(p.num_steps, p.modulus) for p in problems) + 1
    for m, model in enumerate(models):
        out = inference.generate(model.params, model.cfg, prompts, max_new_tokens=max_new)
        lens = np.asarray(out.lengths)
        np.testing.assert_array_equal(table.new_tokens[:, m], lens)
        texts = [data.TOKENIZER.decode(np.asarray(out.tokens[i, : lens[i]])) for i in range(len(problems))]
        np.testing.assert_array_equal(
            table.correct[:, m], [arithmetic.check_solution(p, t).answer_correct for p, t in zip(problems, texts)]
        )
        np.testing.assert_allclose(table.flops[:, m], lm.flops(model.cfg, table.prompt_tokens, lens))
        lp = np.asarray(out.logprobs).sum(1) / lens
        np.testing.assert_allclose(table.confidence["logprob"][:, m], np.exp(lp), rtol=1e-5)
    assert np.all((table.confidence["consistency"] >= 0) & (table.confidence["consistency"] <= 1))
    assert np.all(table.confidence_flops["consistency"] > 0)
    path = str(tmp_path / "t.npz")
    table.save(path)
    back = OutcomeTable.load(path)
    assert back.names == table.names and back.prompts == table.prompts
    np.testing.assert_array_equal(back.flops, table.flops)
    np.testing.assert_array_equal(back.confidence["consistency"], table.confidence["consistency"])


@pytest.mark.slow  # the property is checked fast on a synthetic table (test_routing.py); this is the online path
def test_online_cascade_never_escalates_past_confidence(models, problems):
    prompts = [data.encode_prompt(p) for p in problems]
    N = max(arithmetic.solution_length(p.num_steps, p.modulus) for p in problems) + 1  # the table's compile
    # Untrained models: confidences sit near 1/V; put the threshold at the median so both outcomes occur.
    first = inference.generate(models[0].params, models[0].cfg, prompts, max_new_tokens=N)
    c0, _ = cascade.mean_logprob_confidence(models[0], prompts, first)
    tau = float(np.median(c0))
    res, answers = cascade.Cascade((tau,)).run(models, prompts, max_new_tokens=N)
    np.testing.assert_allclose(res.confidence[:, 0], c0, rtol=1e-6)
    confident = c0 >= tau
    assert confident.any() and (~confident).any()
    np.testing.assert_array_equal(res.stop, np.where(confident, 0, 1))
    assert not res.called[confident, 1].any() and res.called[~confident, 1].all()
    lens0 = np.asarray(first.lengths)
    cost0 = lm.flops(models[0].cfg, np.asarray([len(p) for p in prompts]), lens0)
    np.testing.assert_allclose(res.cost[confident], cost0[confident])
    assert np.all(res.cost[~confident] > cost0[~confident])
    for i in np.nonzero(confident)[0]:
        np.testing.assert_array_equal(answers[i], np.asarray(first.tokens[i, : lens0[i]]))


def test_hidden_state_router(table, models):
    r = routers.HiddenStateRouter.fit(table, None, model=models[0], steps=50)
    q = table.queries()
    p = r.predict(q)
    assert p.shape == (table.num_queries, 2) and np.all((p > 0) & (p < 1))
    # The router's cost: the reading model's prefill of the prompt, the head at one position only, plus its own head.
    c = models[0].cfg
    head = 2.0 * c.d_model * c.vocab_size
    want = lm.flops(c, table.prompt_tokens, 0) - head * (table.prompt_tokens - 1) + 2 * r.w.size
    np.testing.assert_allclose(r.flops(q), want)
    assert isinstance(r, routers.Router)


def test_hidden_features_of_a_layer_prefix(problems):
    """A prefix of k blocks reads the full model's residual stream after block k, through the final norm."""
    cfg = lm.LMConfig(
        vocab_size=24, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=64
    )
    full = Model("two", random_params(cfg, 3), cfg)
    pre = routers.prefix_model(full, 1)
    assert pre.cfg.n_layers == 1 and routers.prefix_model(full, 2) is full
    with pytest.raises(ValueError, match="layers must be an int in \\[1, 2\\]"):
        routers.prefix_model(full, 3)
    prompts = [arithmetic.format_prompt(p) for p in problems[:3]]
    got = routers.hidden_features(pre, prompts)
    ids = [data.encode_text_prompt(t, cfg.tokenizer) for t in prompts]
    tok_BT = np.zeros((len(ids), max(map(len, ids))), np.int32)  # right padding: causal, earlier tokens unchanged
    for i, x in enumerate(ids):
        tok_BT[i, : len(x)] = x
    x_BTD = np.asarray(
        lm.forward(full.params, tok_BT, cfg, capture=("blocks.0.resid_post",)).captured["blocks.0.resid_post"]
    )
    for i, x in enumerate(ids):
        h = x_BTD[i, : len(x)].astype(np.float64)
        h = h / np.sqrt((h**2).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(full.params["final_norm"]["scale"])
        np.testing.assert_allclose(got[i], np.concatenate([h.mean(0), h[-1]]), rtol=1e-4, atol=1e-5)
    n = np.asarray([len(data.encode_text_prompt(t, cfg.tokenizer)) for t in prompts])
    assert np.all(routers.hidden_flops(pre, n) < 0.6 * routers.hidden_flops(full, n))
