"""The LM answerer: its training stream (exact read answers), the reader over `generate`, the experiment's checks."""

import jax
import numpy as np
import pytest

from configs.memory import answerer as answerer_config
from framework import config as config_lib
from framework.memory import answerer, harness
from framework.models import lm
from framework.tasks.tokenizer import TEXT_TOKENIZER


def _split(prompt: str) -> tuple[str, list[str]]:
    q, *lines, a = prompt.split("\n")
    assert q.startswith("Q: ") and a == "A:"
    return q[3:], lines


def test_reading_examples_are_exact_and_deterministic():
    source = answerer.reading_source(budget=256)
    exs = [source.example(7, i) for i in range(60)]
    assert exs == [source.example(7, i) for i in range(60)]
    for ex in exs:
        question, lines = _split(ex.prompt)
        assert ex.completion == f" {harness.rule_reader(question, lines)}\n"  # what the context supports
        assert sum(len(x) + 1 for x in lines) <= 256
        assert 1 + len(TEXT_TOKENIZER.encode(ex.prompt + ex.completion)) + 1 <= source.max_tokens
    answers = [ex.completion.strip() for ex in exs]
    assert 0.1 < np.mean([a == "unknown" for a in answers]) < 0.7 and len(set(answers)) > 10
    styles = {("fact" if "(day " in ex.prompt else "") + ("core" if "core: " in ex.prompt else "") for ex in exs}
    assert styles == {"", "fact", "core"}  # utterance, fact/interval and MemGPT-shaped contexts all occur


def test_lm_reader_answers_through_generate():
    cfg = lm.LMConfig(
        vocab_size=100,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        max_seq_len=96,
        tokenizer="text",
    )
    reader = answerer.LMReader(lm.init(cfg, jax.random.key(0)), cfg, max_new_tokens=4, batch_size=2)
    pairs = [
        ("what is kobu now?", ["day 1: set kobu to 3."]),
        ("what is lima now?", []),
        ("what is kobu now?", ["day 1: set kobu to 3."]),
    ]
    got = reader.answer_batch(pairs)
    assert len(got) == 3 and got[0] == got[2] and all(isinstance(g, str) and "\n" not in g for g in got)
    assert reader(*pairs[0]) == got[0]  # the batch padding does not change a row's greedy answer
    with pytest.raises(ValueError, match="exceeds the answerer's max_seq_len 96"):
        reader("what is kobu now?", ["day 1: chat about the river and the garden again."] * 3)
    arith = lm.LMConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    with pytest.raises(ValueError, match="the answerer reads the text tokenizer"):
        answerer.LMReader(None, arith)


def test_memory_config_is_checked_before_building():
    from experiments import memory as experiment

    config = answerer_config.get_config("size=tiny,steps=2")
    assert experiment.validate(config).tokenizer == "text"
    for path, value, match in (
        (("train", "seq_len"), 150, "train.seq_len"),
        (("task", "context_weight"), 1.5, "task.context_weight"),
        (("study", "stores"), ("vector", "graph"), "unknown stores"),
        (("task", "budget"), 0, "task.budget"),
    ):
        bad = answerer_config.get_config("size=tiny,steps=2")
        with bad.unlocked():
            bad[path[0]][path[1]] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            experiment.validate(bad)
    with pytest.raises(ValueError, match="budget = 0"):
        answerer.reading_source(0)


def test_training_batches_weight_the_answer_and_the_dialogue():
    from experiments import memory as experiment
    from framework.tasks import data

    config = answerer_config.get_config("size=tiny,steps=2,budget=64")
    with config.unlocked():
        config.train.batch_size = 4
    source = answerer.reading_source(64, (config.task.min_events, config.task.max_events))
    _, task = experiment.make_task(config)
    b = next(task.batches(0))
    assert set(b) == {"tokens", "loss_mask", "positions", "segment_ids"}  # packed rows
    answer = answerer.answer_mask(b["tokens"], b["segment_ids"])
    w = config.task.context_weight
    np.testing.assert_allclose(
        b["loss_mask"], np.where(b["segment_ids"] > 0, w + (1 - w) * answer, 0.0) * (b["positions"] > 0)
    )
    # The answer mask equals the completion mask the pipeline builds from the prompt lengths, packed or not.
    for pack in (False, True):
        kw = dict(seed=0, batch_size=4, seq_len=120, pack=pack, num_batches=1)
        done, everything = (
            data.make_text_dataset(source, "text", **kw)[0],
            data.make_text_dataset(source, "text", loss_on="all", **kw)[0],
        )
        got = answerer.answer_mask(everything["tokens"], everything.get("segment_ids"))
        np.testing.assert_array_equal(got, done["loss_mask"])
        assert got.sum() >= 4 * 3


@pytest.mark.slow
def test_experiment_trains_and_runs_the_study(tmp_path):
    from experiments import memory as experiment

    config = answerer_config.get_config("size=tiny,steps=2,lengths=10,seeds=0")
    with config.unlocked():
        config.train.update(progress=False, eval_every=2, checkpoint_every=2)
        config.study.stores = ("facts", "vector_lm")
    out = experiment.run(config, str(tmp_path))
    assert {(r["store"], r["reader"]) for r in out["rows"]} == {
        (s, r) for s in ("facts", "vector_lm") for r in ("rule", "lm")
    }
    assert (tmp_path / "figures" / "memory_lm.png").exists() and (tmp_path / "results" / "memory_study.json").exists()
