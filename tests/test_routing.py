"""Routing library: metrics, routers, calibration and cascades on synthetic outcome tables (no model runs)."""

import numpy as np
import pytest

from framework.routing import calibrate, cascade, metrics, routers
from framework.routing.table import OutcomeTable, Queries


def _synthetic_table(Q=3000, skills=(1.0, 2.5, 4.0), seed=0, flat_cost=False) -> OutcomeTable:
    """M models whose success falls with the step count K, and a confidence signal that tracks correctness."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 9, Q)
    ops = rng.choice(list("+-*"), size=(Q, 8))
    prompts = tuple(f"Q 01{''.join(o + '02' for o in ops[i, : k[i]])}\n" for i in range(Q))
    M = len(skills)
    p = 1 / (1 + np.exp(-(np.asarray(skills)[None, :] - 0.6 * k[:, None])))
    correct = rng.random((Q, M)) < p
    new = (7 * k + 5)[:, None].repeat(M, 1)
    prompt_tokens = 3 * k + 4
    size = np.asarray([1.0, 3.0, 9.0])[:M] * 1e6
    flops = size[None, :] * (np.full((Q, 1), 30.0) if flat_cost else prompt_tokens[:, None] + new)
    conf = np.clip(0.5 + 0.3 * (correct - 0.5) + 0.25 * rng.normal(size=(Q, M)), 0, 1)
    zeros = np.zeros((Q, M))
    return OutcomeTable(
        tuple(f"m{i}" for i in range(M)),
        prompts,
        k,
        correct,
        prompt_tokens,
        new,
        flops,
        {"logprob": conf},
        {"logprob": zeros},
    )


@pytest.fixture(scope="module")
def table():
    return _synthetic_table()


def _points(results):
    return [r.point for r in results]


def test_metrics_on_known_curves():
    weak, strong = metrics.Point(1.0, 0.2), metrics.Point(3.0, 0.6)
    line = [weak, metrics.Point(2.0, 0.4), strong]
    assert metrics.apgr(line, weak, strong) == pytest.approx(0.5, abs=1e-6)
    assert metrics.cpt(line, weak, strong, 0.5) == pytest.approx(0.5, abs=1e-3)
    assert metrics.cpt(line, weak, strong, 0.8) == pytest.approx(0.8, abs=1e-3)
    # A router that reaches the strong accuracy at the weak cost recovers the whole gap at once.
    jump = [metrics.Point(1.0, 0.6)]
    assert metrics.apgr(jump, weak, strong) == pytest.approx(1.0, abs=1e-6)
    assert metrics.cpt(jump, weak, strong, 0.8) == 0.0
    assert metrics.normalized_apgr(line, jump, weak, strong) == pytest.approx(0.0, abs=1e-6)
    # Hull: the point under the chord is dropped; dominated points never count.
    pts = [(1, 0.2), (2, 0.3), (3, 0.6), (4, 0.5)]
    np.testing.assert_allclose(metrics.hull(pts), [[1, 0.2], [3, 0.6]])
    assert metrics.aiq(pts, weak, strong) == pytest.approx(0.4, abs=1e-6)
    assert metrics.auc(pts, weak, strong) > metrics.auc([weak], weak, strong)
    with pytest.raises(ValueError, match="gap_fraction"):
        metrics.cpt(line, weak, strong, 1.5)


def test_route_rule():
    probs = np.asarray([[0.9, 0.9, 0.9], [0.2, 0.7, 0.9], [0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(routers.route(probs, 0.5), [0, 1, 2])
    np.testing.assert_array_equal(routers.route(probs, 0.0), [0, 0, 0])
    np.testing.assert_array_equal(routers.route(probs, 2.0), [2, 2, 2])
    np.testing.assert_array_equal(routers.route(probs, [0.95, 0.1, 0.0]), [1, 1, 1])


def test_oracle_reaches_best_hull_point(table):
    idx = np.arange(table.num_queries)
    train, test = idx[: len(idx) // 2], idx[len(idx) // 2 :]
    all_points = calibrate.model_points(table, test)
    candidates = [
        routers.OracleRouter(table),
        routers.RandomRouter(3),
        routers.MFRouter.fit(table, train),
        routers.KNNRouter.fit(table, train),
        routers.DifficultyRouter.fit(table, train),
    ]
    per_router = {}
    for r in candidates:
        _, res = calibrate.sweep(r, table, test)
        per_router[r.name] = _points(res)
        all_points += per_router[r.name]
    top = metrics.hull(all_points)[-1]
    solvable = table.correct[test].any(axis=1)
    best_cost = np.where(
        solvable, np.where(table.correct[test], table.flops[test], np.inf).min(axis=1), table.flops[test, 0]
    ).mean()
    assert top[1] == pytest.approx(solvable.mean())
    assert top[0] == pytest.approx(best_cost)
    assert any(p == pytest.approx((best_cost, solvable.mean())) for p in per_router["oracle"])


def test_apgr_random_zero_oracle_one():
    # Per-call costs equal across queries, as in RouteLLM; the strong model is good at every K.
    t = _synthetic_table(Q=4000, skills=(1.5, 7.0), seed=1, flat_cost=True)
    idx = np.arange(t.num_queries)
    weak, strong = calibrate.model_points(t, idx)
    oracle = _points(calibrate.sweep(routers.OracleRouter(t), t, idx)[1])
    raw, norm = [], []
    for seed in range(8):
        pts = _points(calibrate.sweep(routers.RandomRouter(2, seed=seed), t, idx)[1])
        raw.append(metrics.apgr(pts, weak, strong))
        norm.append(metrics.normalized_apgr(pts, oracle, weak, strong))
    # The envelope of noisy points sits a little above the line; the bias shrinks with Q (here ~1% accuracy noise).
    assert np.mean(norm) == pytest.approx(0.0, abs=0.05)
    assert np.mean(raw) == pytest.approx(0.5, abs=0.03)
    assert metrics.normalized_apgr(oracle, oracle, weak, strong) == pytest.approx(1.0)
    mf = _points(calibrate.sweep(routers.MFRouter.fit(t, idx[:2000]), t, idx[2000:])[1])
    w2, s2 = calibrate.model_points(t, idx[2000:])
    # The weak model fails the long chains the strong one still solves: a learned router beats chance.
    assert metrics.apgr(mf, w2, s2) > 0.55  # chance: 0.5, with run-to-run noise ~0.02 (the seeds above)


@pytest.mark.parametrize("make", ["difficulty", "mf"])
def test_calibration_hits_share_and_budget(table, make):
    idx = np.arange(table.num_queries)
    r = routers.DifficultyRouter.fit(table, idx) if make == "difficulty" else routers.MFRouter.fit(table, idx)
    q = table.queries(idx)
    probs = r.predict(q)
    for shares in ([0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.0, 0.25, 0.75]):
        tau = calibrate.calibrate_shares(probs, q.tiebreak, shares)
        got = calibrate.evaluate(table, idx, probs, q.tiebreak, tau).shares(3)
        np.testing.assert_allclose(got, shares, atol=0.01)
    cheap, dear = table.flops[:, 0].mean(), table.flops[:, -1].mean()
    budget = cheap + 0.3 * (dear - cheap)
    t = calibrate.calibrate_budget(probs, q.tiebreak, table.flops, budget)
    cost = calibrate.evaluate(table, idx, probs, q.tiebreak, t).cost.mean()
    assert cost <= budget and cost >= 0.99 * budget
    with pytest.raises(ValueError, match="below the cheapest"):
        calibrate.calibrate_budget(probs, q.tiebreak, table.flops, 0.5 * cheap)
    with pytest.raises(ValueError, match="shares"):
        calibrate.calibrate_shares(probs, q.tiebreak, [0.5, 0.6, 0.1])


def test_cascade_never_escalates_past_a_confident_model(table):
    idx = np.arange(table.num_queries)
    for tau in ([0.5, 0.6], [0.3, 0.9], [0.7]):
        res = cascade.Cascade(tuple(tau)).evaluate(table, idx)
        t = np.broadcast_to(np.asarray(tau + [-np.inf] if len(tau) == 2 else tau * 2 + [-np.inf]), (3,))
        conf = table.confidence["logprob"]
        for q in range(table.num_queries):
            confident = [m for m in range(3) if conf[q, m] >= t[m]]
            first = confident[0] if confident else 2
            assert res.stop[q] == first
            assert not res.called[q, first + 1 :].any() and res.called[q, : first + 1].all()
        np.testing.assert_allclose(res.cost, (table.flops * res.called).sum(1))
    shares = [0.6, 0.3, 0.1]
    c = cascade.calibrate_cascade(table, idx, shares)
    stop = c.evaluate(table, idx).stop
    np.testing.assert_allclose(np.bincount(stop, minlength=3) / len(stop), shares, atol=0.01)


def test_router_inputs_are_checked(table):
    with pytest.raises(ValueError, match="k must be"):
        routers.KNNRouter.fit(table, [0, 1], k=5)
    with pytest.raises(ValueError, match="Queries.index"):
        routers.OracleRouter(table).predict(Queries.from_prompts(["Q 1+2\n"]))
    with pytest.raises(ValueError, match="thresholds"):
        cascade.Cascade((0.1, 0.2, 0.3, 0.4)).evaluate(table)
    with pytest.raises(ValueError, match="cheapest first"):
        OutcomeTable(
            ("a", "b"),
            ("x",),
            np.ones(1),
            np.ones((1, 2), bool),
            np.ones(1),
            np.ones((1, 2)),
            np.asarray([[2.0, 1.0]]),
            {},
            {},
        )


def test_utility_rule():
    probs = np.asarray([[0.2, 0.5, 0.9], [0.6, 0.6, 0.7], [0.1, 0.9, 0.95]])
    cost = np.asarray([1.0, 3.0, 9.0])
    np.testing.assert_array_equal(routers.route_utility(probs, cost, 0.0), [2, 2, 2])
    np.testing.assert_array_equal(routers.route_utility(probs, cost, 100.0), [0, 0, 0])
    # price 0.5: utility = p - 0.5 c / 9; row 1's dearer models do not gain enough, row 2's middle model does.
    np.testing.assert_array_equal(routers.route_utility(probs, cost, 0.5), [2, 0, 1])
    with pytest.raises(ValueError, match="ascending"):
        routers.route_utility(probs, cost[::-1], 0.5)


def test_utility_sweep_spans_cheapest_to_most_likely(table):
    idx = np.arange(table.num_queries)
    r = routers.MFRouter.fit(table, idx)
    prices, res = calibrate.sweep_utility(r, table, idx)
    pts = calibrate.model_points(table, idx)
    assert res[-1].point.cost == pytest.approx(pts[0].cost + r.flops(table.queries(idx)).mean())
    assert res[0].point.accuracy >= pts[-1].accuracy - 0.02  # price 0: the most likely model per query
