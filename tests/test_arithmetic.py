"""Tests for the modular-arithmetic task: formatting, sampling and the step checker."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.tasks import arithmetic as A
from framework.tasks.arithmetic import Problem, check_solution, format_prompt, format_solution
from framework.tasks.tokenizer import ALPHABET


@st.composite
def problems(draw, with_answer_mod=True):
    modulus = draw(st.sampled_from([2, 10, 97, 100, 1000]))
    k = draw(st.integers(1, 8))
    answer_mod = None
    if with_answer_mod and modulus > 2:
        answer_mod = draw(st.one_of(st.none(), st.integers(2, modulus - 1)))
    return Problem(
        start=draw(st.integers(0, modulus - 1)),
        ops=tuple(draw(st.lists(st.sampled_from("+-*"), min_size=k, max_size=k))),
        operands=tuple(draw(st.lists(st.integers(0, modulus - 1), min_size=k, max_size=k))),
        modulus=modulus,
        answer_mod=answer_mod,
    )


EXAMPLE = Problem(start=23, ops=("+", "*", "-"), operands=(45, 3, 17))


def test_reference_example():
    assert format_prompt(EXAMPLE) == "Q 23+45*03-17\n"
    assert format_solution(EXAMPLE) == "23+45=68\n68*03=04\n04-17=87\nA 87\n"
    assert EXAMPLE.values() == (23, 68, 4, 87)
    assert EXAMPLE.num_steps == 3 and EXAMPLE.answer == 87


def test_answer_mod_format():
    p = Problem(start=23, ops=("+", "*", "-"), operands=(45, 3, 17), answer_mod=7)
    assert format_prompt(p) == "Q 23+45*03-17%07\n"
    assert format_solution(p) == "23+45=68\n68*03=04\n04-17=87\nA 03\n"
    assert p.answer == 87 % 7


def test_width_follows_modulus():
    p = Problem(start=5, ops=("*",), operands=(7,), modulus=1000)
    assert format_prompt(p) == "Q 005*007\n" and format_solution(p) == "005*007=035\nA 035\n"
    q = Problem(start=5, ops=("*",), operands=(7,), modulus=10)
    assert format_prompt(q) == "Q 5*7\n" and format_solution(q) == "5*7=5\nA 5\n"


@given(problems())
def test_lengths_match_formulas(p):
    assert len(format_prompt(p)) == A.prompt_length(p.num_steps, p.modulus, p.answer_mod)
    assert len(format_solution(p)) == A.solution_length(p.num_steps, p.modulus)
    assert set(format_prompt(p) + format_solution(p)) <= set(ALPHABET)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start=0, ops=("/",), operands=(1,)), "op"),
        (dict(start=0, ops=("+",), operands=(1, 2)), "operands"),
        (dict(start=100, ops=("+",), operands=(1,)), "start"),
        (dict(start=0, ops=("+",), operands=(1,), modulus=1), "modulus"),
        (dict(start=0, ops=("+",), operands=(1,), answer_mod=100), "answer_mod"),
        (dict(start=0, ops=(), operands=()), "at least one step"),
    ],
)
def test_problem_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Problem(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ops="+/"), "unknown op '/'"),
        (dict(ops="++"), "repeats"),
        (dict(op_weights=(1.0,)), "op_weights"),
        (dict(op_weights=(1.0, -1.0, 1.0)), "op_weights"),
        (dict(modulus=1), "modulus"),
        (dict(answer_mod=1), "answer_mod"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=(5, 2)), "num_steps"),
    ],
)
def test_sampler_knob_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.sample_problems(0, 3, **kwargs)


def test_unknown_knob_raises():
    with pytest.raises(ValueError, match="unknown task knob"):
        A.problem_at(0, 0, num_step=3)


def test_sampling_is_deterministic_and_respects_knobs():
    a = A.sample_problems(7, 50, num_steps=(2, 4), ops="+*", op_weights=[0.0, 1.0], modulus=50, answer_mod=5)
    assert a == A.sample_problems(7, 50, num_steps=(2, 4), ops="+*", op_weights=[0.0, 1.0], modulus=50, answer_mod=5)
    assert a == [
        A.problem_at(7, i, num_steps=(2, 4), ops="+*", op_weights=[0.0, 1.0], modulus=50, answer_mod=5)
        for i in range(50)
    ]
    assert {p.num_steps for p in a} == {2, 3, 4}
    assert all(set(p.ops) == {"*"} and p.modulus == 50 and p.answer_mod == 5 for p in a)
    assert all(0 <= v < 50 for p in a for v in (p.start, *p.operands))
    assert all(p.num_steps == 3 for p in A.sample_problems(1, 20, num_steps=3))
    assert A.sample_problems(7, 10) != A.sample_problems(8, 10)


def test_sampling_from_generator_and_independent_indices():
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert A.sample_problems(g1, 5) == A.sample_problems(g2, 5)
    assert A.sample_problems(g1, 5) != A.sample_problems(np.random.default_rng(3), 5)  # g1 advanced
    assert A.problem_at(11, 1000) == A.problem_at(11, 1000)
    assert A.problem_at(11, 1000) != A.problem_at(11, 1001)


def test_op_mix_follows_weights():
    ps = A.sample_problems(0, 400, num_steps=8, op_weights=(0.6, 0.3, 0.1))
    ops = "".join("".join(p.ops) for p in ps)
    freq = [ops.count(c) / len(ops) for c in "+-*"]
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.03)


# --- checker -----------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(problems())
def test_gold_trace_passes(p):
    r = check_solution(p, format_solution(p))
    assert r.step_ok == (True,) * p.num_steps and r.on_gold_path == r.step_ok
    assert r.first_error is None and r.answer_correct and r.answer == p.answer
    assert r.num_steps_written == p.num_steps and r.values_written == p.values()[1:]
    assert check_solution(p, format_prompt(p) + format_solution(p)) == r  # a copied prompt is skipped
    assert check_solution(p, format_solution(p) + "garbage\n99+99=00") == r  # text after the answer is ignored


@st.composite
def corruptions(draw):
    p = draw(problems())
    lines = format_solution(p).splitlines(keepends=True)
    i = draw(st.integers(0, p.num_steps - 1))
    line = lines[i]
    kind = draw(st.sampled_from(["sub", "del", "ins"]))
    pos = draw(st.integers(0, len(line) - 1))  # insertion after the "\n" would corrupt the next line
    ch = draw(st.sampled_from(ALPHABET))
    if kind == "sub":
        new = line[:pos] + ch + line[pos + 1 :]
    elif kind == "del":
        new = line[:pos] + line[pos + 1 :]
    else:
        new = line[:pos] + ch + line[pos:]
    return p, i, "".join(lines[:i] + [new] + lines[i + 1 :])


@settings(max_examples=500, deadline=None)
@given(corruptions())
def test_single_character_corruption_of_a_step_is_caught(case):
    p, i, text = case
    r = check_solution(p, text)
    if text == format_solution(p):
        assert r.first_error is None
        return
    caught = r.first_error is not None and r.first_error <= i
    unchanged = r.step_ok[i] and r.values_written[i] == p.values()[i + 1]
    assert caught or unchanged
    assert r.first_error is not None  # a changed trace is never fully correct


@settings(max_examples=200, deadline=None)
@given(p=problems(), pos=st.integers(0, 10), ch=st.sampled_from(ALPHABET), kind=st.sampled_from(["sub", "del", "ins"]))
def test_corrupted_answer_line_is_wrong(p, pos, ch, kind):
    sol = format_solution(p)
    steps, answer_line = sol[: sol.rindex("A")], sol[sol.rindex("A") : -1]
    pos = min(pos, len(answer_line) - (0 if kind == "ins" else 1))
    new = {
        "sub": answer_line[:pos] + ch + answer_line[pos + 1 :],
        "del": answer_line[:pos] + answer_line[pos + 1 :],
        "ins": answer_line[:pos] + ch + answer_line[pos:],
    }[kind]
    r = check_solution(p, steps + new + "\n")
    if new == "\n" + answer_line:  # a blank line before an intact answer line: an extra (garbage) step
        assert r.answer_correct and r.first_error == p.num_steps
    elif new == answer_line + "\n":  # the "\n" lands after the answer line, which is left intact
        assert r.answer_correct and r.first_error is None
    elif new != answer_line:
        assert not r.answer_correct


def _assert_consistent(r, p):
    k = p.num_steps
    assert len(r.step_ok) == len(r.on_gold_path) == k
    assert r.on_gold_path == tuple(all(r.step_ok[: i + 1]) for i in range(k))
    if r.first_error is None:
        assert all(r.step_ok) and r.num_steps_written == k
    else:
        assert 0 <= r.first_error <= k and all(r.step_ok[: r.first_error])
    assert r.answer_correct == (r.answer is not None and r.answer == p.answer)


_P = Problem(start=23, ops=("+", "*", "-"), operands=(45, 3, 17), answer_mod=7)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet=ALPHABET, max_size=80), st.text(max_size=80)))
def test_arbitrary_text_never_raises(text):
    _assert_consistent(check_solution(_P, text), _P)
    _assert_consistent(check_solution(_P, format_solution(_P)[:20] + text), _P)


@settings(max_examples=100, deadline=None)
@given(p=problems(), data=st.data())
def test_truncated_trace_first_error_is_steps_written(p, data):
    lines = format_solution(p).splitlines(keepends=True)[: p.num_steps]
    j = data.draw(st.integers(0, p.num_steps - 1))
    r = check_solution(p, "".join(lines[:j]))
    assert r.first_error == j and r.num_steps_written == j and r.answer is None and not r.answer_correct
    assert r.step_ok == (True,) * j + (False,) * (p.num_steps - j)
    # A partial last line (generation cut mid-step) is a wrong step, not a crash.
    r = check_solution(p, "".join(lines[:j]) + lines[j][:4])
    assert r.first_error == j and r.num_steps_written == j + 1


def test_all_steps_without_answer_line():
    r = check_solution(EXAMPLE, "23+45=68\n68*03=04\n04-17=87\n")
    assert r.first_error is None and r.answer is None and not r.answer_correct


def test_extra_step_line_is_an_error_at_k():
    r = check_solution(EXAMPLE, "23+45=68\n68*03=04\n04-17=87\n87+00=87\nA 87\n")
    assert r.step_ok == (True, True, True) and r.first_error == 3 and r.answer_correct


def test_local_correctness_follows_the_written_carry():
    # Step 1 errs (68*03 != 05); step 2 correctly continues from the written 05, so it is locally ok.
    r = check_solution(EXAMPLE, "23+45=68\n68*03=05\n05-17=88\nA 88\n")
    assert r.step_ok == (True, False, True) and r.on_gold_path == (True, False, False)
    assert r.first_error == 1 and r.answer == 88 and not r.answer_correct
    # After a garbage line there is no carried value, so the next step cannot be locally ok.
    r = check_solution(EXAMPLE, "23+45=68\nxx\n04-17=87\nA 87\n")
    assert r.step_ok == (True, False, False) and r.values_written == (68, None, 87) and r.answer_correct


@settings(max_examples=100, deadline=None)
@given(problems(with_answer_mod=False), st.integers(2, 9))
def test_right_answer_through_wrong_chain_with_answer_mod(p, m):
    if m >= p.modulus or p.modulus < 10:
        return
    p = Problem(p.start, p.ops, p.operands, p.modulus, answer_mod=m)
    lines = format_solution(p).splitlines(keepends=True)
    vals = p.values()
    a, wrong = vals[-2], vals[-1] + m if vals[-1] + m < p.modulus else vals[-1] - m
    w = p.width
    lines[-2] = f"{a:0{w}d}{p.ops[-1]}{p.operands[-1]:0{w}d}={wrong:0{w}d}\n"
    r = check_solution(p, "".join(lines))
    assert r.answer_correct and r.first_error == p.num_steps - 1


def test_flawed_process_example():
    p = Problem(start=10, ops=("+",), operands=(5,), answer_mod=7)
    r = check_solution(p, "10+05=22\nA 01\n")
    assert r.answer_correct and r.first_error == 0 and not r.process_correct
