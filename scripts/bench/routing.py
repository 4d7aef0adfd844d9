"""Router decision cost vs the smallest model's generation, per query, in FLOPs and in wall time.

COMMAND: .venv/bin/python -m scripts.bench.routing [--queries 256 --rounds 3]
RUNTIME: ~1-2 min on a 2-core CPU.
EXPECT: the issue's target is a decision <= 2% of the smallest model's generation per query. The feature routers
(mf, knn, difficulty) cost a tiny fraction in FLOPs; the hidden-state router costs a prefill of the LM it reads: the
study's d8 one-layer probe LM ("hidden") stays under 2%, reading the smallest routed model itself ("hidden-xs", for
comparison) costs the prompt's share of that model's work.

Models: the three of `configs/routing/default.py` and its probe LM with untrained weights (costs do not depend on the
weights; the routers are fit on a 128-query outcome table of them). The generation side is one batched greedy `generate` of the
smallest model over the same `--queries` prompts (max_new_tokens = the longest gold solution + 1), per query = call
time / queries. The decision side is `router.predict` over the same queries in one batch (the study's path) and one
query at a time through `Queries.from_prompts` (the server's path). Rounds alternate the sides; medians are reported.
FLOPs: `Router.flops` vs `lm.flops` of each query's prompt and generated tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--single", type=int, default=32, help="queries timed one at a time (the server's path)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import jax

    from configs.routing import default
    from experiments import routing
    from framework import inference
    from framework.models import lm
    from framework.routing.table import Queries, build_table
    from framework.tasks import arithmetic, data

    config = default.get_config()
    config.unlock()
    for mc in [*config.models.values(), config.routers.probe]:
        mc.train_steps = 0
    models = routing.build_models(config, None)
    probe = routing.build_probe(config, None)
    fit_table = build_table(models, routing.problems_for(config.task, 128, 0, split="eval"), batch_size=128)
    idx = np.arange(fit_table.num_queries)
    rs = {n: routing.fit_router(n, fit_table, idx, models, probe=probe) for n in ("mf", "knn", "difficulty", "hidden")}
    rs["hidden-xs"] = routing.fit_router("hidden", fit_table, idx, models)  # reads the smallest routed model
    problems = routing.problems_for(config.task, args.queries, 1)
    q = Queries.from_prompts([arithmetic.format_prompt(p) for p in problems])
    small = models[0]
    prompts = [data.encode_prompt(p) for p in problems]
    N = max(arithmetic.solution_length(p.num_steps, p.modulus) for p in problems) + 1

    def gen():
        out = inference.generate(small.params, small.cfg, prompts, max_new_tokens=N)
        jax.block_until_ready(out.tokens)
        return out

    out = gen()  # compiles
    gen_flops = lm.flops(small.cfg, np.asarray([len(p) for p in prompts]), np.asarray(out.lengths)).mean()
    for r in rs.values():  # compiles / warms
        r.predict(q)
        r.predict(Queries.from_prompts([q.prompts[0]]))
    rows = {n: {"batch_s": [], "single_s": []} for n in rs}
    gen_s = []
    for _ in range(args.rounds):
        gen_s.append(_timed(gen) / len(prompts))
        for n, r in rs.items():
            rows[n]["batch_s"].append(_timed(lambda: r.predict(q)) / len(prompts))
            singles = q.prompts[: args.single]
            rows[n]["single_s"].append(
                _timed(lambda: [r.predict(Queries.from_prompts([p])) for p in singles]) / len(singles)
            )
    g = float(np.median(gen_s))
    print(
        f"smallest model ({small.name}): generation {g * 1e3:.3f} ms/query, {gen_flops:.4g} FLOPs/query "
        f"(batch {len(prompts)}, N={N})"
    )
    print(
        f"{'router':>10} | {'FLOPs/query':>11} | {'FLOPs ratio':>11} | {'batch ms/q':>10} | {'ratio':>7} | "
        f"{'single ms/q':>11} | {'ratio':>7}"
    )
    result = {"generation_s_per_query": g, "generation_flops_per_query": float(gen_flops), "routers": {}}
    for n, r in rs.items():
        f = float(r.flops(q).mean())
        b, s = float(np.median(rows[n]["batch_s"])), float(np.median(rows[n]["single_s"]))
        result["routers"][n] = {
            "flops_per_query": f,
            "flops_ratio": f / gen_flops,
            "batch_s_per_query": b,
            "batch_ratio": b / g,
            "single_s_per_query": s,
            "single_ratio": s / g,
        }
        print(
            f"{n:>10} | {f:11.4g} | {f / gen_flops:11.4%} | {b * 1e3:10.4f} | {b / g:7.2%} | {s * 1e3:11.4f} | "
            f"{s / g:7.1%}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
