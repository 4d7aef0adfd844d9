"""Multi-agent topologies on scripted agents (fixed outputs): hand-computed votes, debates, orchestration, hand-offs,
the A2A-shaped log with replay and resume, planted errors, tools, and bad input."""

import json
import re

import numpy as np
import pytest

from framework.agents import LocalTools, MessageLog, ScriptedBackend, Topology, formats, majority, run
from framework.agents import log as log_lib
from framework.tasks import arithmetic
from framework.tasks.arithmetic import Problem

P0 = Problem(23, ("+", "*", "-", "*"), (45, 3, 17, 2))  # 68, 04, 87, 74
P1 = Problem(10, ("+",), (5,))  # 15
P2 = Problem(7, ("*", "+"), (3, 1))  # 21, 22


def chain_problem(line: str) -> Problem:
    """The problem of a "Q <chain>", "D <chain>" or "S <chain>" line."""
    nums = re.findall(r"[0-9]{2}", line)
    ops = re.findall(r"[-+*]", line)
    return Problem(int(nums[0]), tuple(ops), tuple(int(x) for x in nums[1:]))


def ans(v):
    return f"A {v:02d}\n"


def test_majority_ties_go_to_the_first_agent():
    assert majority([3, 5, 5]) == 5
    assert majority([16, 17, 15]) == 16
    assert majority([None, 22, 23]) == 22
    assert majority([None, None]) is None


def test_single_with_garbage_and_an_over_long_message():
    seen = []

    def script(phase, r):
        seen.append(r.task)
        return {1: arithmetic.format_solution(P1), 2: "no idea\n"}[r.task]

    backend = ScriptedBackend(script, max_context=36)
    res = run(Topology("single"), [P0, P1, P2], backend)
    # P0's prompt (18 tokens) + budget (42) exceeds 36: never sent; P2's reply has no answer line
    assert seen == [1, 2] and backend.calls == ["solve"]
    assert res.answers == [None, 15, None] and res.correct == [False, True, False]
    assert res.failures == {"message_too_long": 1, "no_answer": 1}
    assert res.per_agent[0]["messages"] == 3


def test_vote_hand_computed():
    table = {0: [74, 75, 74], 1: [16, 17, 15], 2: [None, 22, 23]}
    backend = ScriptedBackend(lambda ph, r: "xyz\n" if table[r.task][r.agent] is None else ans(table[r.task][r.agent]))
    res = run(Topology("vote", agents=3), [P0, P1, P2], backend)
    assert res.answers == [74, 16, 22] and res.correct == [True, False, True]
    assert res.failures == {"no_answer": 1} and backend.calls == ["solve"]


def _majority_reviser(phase, r):
    """Round 0: a fixed table; revise: the majority of (mine, peers), ties keep mine."""
    if phase == "solve":
        return ans({0: [75, 74, 74], 1: [15, 16, 16]}[r.task][r.agent])
    lines = r.prompt.split("\n")
    mine, peers = int(lines[1][2:]), [int(x) for x in lines[2][2:].split()]
    return ans(majority([mine] + peers) if max(peers.count(p) for p in peers) > 1 else mine)


def test_debate_hand_computed_rounds_and_changes():
    backend = ScriptedBackend(_majority_reviser)
    prompts = []
    res = run(Topology("debate", agents=3, rounds=2), [P0, P1], _Recording(backend, prompts))
    assert backend.calls == ["solve", "revise1", "revise2"]
    assert ("revise1", 0, 0, "D 23+45*03-17*02\nM 75\nP 74 74\n") in prompts
    assert res.answers == [74, 16] and res.correct == [True, False]
    assert res.changes == {"kept_right": 5, "kept_wrong": 5, "right_to_wrong": 1, "wrong_to_right": 1}


class _Recording:
    """A backend wrapper that records (phase, agent, task, prompt) of every request sent."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen
        self.max_context, self.prompt_tokens = inner.max_context, inner.prompt_tokens

    def __call__(self, phase, requests):
        self.seen += [(phase, r.agent, r.task, r.prompt) for r in requests]
        return self.inner(phase, requests)


def _orchestra(wrong_workers=(), *, split_garbage=(), reviser=False):
    """Orchestrator splits by 2 and assembles the last result; workers solve right except (worker, piece prompt)
    pairs in `wrong_workers` (answer + 1); verifier and reviser answer from the true piece value."""

    def script(phase, r):
        if r.role == "split":
            if r.task in split_garbage:
                return "???\n"
            return formats.split_text(formats.gold_pieces(chain_problem(r.prompt), 2), 2)
        if r.role == "assemble":
            return ans(int(r.prompt.split("\n")[1].split()[-1]))
        if r.role == "verify":
            head, _, text = r.prompt.partition("\n")
            return "Y\n" if formats.parse_solution(chain_problem(head), text) == chain_problem(head).answer else "N\n"
        p = chain_problem(r.prompt.split("\n")[0])
        if r.role == "revise":
            return ans(p.answer)
        return ans((p.answer + 1) % 100) if (r.agent, r.prompt) in wrong_workers else ans(p.answer)

    return script


def test_centralised_hand_computed_orchestration():
    wrong = {(1, "Q 23+45*03\n"), (1, "Q 10+05\n"), (2, "Q 10+05\n")}
    backend = ScriptedBackend(_orchestra(wrong, split_garbage={2}))
    seen = []
    res = run(Topology("centralised", agents=2), [P0, P1, P2], _Recording(backend, seen))
    assert backend.calls == ["split", "piece0", "verify0", "piece1", "verify1", "assemble"]
    # piece 1 of P0 starts from the verified worker 2's 04, not worker 1's 05
    assert ("piece1", 1, 0, "Q 04-17*02\n") in seen
    # P1: both workers say 16, the verifier accepts neither, the majority 16 is assembled; P2's split is garbage
    assert res.answers == [74, 16, None] and res.correct == [True, False, False]
    assert res.failures == {"no_answer": 1}
    assert sorted(res.per_agent) == [0, 1, 2, 3]


def test_hybrid_debate_among_workers():
    backend = ScriptedBackend(_orchestra({(1, "Q 23+45*03\n")}))
    res = run(Topology("hybrid", agents=2, rounds=1), [P0], backend)
    assert backend.calls == ["split", "piece0", "piece0/revise1", "piece1", "piece1/revise1", "assemble"]
    assert res.answers == [74] and res.changes == {"kept_right": 3, "wrong_to_right": 1}


def _right_solver(phase, r):
    return arithmetic.format_solution(chain_problem(r.prompt))


def test_pipeline_hand_offs_and_planted_error():
    seen = []
    backend = ScriptedBackend(_right_solver)
    res = run(Topology("pipeline", agents=2), [P0, P1], _Recording(backend, seen))
    assert backend.calls == ["stage0", "stage1"]
    assert [s[1:] for s in seen] == [(0, 0, "Q 23+45*03\n"), (1, 0, "Q 04-17*02\n"), (1, 1, "Q 10+05\n")]
    assert res.answers == [74, 15]
    # one wrong step planted in P0's first hand-off: 23+45=69, 69*03=07; stage 1 solves 07-17*02 right = 80
    planted = run(Topology("pipeline", agents=2), [P0, P1], ScriptedBackend(_right_solver), plant=True)
    assert planted.answers == [80, 16] and planted.correct == [False, False]


def test_planted_error_is_contained_by_the_verifier_and_outvoted_in_vote():
    cen = run(Topology("centralised", agents=2), [P0], ScriptedBackend(_orchestra()), plant=True)
    assert cen.answers == [74]
    vote = run(Topology("vote", agents=3), [P0], ScriptedBackend(_right_solver), plant=True)
    single = run(Topology("single"), [P0], ScriptedBackend(_right_solver), plant=True)
    assert vote.answers == [74] and single.answers == [formats.parse_solution(P0, formats.planted_solution(P0))]
    assert single.answers != [74]


def test_calculator_tool_pass_fixes_arithmetic_and_batches_by_depth():
    def sloppy(phase, r):  # right ops and operands, every result off by one
        p = chain_problem(r.prompt)
        vals = p.values()
        lines = [
            f"{vals[i]:02d}{o}{b:02d}={(vals[i + 1] + 1) % 100:02d}\n"
            for i, (o, b) in enumerate(zip(p.ops, p.operands))
        ]
        return "".join(lines) + ans(vals[-1] + 1)

    tools = LocalTools()
    log = MessageLog(None)
    res = run(Topology("single", tools=True), [P0, P1], ScriptedBackend(sloppy), tools=tools, log=log)
    assert res.answers == [74, 15] and tools.batches == 4 and tools.calls == 5
    calls = [log_lib.message_data(m) for m in log.messages() if "tool" in log_lib.message_data(m)]
    assert calls[0]["arguments"] == {"a": 23, "op": "+", "b": 45, "modulus": 100} and calls[0]["result"] == 68
    without = run(Topology("single"), [P0, P1], ScriptedBackend(sloppy))
    assert without.answers == [75, 16]


def test_log_records_follow_a2a_shapes_and_replay(tmp_path):
    path = tmp_path / "log.jsonl"
    first = run(
        Topology("debate", agents=3, rounds=2), [P0, P1], ScriptedBackend(_majority_reviser), log=MessageLog(path)
    )
    records = log_lib.read_records(path)
    assert {r["kind"] for r in records} == {"message", "status-update", "artifact-update"}
    for r in records:
        assert r["contextId"] == "run" and "taskId" in r
        if r["kind"] == "message":
            assert r["role"] == "agent" and [p["kind"] for p in r["parts"]] == ["text", "data"]
        if r["kind"] == "status-update":
            assert r["status"]["state"] in log_lib.TASK_STATES
    finals = [r for r in records if r["kind"] == "artifact-update"]
    assert [f["artifact"]["parts"][0]["data"]["answer"] for f in finals] == [74, 16]

    def refuse(phase, r):
        raise AssertionError("a replay must not generate")

    replay = run(Topology("debate", agents=3, rounds=2), [P0, P1], ScriptedBackend(refuse), log=MessageLog(path))
    assert replay.summary() == first.summary() and replay.generate_calls == 0
    assert json.dumps(replay.summary())  # JSON-ready


def test_resume_after_interruption_mid_round(tmp_path):
    full = tmp_path / "full.jsonl"
    clean = run(
        Topology("debate", agents=3, rounds=2), [P0, P1], ScriptedBackend(_majority_reviser), log=MessageLog(full)
    )
    lines = full.read_text().splitlines()
    commit = next(i for i, line in enumerate(lines) if '"phase": "revise1"' in line and "status-update" in line)
    # the run died while writing revise2: two of its six messages written, the third cut off mid-line
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[: commit + 3]) + "\n" + lines[commit + 3][:40])
    backend = ScriptedBackend(_majority_reviser)
    resumed = run(Topology("debate", agents=3, rounds=2), [P0, P1], backend, log=MessageLog(cut))
    assert backend.calls == ["revise2"]
    assert resumed.summary() == clean.summary()


def test_a_log_from_another_run_is_refused(tmp_path):
    path = tmp_path / "log.jsonl"
    run(Topology("vote", agents=2), [P0], ScriptedBackend(_right_solver), log=MessageLog(path))
    with pytest.raises(ValueError, match="has no message"):
        run(Topology("vote", agents=3), [P0], ScriptedBackend(_right_solver), log=MessageLog(path))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kind="debate", agents=0, rounds=2), "agents = 0"),
        (dict(kind="debate", agents=3, rounds=0), "rounds = 0"),
        (dict(kind="hybrid", agents=1, rounds=1), "agents = 1"),
        (dict(kind="vote", agents=0), "agents = 0"),
        (dict(kind="pipeline", agents=0), "agents = 0"),
        (dict(kind="vote", agents=3, rounds=2), "rounds = 2"),
        (dict(kind="star"), "kind = 'star'"),
        (dict(kind="centralised", agents=2, piece_steps=0), "piece_steps = 0"),
        (dict(kind="single", agents=2), "agents = 2"),
    ],
)
def test_bad_topology_configs_fail_before_running(kw, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kw)


def test_bad_run_arguments():
    never = ScriptedBackend(lambda ph, r: pytest.fail("must not run"))
    with pytest.raises(ValueError, match="problems is empty"):
        run(Topology("single"), [], never)
    with pytest.raises(ValueError, match="tools=None"):
        run(Topology("single", tools=True), [P0], never)
    assert never.calls == []


def test_role_training_examples_have_the_documented_targets():
    src = formats.role_source(formats.RoleMix(num_steps=(2, 5)))
    seen = set()
    for i in range(200):
        ex = src.example(7, i)
        role = formats.ROLES[ex.fields["role"]]
        seen.add(role)
        assert len(ex.prompt) + len(ex.completion) + 2 <= src.max_tokens
        if role == "solve":
            p = chain_problem(ex.prompt)
            assert arithmetic.check_solution(p, ex.completion).process_correct
        elif role == "revise":
            lines = ex.prompt.split("\n")
            p, mine = chain_problem(lines[0]), int(lines[1][2:])
            cands = [mine] + [int(x) for x in lines[2][2:].split()]
            want = p.answer if p.answer in cands else mine
            assert formats.parse_answer_line(ex.completion, 2) == want
        elif role == "split":
            p = chain_problem(ex.prompt)
            pieces = formats.parse_split(ex.completion, 2)
            assert sum((list(o) for o, _ in pieces), []) == list(p.ops) and all(len(o) <= 2 for o, _ in pieces)
        elif role == "verify":
            head, _, text = ex.prompt.partition("\n")
            ok = arithmetic.check_solution(chain_problem(head), text)
            assert (ex.completion == "Y\n") == (ok.process_correct and ok.answer_correct)
        else:
            lines = ex.prompt.split("\n")
            assert formats.parse_answer_line(ex.completion, 2) == chain_problem(lines[0]).answer
            assert int(lines[1].split()[-1]) == chain_problem(lines[0]).answer
    assert seen == set(formats.ROLES)
    assert np.all([src.example(7, i) == src.example(7, i) for i in range(3)])
