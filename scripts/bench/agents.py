"""Orchestration overhead of a multi-agent round: a debate round of 3 agents on 256 problems vs one bare `generate`.

COMMAND: .venv/bin/python -m scripts.bench.agents [--problems=256] [--runs=5] [--append]
RUNTIME: ~3-6 min on a 2-core CPU (compiles, then 5 interleaved timed runs of each side).
EXPECT: round / bare generate <= 1.2 for both the revise round (short answers) and the first (solve) round.

Both sides produce the same rows (3 agents x P problems) with the same model (the agents study's tiny text LM,
random weights: every row decodes its whole budget on both sides), the same per-row keys and token budget. The
round is `Runner.round` as a debate runs it: building the prompts, encoding, one batched `generate`, decoding,
parsing, FLOPs per message and appending an A2A record per message to a JSONL log on disk. The bare side is
`inference.generate` on prompt arrays and keys built outside its timed region. Both sides run interleaved `--runs` times after a
warm-up in the same process; the figures are the ratios of the median wall times and of the median process CPU
times (the steadier one on a shared machine). `--append` writes the entry into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np

from configs.agents.common import agents_experiment
from framework import inference
from framework.agents import Agent, LMBackend, MessageLog, Runner, Sampling, formats
from framework.agents.backend import Request, row_keys
from framework.models import lm
from framework.tasks import arithmetic, data
from scripts.bench import common

AGENTS = 3


def _round_requests(problems, phase):
    if phase == "solve":
        return [
            Request(a, t, "solve", formats.solve_prompt(p), arithmetic.solution_length(p.num_steps, p.modulus) + 1)
            for a in range(AGENTS)
            for t, p in enumerate(problems)
        ]
    answers = {(a, t): (p.answer + a) % p.modulus for a in range(AGENTS) for t, p in enumerate(problems)}
    return [
        Request(
            a,
            t,
            "revise",
            formats.revise_prompt(p, answers[a, t], [answers[b, t] for b in range(AGENTS) if b != a]),
            p.width + 4,
        )
        for a in range(AGENTS)
        for t, p in enumerate(problems)
    ]


def _parse(problems, phase):
    if phase == "solve":
        return lambda r, text: formats.parse_solution(problems[r.task], text)
    return lambda r, text: formats.parse_answer_line(text, problems[r.task].width)


def measure(problems: int, runs: int) -> list[dict]:
    config = agents_experiment()
    cfg = lm.LMConfig.from_config(config.model)
    params = lm.init(cfg, jax.random.key(0))
    probs = arithmetic.sample_problems(0, problems, num_steps=tuple(config.study.num_steps), modulus=10)
    agents = [Agent(params, cfg, Sampling(temperature=0.7))] * AGENTS
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("revise1", "solve"):
            reqs = _round_requests(probs, "solve" if phase == "solve" else "revise")
            parse = _parse(probs, phase)
            counter = iter(range(10**6))

            def round_():
                runner = Runner(LMBackend(agents, seed=0), log=MessageLog(f"{tmp}/log{next(counter)}.jsonl"))
                runner.round(phase, reqs, parse)
                runner.log.close()

            prompts = [data.encode_text_prompt(r.prompt, "text") for r in reqs]
            keys = row_keys(0, phase, [r.agent for r in reqs], [r.task for r in reqs])
            max_new = max(r.max_new_tokens for r in reqs)

            def bare():
                o = inference.generate(params, cfg, prompts, max_new_tokens=max_new, temperature=0.7, rng=keys)
                np.asarray(o.tokens)

            round_(), bare()  # compile and warm both
            walls, cpus = {"round": [], "bare": []}, {"round": [], "bare": []}
            for _ in range(runs):  # interleaved, so both sides see the same contention
                for name, fn in (("round", round_), ("bare", bare)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    walls[name].append(time.perf_counter() - w0)
                    cpus[name].append(time.process_time() - c0)
            med = {k: common.median(v) for k, v in walls.items()}
            cmed = {k: common.median(v) for k, v in cpus.items()}
            out.append(
                dict(
                    phase=phase,
                    rows=len(reqs),
                    max_new_tokens=max_new,
                    round_s=med["round"],
                    generate_s=med["bare"],
                    ratio=med["round"] / med["bare"],
                    round_cpu_s=cmed["round"],
                    generate_cpu_s=cmed["bare"],
                    cpu_ratio=cmed["round"] / cmed["bare"],
                )
            )
            print(json.dumps(out[-1]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--append", action="store_true", help="write the entry into BENCHMARKS.md")
    args = ap.parse_args(argv)
    monitor = common.ContentionMonitor()
    t0 = time.perf_counter()
    rows = measure(args.problems, args.runs)
    table = common.markdown_table(
        ["round", "rows", "max new tokens", "round (s)", "bare generate (s)", "wall ratio", "CPU ratio"],
        [
            [
                r["phase"],
                r["rows"],
                r["max_new_tokens"],
                f"{r['round_s']:.3f}",
                f"{r['generate_s']:.3f}",
                f"{r['ratio']:.3f}",
                f"{r['cpu_ratio']:.3f}",
            ]
            for r in rows
        ],
    )
    body = (
        f"Debate round of {AGENTS} agents on {args.problems} problems (tiny text LM, random weights) vs one "
        f"`inference.generate` of the same rows, keys and budget; median of {args.runs} runs each "
        f"({time.perf_counter() - t0:.0f} s in all).\n\n{table}"
    )
    entry = common.Entry(
        title="Agents: orchestration overhead of a debate round",
        command=common.command_line("scripts.bench.agents", argv),
        versions={"jax": jax.__version__},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=args.append)


if __name__ == "__main__":
    main()
