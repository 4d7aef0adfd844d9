"""The generation experiment (experiments/generate.py) on the committed HF goldens: launched like any experiment, its
greedy tokens are `generate`'s and transformers'; samples do not depend on batching; bad configs fail in one line."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from hf_golden import ASSETS, golden

import experiments
from configs.generate import default
from experiments import generate as gen_exp
from framework import config as config_lib
from framework import inference
from framework.models import hf
from framework.tasks import data


def _config(**changes):
    config = default.get_config()
    config.unlock()
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "results", "generations.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_greedy_tokens_equal_generate_and_transformers(tmp_path):
    """Qwen2 golden (no tokenizer.json: prompts are id lines, no BOS) run as the launcher runs it (registry,
    validate, run): 3 prompts in calls of 2 (the last one filled up), greedy for exactly 12 tokens; the records equal
    HF `generate`'s golden tokens and a direct `generate` call."""
    g = golden("qwen2_nobos")
    prompts_BT = g["input_ids"][:, :8].astype(np.int32)
    rows = [*prompts_BT, prompts_BT[0][:5]]
    (tmp_path / "prompts.txt").write_text("\n".join(" ".join(map(str, r)) for r in rows) + "\n")
    workdir = tmp_path / "run"
    config = _config(
        **{
            "model.hf_path": str(ASSETS / "qwen2_nobos"),
            "prompts.text_file": str(tmp_path / "prompts.txt"),
            "sampling.max_new_tokens": 12,
            "sampling.stop_tokens": "none",
            "sampling.batch_size": 2,
        }
    )
    experiment = experiments.get(config.experiment)
    experiment.validate(config)
    summary = experiment.run(config, str(workdir))
    records = _records(workdir)
    got = np.asarray([r["tokens"] for r in records], np.int32)
    np.testing.assert_array_equal(got[:2], g["greedy_tokens"])  # transformers' greedy continuation
    cfg, params = hf.load_hf_checkpoint(ASSETS / "qwen2_nobos")
    for idx in ([0, 1], [2, 2]):  # the experiment's two calls of 2 rows (the second filled up with a copy of row 2)
        direct = inference.generate(params, cfg, [rows[i] for i in idx], max_new_tokens=12, stop_tokens=())
        np.testing.assert_array_equal(got[idx], np.asarray(direct.tokens))
    assert [r["prompt_ids"] for r in records] == [r.tolist() for r in rows]  # ids used as given: no BOS added
    assert all(r["stop_reason"] == "max_new_tokens" and r["length"] == 12 for r in records)
    assert all(r["completion"] is None for r in records)  # no tokenizer.json: no text
    assert summary["generated_tokens"] == 36 and summary["stop_reasons"] == {"stop_token": 0, "max_new_tokens": 3}
    assert json.loads((workdir / "results" / "generate_summary.json").read_text()) == summary


@pytest.mark.slow  # ~7 CPU-s of compiles; the text path's validation (BOS, unknown characters) is fast-tested below
def test_text_prompts_sample_the_same_in_any_batching(tmp_path):
    """Llama golden with its 2048-token tokenizer: text prompts get the model's BOS; a sampled row depends only on
    the seed and its index (row 2, run in a filled-up call of 2, equals a call of its own with its key), and stop
    reasons and lengths agree with the tokens."""
    lines = ["The quick brown fox", "def main():", "0 and 1 are content here"]
    (tmp_path / "p.txt").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    config = _config(
        **{
            "model.hf_path": str(ASSETS / "llama_nopad"),
            "prompts.text_file": str(tmp_path / "p.txt"),
            "sampling.temperature": 1.0,
            "sampling.top_k": 50,
            "sampling.max_new_tokens": 10,
            "sampling.stop_tokens": "2,30",
            "sampling.batch_size": 2,
        }
    )
    gen_exp.run(config, str(tmp_path / "run"))
    records = _records(tmp_path / "run")
    tok = gen_exp.tokenizer(config, hf.hf_model_config(config.model))
    for r, line in zip(records, lines, strict=True):
        assert r["prompt"] == line and r["prompt_ids"] == data.encode_text_prompt(line, tok).tolist()
        assert r["prompt_ids"][0] == 1  # the Llama's BOS
        stopped = r["length"] > 0 and r["tokens"][-1] in (2, 30)
        assert r["stop_reason"] == ("stop_token" if stopped else "max_new_tokens")
        assert len(r["tokens"]) == r["length"] <= 10 and not any(t in (2, 30) for t in r["tokens"][:-1])
        assert r["completion"] == tok.decode(np.asarray(r["tokens"]))
    assert len({tuple(r["tokens"]) for r in records}) == 3
    key = jax.random.fold_in(jax.random.key(0), 2)  # row 2's key, as the module docstring promises
    cfg, params = hf.load_hf_checkpoint(ASSETS / "llama_nopad")
    prompt = np.asarray(records[2]["prompt_ids"], np.int32)
    one = inference.generate(
        params, cfg, [prompt], max_new_tokens=10, temperature=1.0, top_k=50, stop_tokens=(2, 30), rng=key[None]
    )
    assert np.asarray(one.tokens)[0, : int(one.lengths[0])].tolist() == records[2]["tokens"]


@pytest.mark.parametrize(
    "changes, key, match",
    [
        ({}, "model.hf_path", "set exactly one"),
        ({"model.hf_path": "llama_nopad", "lm.workdir": "/x"}, "model.hf_path", "set exactly one"),
        ({"model.hf_path": "/nonexistent"}, "model.hf_path", "no config.json"),
        ({"lm.workdir": "/nonexistent"}, "lm.workdir", "no config.json"),
        ({"model.hf_path": "llama_gqa", "prompts.text_file": "Q 12+é3"}, "prompts.text_file", "'é' at position 5"),
        ({"model.hf_path": "qwen2_nobos", "prompts.text_file": "1 2 x"}, "prompts.text_file", "token ids"),
        ({"model.hf_path": "qwen2_nobos", "prompts.text_file": "1 2 96"}, "prompts.text_file", "outside"),
        ({"model.hf_path": "qwen2_nobos", "prompts.text_file": "1 2", "prompts.format": "text"}, "prompts.format", ""),
        ({"model.hf_path": "llama_nopad", "sampling.max_new_tokens": 126}, "sampling.max_new_tokens", "at most"),
        ({"model.hf_path": "llama_nopad", "sampling.top_p": 0.0}, "sampling.top_p", "in \\(0, 1\\]"),
        ({"model.hf_path": "llama_nopad", "sampling.stop_tokens": "eos,2"}, "sampling.stop_tokens", "comma"),
        ({"model.hf_path": "llama_nopad", "sampling.stop_tokens": "4096"}, "sampling.stop_tokens", "outside"),
    ],
)
def test_bad_configs_fail_before_compiling_naming_the_key(tmp_path, changes, key, match):
    changes = dict(changes)
    if "model.hf_path" in changes and not changes["model.hf_path"].startswith("/"):
        changes["model.hf_path"] = str(ASSETS / changes["model.hf_path"])
    if "prompts.text_file" in changes:
        (tmp_path / "p.txt").write_text(changes["prompts.text_file"] + "\n")
        changes["prompts.text_file"] = str(tmp_path / "p.txt")
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'.*{match}"):
        gen_exp.validate(_config(**changes))


def test_unknown_key_and_task_prompts(tmp_path):
    config = _config(**{"model.hf_path": str(ASSETS / "llama_nopad")})
    config.sampling.beam_width = 4
    with pytest.raises(config_lib.ConfigError, match="sampling.beam_width"):
        gen_exp.validate(config)
    config = _config(**{"model.hf_path": str(ASSETS / "llama_nopad"), "prompts.task_num_steps": 2})
    model_cfg = gen_exp.validate(config)  # no text file: held-out arithmetic problems in the model's own tokenizer
    prompts = gen_exp.load_prompts(config, model_cfg, gen_exp.tokenizer(config, model_cfg))
    assert len(prompts.ids) == 8 and all(p.num_steps == 2 for p in prompts.problems)
    assert all(t.startswith("Q ") for t in prompts.texts) and all(ids[0] == 1 for ids in prompts.ids)


@pytest.mark.slow
def test_a_trained_lumen_lm_on_task_prompts(tmp_path):
    """`lm.workdir` (a train_lm run) with arithmetic prompts: completions are graded, and equal `policy_eval`'s."""
    from configs import common
    from experiments import train_lm
    from framework.tasks import policy_eval
    from framework.training import loop

    lm_config = common.lm_experiment(size="tiny")
    lm_config.task.update(modulus=10, num_steps=(1, 2))
    lm_config.train.update(steps=2, batch_size=8, seq_len=64, checkpoint_every=2, progress=False)
    model_cfg, task = train_lm.make_task(lm_config)
    params = loop.train(lm_config, str(tmp_path / "lm"), task).params
    from framework.tasks import arithmetic

    new_tokens = arithmetic.solution_length(2, 10) + 1  # what policy_eval.complete allows a K = 2 problem
    config = _config(
        **{"lm.workdir": str(tmp_path / "lm"), "prompts.task_num_steps": 2, "sampling.batch_size": 4},
        **{"sampling.max_new_tokens": new_tokens},
    )
    summary = gen_exp.run(config, str(tmp_path / "run"))
    records = _records(tmp_path / "run")
    assert summary["task"]["n"] == 8 and all("answer_correct" in r for r in records)
    prompts = gen_exp.load_prompts(config, model_cfg, gen_exp.tokenizer(config, model_cfg))
    want = policy_eval.complete(params, model_cfg, prompts.problems)
    assert [r["completion"] for r in records] == want
