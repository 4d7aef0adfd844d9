"""LM-backed agents: a round is one batched `generate` (counted), per-row keys, costs via lm.flops, failures recorded;
the role-training Task on the one loop (slow)."""

import json

import jax
import numpy as np
import pytest

from configs import common
from framework import inference
from framework.agents import Agent, LMBackend, MessageLog, Sampling, Topology, run
from framework.agents import log as log_lib
from framework.models import lm
from framework.tasks import arithmetic


@pytest.fixture(scope="module")
def model():
    cfg = lm.LMConfig.from_config(
        common.model_config("tiny", vocab_size=100, tokenizer="text", max_seq_len=64, d_model=32, n_layers=1, d_ff=64)
    )
    return cfg, lm.init(cfg, jax.random.key(0))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = inference.generate

    def generate(params, cfg, prompts, **kw):
        calls.append(len(prompts))
        return real(params, cfg, prompts, **kw)

    monkeypatch.setattr(inference, "generate", generate)
    return calls


def _problems(n, k=(1, 3)):
    return arithmetic.sample_problems(0, n, num_steps=k, modulus=10)


def test_debate_3x2_makes_exactly_three_generate_calls(model, counted, tmp_path):
    cfg, params = model
    P = 5
    agents = [Agent(params, cfg, Sampling(temperature=1.0), f"a{i}") for i in range(3)]
    backend = LMBackend(agents, seed=0)
    path = tmp_path / "log.jsonl"
    res = run(Topology("debate", agents=3, rounds=2), _problems(P), backend, log=MessageLog(path))
    assert counted == [3 * P, 3 * P, 3 * P] and backend.calls == ["solve", "revise1", "revise2"]
    # an untrained model writes no parseable answers: counted failures, no crash
    assert sum(res.failures.values()) == 3 * P * 3 - sum(
        1 for m in log_lib.read_records(path) if m["kind"] == "message" and m["parts"][1]["data"]["failure"] is None
    )
    # every message's FLOPs are lm.flops of its own prompt and new tokens
    for m in log_lib.read_records(path):
        if m["kind"] == "message":
            d = m["parts"][1]["data"]
            assert d["flops"] == pytest.approx(lm.flops(cfg, d["prompt_tokens"], d["new_tokens"]))
    assert res.flops == pytest.approx(sum(a["flops"] for a in res.per_agent.values())) and res.flops > 0
    counted.clear()
    replay = run(Topology("debate", agents=3, rounds=2), _problems(P), LMBackend(agents, seed=0), log=MessageLog(path))
    assert counted == [] and replay.summary() == res.summary()


def test_a_rows_text_does_not_depend_on_its_batch(model):
    cfg, params = model
    agents = [Agent(params, cfg, Sampling(temperature=1.0))] * 2
    problems = _problems(4)
    run(Topology("vote", agents=2), problems, LMBackend(agents, seed=3), log=(big := MessageLog(None)))
    run(Topology("vote", agents=2), problems[:2], LMBackend(agents, seed=3), log=(small := MessageLog(None)))
    texts_big = {m["messageId"]: log_lib.message_text(m) for m in big.messages()}
    texts_small = {m["messageId"]: log_lib.message_text(m) for m in small.messages()}
    assert len(texts_small) == 4 and all(texts_big[k] == v for k, v in texts_small.items())
    assert len(set(texts_big.values())) > 1  # sampled rows differ from one another


def test_over_long_messages_are_failures_not_errors(model, counted):
    cfg, params = model  # max_seq_len 64: a 6-step chain's prompt (16) + budget (41) fits, a 9-step one does not
    problems = arithmetic.sample_problems(1, 2, num_steps=6, modulus=10) + arithmetic.sample_problems(
        2, 1, num_steps=9, modulus=10
    )
    res = run(Topology("single"), problems, LMBackend([Agent(params, cfg)], seed=0))
    assert res.failures.get("message_too_long") == 1 and counted == [2]


def test_backend_refuses_agents_of_another_tokenizer(model):
    cfg, params = model
    arith_cfg = lm.LMConfig.from_config(common.model_config("tiny", d_model=32, n_layers=1, d_ff=64))
    with pytest.raises(ValueError, match="agents read 'text'"):
        LMBackend([Agent(params, arith_cfg)])
    with pytest.raises(ValueError, match="agents is empty"):
        LMBackend([])
    with pytest.raises(ValueError, match="uses 3 agents; the backend has 1"):
        run(Topology("vote", agents=3), _problems(1), LMBackend([Agent(params, cfg)]))
    assert np.isfinite(lm.flops(cfg, 3, 4))


def _study_config(**study):
    from configs.agents.common import agents_experiment

    config = agents_experiment()
    config.model.update(d_model=32, n_layers=1, d_ff=64)
    config.train.update(steps=4, batch_size=8, eval_every=2, checkpoint_every=4, log_every=2, progress=False)
    config.study.update(study)
    return config


@pytest.mark.parametrize(
    "study, match",
    [
        (dict(topologies=("debate:0x2",)), "agents = 0"),
        (dict(debate_grid=("debate:3x0",)), "rounds = 0"),
        (dict(budgets=(0.9, 0.5)), "study.budgets"),
        (dict(problems=0), "study.problems"),
    ],
)
def test_study_config_errors_name_the_field(study, match):
    from experiments import agents as agents_exp
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        agents_exp.validate(_study_config(**study))


@pytest.mark.slow
def test_role_training_runs_on_the_one_loop_and_snapshots_every_budget(tmp_path):
    from experiments import agents as agents_exp

    config = _study_config(budgets=(0.5, 0.99))
    model_cfg, snaps = agents_exp.train_roles(config, str(tmp_path))
    assert sorted(snaps) == [0.5, 0.99]
    for params, info in snaps.values():
        assert info["step"] <= 4 and jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
            lm.init(model_cfg, jax.random.key(0))
        )
    # budgets not reached by the last step are the final params, marked with token_accuracy -1
    assert snaps[0.99][1]["token_accuracy"] == -1.0 and snaps[0.99][1]["step"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in m for m in metrics) and any("eval/token_accuracy" in m for m in metrics)
