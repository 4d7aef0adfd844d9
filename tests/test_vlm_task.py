"""Rendered-expression data for the VLM (framework.tasks.render) and the `vlm` experiment's config checks and launch.

Glossary: B batch, T tokens, H/W image height/width, N image tokens.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs.vlm import study, tiny
from experiments import vlm as vlm_exp
from framework import config as config_lib
from framework.tasks import arithmetic, render
from framework.tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID, TEXT_TOKENIZER

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rendering_is_a_pure_function_of_text_seed_and_knobs():
    knobs = dict(noise=0.2, distractors=3, scale=(1, 2))
    a = render.render_expression("3+4*2", seed=5, knobs=knobs)
    assert a.shape == (32, 64, 1) and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(a, render.render_expression("3+4*2", seed=5, knobs=knobs))
    assert not np.array_equal(a, render.render_expression("3+4*2", seed=6, knobs=knobs))
    assert not np.array_equal(a, render.render_expression("3+4*3", seed=5, knobs=knobs))


def test_glyphs_are_drawn_where_the_font_says():
    """Centred, level, scale 1, no noise: the ink is exactly the font's bitmaps side by side (1 px apart)."""
    img = render.render_expression("8-0", seed=0, knobs=dict(jitter=False, scale=(1, 1)))[:, :, 0] > 0
    rows, cols = np.nonzero(img)
    box = img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    blank = np.zeros((5, 1), bool)
    want = np.concatenate([render.FONT["8"], blank, render.FONT["-"], blank, render.FONT["0"]], axis=1)
    np.testing.assert_array_equal(box, want)


def test_cell_rendering_puts_character_i_alone_in_cell_i_and_cell_text_says_which():
    """With `cell`, every character's glyph lies whole inside its own cell (at a jittered offset), empty cells are
    blank, and `cell_text` names each cell's character: the image read as one token per patch."""
    knobs = dict(cell=8, scale=(1, 1), jitter=True, line_jitter=True)
    for seed in range(3):
        img = render.render_expression("3+4*2", seed=seed, knobs=knobs)[:, :, 0] > 0
        grid = render.cell_text("3+4*2", seed=seed, knobs=knobs)
        assert len(grid) == 32 and grid.replace(" ", "") == "3+4*2"
        for i, ch in enumerate(grid):
            block = img[(i // 8) * 8 : (i // 8 + 1) * 8, (i % 8) * 8 : (i % 8 + 1) * 8]
            if ch == " ":
                assert not block.any()
                continue
            rows, cols = np.nonzero(block)
            y, x = rows.min() - (np.argmax(render.FONT[ch].any(1))), cols.min() - np.argmax(render.FONT[ch].any(0))
            np.testing.assert_array_equal(block[y : y + 5, x : x + 3], render.FONT[ch])
    with pytest.raises(ValueError, match="cell=6"):
        render.RenderKnobs(cell=6)


def test_grid_text_rows_hold_the_cells_where_the_image_tokens_go():
    knobs = dict(num_steps=(1, 3), modulus=10)
    task = render.VLMTask(num_image_tokens=32, mode="read", knobs=knobs, render=dict(cell=8, scale=(1, 1)))
    text = render.VLMTask(num_image_tokens=32, mode="read", knobs=knobs, render=task.render, text=True, layout="grid")
    img_b, txt_b = (render.make_vlm_dataset(t, seed=1, batch_size=2)[0] for t in (task, text))
    for b in range(2):
        ex = text.example(render.split_seed(1, "train"), b)
        grid = render.cell_text(ex["completion"], seed=b, knobs=task.render)
        assert render.VLM_TOKENIZER.decode(txt_b["tokens"][b][:32]) == grid and grid.startswith(ex["completion"])
        np.testing.assert_array_equal(txt_b["tokens"][b][32:], img_b["tokens"][b][32:])  # same prompt and answer
    with pytest.raises(ValueError, match="render.cell=0 must tile"):
        render.VLMTask(num_image_tokens=32, text=True, layout="grid")


def test_render_refuses_unknown_characters_and_text_that_does_not_fit():
    with pytest.raises(ValueError, match=r"character 'x' of '3x4' is not in the font"):
        render.render_expression("3x4", seed=0)
    with pytest.raises(ValueError, match=r"12 characters\) does not fit 64 px at scale 2 \(at most 8\)"):
        render.render_expression("1+2+3+4+5+67", seed=0)
    with pytest.raises(ValueError, match="height=16"):
        render.RenderKnobs(height=16)


def test_batches_hold_placeholders_prefix_and_answer_only_loss():
    task = render.VLMTask(num_image_tokens=32, mode="mixed", knobs=dict(num_steps=(1, 3), modulus=10))
    batch = render.make_vlm_dataset(task, seed=3, batch_size=4)[0]
    assert batch["images"].shape == (4, 32, 64, 1) and batch["tokens"].shape == (4, task.seq_len())
    stream = render.split_seed(3, "train")
    for b in range(4):
        ex = task.example(stream, b)
        problem, toks = ex["problem"], batch["tokens"][b]
        assert np.all(toks[:32] == render.IMAGE_TOKEN_ID) and toks[32] == BOS_ID
        P = int(batch["prefix_len"][b])
        assert P == 33 + len(ex["prompt"]) and render.VLM_TOKENIZER.decode(toks[33:P]) == ex["prompt"]
        want = render.expression(problem) if b % 2 == 0 else str(problem.values()[-1])
        assert ex["completion"] == want
        answer = toks[batch["loss_mask"][b] > 0]
        assert render.VLM_TOKENIZER.decode(answer) == want and answer[-1] == EOS_ID
        assert np.all(toks[P + len(want) + 1 :] == PAD_ID)
        np.testing.assert_array_equal(batch["images"][b], render.render_expression(render.expression(problem), seed=b))
    assert arithmetic.apply_op(2, "*", 7, 10) == 4  # answers are the task's own, mod 10


def test_text_task_writes_the_expression_into_the_prompt():
    task = render.VLMTask(num_image_tokens=32, mode="compute", text=True)
    batch = render.make_vlm_dataset(task, seed=0, batch_size=2)[0]
    ex = task.example(render.split_seed(0, "train"), 0)
    assert ex["prompt"] == "value:" + render.expression(ex["problem"]) and not np.any(batch["tokens"] == 100)


def test_trace_answers_are_the_checkers_gold_and_mixed_rows_read_one_in_n():
    """With answer="trace" a "value:" row completes the arithmetic task's gold trace, which its checker grades as
    correct; a mixed stream reads on every read_every-th row; rows and the eval's decode length fit the longest
    trace."""
    knobs = dict(num_steps=(1, 3), modulus=10)
    task = render.VLMTask(num_image_tokens=32, mode="mixed", knobs=knobs, answer="trace", read_every=3)
    batch = render.make_vlm_dataset(task, seed=2, batch_size=6)[0]
    for b in range(6):
        ex = task.example(render.split_seed(2, "train"), b)
        assert ex["mode"] == ("read" if b % 3 == 0 else "compute")
        if ex["mode"] == "compute":
            assert ex["completion"] == arithmetic.format_solution(ex["problem"])
            assert arithmetic.check_solution(ex["problem"], ex["completion"]).process_correct
        answer = batch["tokens"][b][batch["loss_mask"][b] > 0]
        assert render.VLM_TOKENIZER.decode(answer) == ex["completion"] and answer[-1] == EOS_ID
    longest = arithmetic.format_solution(arithmetic.Problem(9, ("*",) * 3, (9,) * 3, 10))
    assert task.seq_len() == 32 + 1 + len("value:") + len(longest) + 1
    assert vlm_exp.max_new_tokens(task) == TEXT_TOKENIZER.encode(longest).size + 1
    with pytest.raises(ValueError, match="task.answer='steps'"):
        render.VLMTask(num_image_tokens=32, answer="steps")
    with pytest.raises(ValueError, match="task.read_every=0"):
        render.VLMTask(num_image_tokens=32, read_every=0)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("stage1.train", ("projector", "encoder"), "stage1.train"),
        ("model.image_token_id", 7, "model.image_token_id"),
        ("task.num_steps", (1, 5), "do not fit a 64 px wide image"),
        ("model.lm.max_seq_len", 40, "model.lm.max_seq_len"),
        ("task.text_layout", "rows", "task.layout='rows'"),
        ("task.cell", 16, r"render.cell=16 must tile the 32x64 image into num_image_tokens=32 cells"),
        ("stage2.lora_rank", -1, "stage2.lora_rank"),
        ("eval.modes", ("write",), "eval.modes"),
    ],
)
def test_config_errors_name_the_key(key, value, match):
    config = study.get_config()
    config.unlock()
    section, field = key.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[field] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        vlm_exp.validate(config)


def test_study_variants_choose_groups_mask_and_projector():
    c = study.get_config("projector=mlp,mask=causal,encoder=frozen,stage1=0")
    assert c.model.projector == "mlp" and not c.model.prefix_lm and c.stage1.steps == 0
    assert tuple(c.stage2.train) == ("projector", "lm")
    vlm_exp.validate(c)
    c = study.get_config("lora=8,augment=1")
    assert c.model.projector == "linear" and c.stage2.lora_rank == 8 and c.task.jitter and c.task.noise > 0
    vlm_exp.validate(c)
    c.unlock()
    c.stage2.train = ("projector", "vision")
    with pytest.raises(config_lib.ConfigError, match="LoRA adapts the LM"):
        vlm_exp.validate(c)
    vlm_exp.validate(tiny.get_config())


def test_pretraining_rule_checks_restarts_the_lr_and_stops_at_threshold_or_cap():
    from framework.training import optim

    config = study.get_config()
    config.unlock()
    config.pretrain.update(steps=2500, until_exact=0.9, check_every=500, max_steps=3200)
    vlm_exp.validate(config)
    pc = config.pretrain
    assert vlm_exp.next_pretrain_block(pc, 2500, 0.9) is None  # met at the first check: exactly `steps` steps
    target, lm = vlm_exp.next_pretrain_block(pc, 2500, 0.5)
    assert target == 3000 and vlm_exp.next_pretrain_block(pc, 3000, 0.5) == (3200, lm | {"warmup_steps": 3000})
    assert vlm_exp.next_pretrain_block(pc, 3200, 0.5) is None  # the cap
    # The block's schedule (the config's, under the "lm" label's settings) restarts at pretrain.lr and decays to
    # lr * min_lr_ratio at its end; before the block it is the first `steps` steps' schedule's own business.
    lr = optim.lr_schedule({**config.train, "steps": target, **lm})
    assert float(lr(2500)) == pytest.approx(pc.lr)
    assert float(lr(3000)) == pytest.approx(pc.lr * config.train.min_lr_ratio)
    for key, value, match in [
        ("until_exact", 1.5, "pretrain.until_exact"),
        ("check_every", 0, "pretrain.check_every"),
        ("max_steps", 500, "pretrain.max_steps"),  # below pretrain.steps (600)
    ]:
        bad = study.get_config()
        bad.unlock()
        bad.pretrain.update(until_exact=0.9, check_every=500, max_steps=5000)
        bad.pretrain[key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            vlm_exp.validate(bad)


@pytest.mark.slow
def test_launch_runs_the_stages_and_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "scripts.launch", "--config=configs/vlm/tiny.py", f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results" / "vlm.json").read_text())
    assert set(results["stages"]) == {"pretrain", "stage1", "stage2"}
    assert set(results["stages"]["stage2"]) == {"read", "compute", "text_compute"}
    assert (tmp_path / "run" / "figures" / "samples.png").stat().st_size > 0
    # tiny.py's pretraining rule never meets its threshold: checks after steps 2 and 3 (the cap), trained to 3.
    assert [c["step"] for c in results["pretrain_checks"]] == [2, 3]
    for stage, steps in (("pretrain", [1, 2, 3]), ("stage1", [1, 2]), ("stage2", [1, 2])):
        records = [json.loads(x) for x in (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/loss" in r] == steps
