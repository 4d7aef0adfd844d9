"""Test-time compute scaling: train PRMs on a Lumen policy's traces, search with them at budgets N, analyse.

Stages: (1) the policy and the judge (a larger policy) are loaded from their train_lm workdirs or trained here;
(2) PRM training traces are sampled from the policy and labelled by every source in `config.labels.sources` (gold,
Monte-Carlo "mc:<n>", consensus "consensus:<n>", and "orm"; all N_MC share one set of max(n) rollouts per step);
one value head per source is fitted (warm-started from the policy; saved to workdir/verifiers/ and reused on a
rerun) and scored on held-out traces (ProcessBench F1, step AUROC against gold labels); (3) on held-out test
problems, one pool of max(budgets) samples per problem gives majority / best-of-N / weighted BoN / pass@N at every
N by subsampling (search-and-learn's protocol), and beam search and DVTS are re-run per N up to `eval.search_max_n`,
lookahead search up to `eval.lookahead_max_n` and sequential revision at each serial:parallel ratio up to
`eval.revision_max_n`; (4) difficulty bins by oracle pass@1
(the pool) and by the PRM's mean score, FLOPs per problem (`lm.flops` on each model's config: every policy call's
prefill and decode plus every verifier pass, attention included; `SearchResults.flops`), the judge's greedy
accuracy as "scale the parameters instead", compute-optimal selection per bin chosen on a selection half and
scored on the other half -- per N, and at equal FLOPs (every (strategy, N, M, serial:parallel split) that costs no
more than best-of-N at N, against best-of-N at that N) -- and coverage pass@k with a fitted exp(a k^b).

Search runs on `config.mesh` when it spans more than one device: policy and PRM replicated, every batch split over
the mesh's batch axes (`framework.search.LMPolicy`, `framework.verifiers.Verifier`).

Artifacts in `workdir`: config.json, results/{label_sources,scaling,coverage,compute_optimal}.json,
figures/{accuracy_vs_n,accuracy_vs_flops,accuracy_by_difficulty,compute_optimal,coverage,label_sources}.png.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from configs.scaling.common import scaling_experiment
from experiments import train_lm
from framework import config as config_lib
from framework import search, sharding, verifiers
from framework.models import lm
from framework.search import analysis, report, revision
from framework.tasks import arithmetic, data
from framework.training import loop

log = logging.getLogger(__name__)
SOURCES = ("gold", "mc", "consensus", "orm")
STUDY_STRATEGIES = ("majority", "best_of_n", "weighted_best_of_n", "beam", "dvts", "lookahead")


def parse_source(source: str) -> tuple[str, int]:
    """("mc", 4) from "mc:4"; ("gold", 0) from "gold"; ValueError naming the source otherwise."""
    kind, _, n = source.partition(":")
    if kind not in SOURCES or (kind in ("mc", "consensus")) != bool(n) or (n and (not n.isdigit() or int(n) < 1)):
        raise ValueError(f"label source {source!r}: expected gold, orm, mc:<n> or consensus:<n> with n >= 1")
    return kind, int(n or 0)


def _lm_config(section) -> ml_collections.ConfigDict:
    if section.workdir is None:
        return section.train_lm
    path = os.path.join(section.workdir, "config.json")
    if not os.path.exists(path):
        raise config_lib.ConfigError(f"{section.workdir!r} holds no config.json (a train_lm workdir is expected)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks keys, types and values of every section; compiles nothing."""
    config_lib.check_against(config, scaling_experiment())
    req = config_lib.require
    pol = train_lm.validate(_lm_config(config.policy))
    if not config.judge.use_policy:
        judge = train_lm.validate(_lm_config(config.judge))
        req(judge.vocab_size == pol.vocab_size, "judge", "the judge must share the policy's tokenizer")
    for key in config.labels.sources:
        try:
            parse_source(key)
        except ValueError as e:
            raise config_lib.ConfigError(f"config key 'labels.sources': {e}") from None
    req(
        config.prm.label_source in config.labels.sources,
        "prm.label_source",
        f"{config.prm.label_source!r} must be one of labels.sources {tuple(config.labels.sources)}",
    )
    e = config.eval
    budgets = list(e.budgets)
    req(
        budgets and all(isinstance(n, int) and n >= 1 for n in budgets) and budgets == sorted(set(budgets)),
        "eval.budgets",
        f"must be increasing ints >= 1, got {budgets}",
    )
    req(config.labels.bon_n <= max(budgets), "labels.bon_n", f"must be <= max(eval.budgets) = {max(budgets)}")
    for s in e.strategies:
        req(s in STUDY_STRATEGIES, "eval.strategies", f"unknown strategy {s!r}; expected some of {STUDY_STRATEGIES}")
    req(e.m >= 1, "eval.m", f"must be >= 1, got {e.m}")
    req(
        all(isinstance(m, int) and m >= 1 and m != e.m for m in e.extra_ms),
        "eval.extra_ms",
        f"must be ints >= 1 other than eval.m, got {e.extra_ms}",
    )
    for key in ("search_max_n", "lookahead_max_n", "revision_max_n"):
        req(e[key] >= 1, f"eval.{key}", f"must be >= 1, got {e[key]}")
    req(
        "lookahead" not in e.strategies or e.lookahead >= 1,
        "eval.lookahead",
        f"the lookahead strategy needs k >= 1, got {e.lookahead}",
    )
    req(config.labels.pool >= config.labels.bon_n, "labels.pool", f"must be >= labels.bon_n={config.labels.bon_n}")
    try:
        sharding.mesh_shape(config.mesh)
        sharding.rules_from_config(config.mesh)
    except ValueError as err:
        raise config_lib.ConfigError(f"config section 'mesh': {err}") from None
    req(e.aggregation in search.AGGREGATIONS, "eval.aggregation", f"must be one of {search.AGGREGATIONS}")
    req(0 < e.selection_fraction < 1, "eval.selection_fraction", f"must be in (0, 1), got {e.selection_fraction}")
    for key in ("problems", "n_bins"):
        req(e[key] >= 1, f"eval.{key}", f"must be >= 1, got {e[key]}")
    for key in ("train_problems", "samples_per_problem", "heldout_problems", "steps", "batch_size"):
        req(config.prm[key] >= 1, f"prm.{key}", f"must be >= 1, got {config.prm[key]}")
    req(config.sampling.temperature > 0, "sampling.temperature", "must be > 0 (search samples)")
    rc = config.revision
    req(all(isinstance(r, int) and r >= 1 for r in rc.ratios), "revision.ratios", f"must be ints >= 1, got {rc.ratios}")
    req(rc.steps >= 1 and rc.lines_per_sample >= 1, "revision", "steps and lines_per_sample must be >= 1")
    req(0 <= rc.error_rate < 1, "revision.error_rate", f"must be in [0, 1), got {rc.error_rate}")
    req(0 < rc.threshold < 1, "revision.threshold", f"must be in (0, 1), got {rc.threshold}")


def load_or_train(section, workdir: str, name: str):
    """(params, LMConfig, train_lm config): trained into workdir/<name> or resumed from section.workdir."""
    lm_config = _lm_config(section)
    model_cfg, task = train_lm.make_task(lm_config)
    state = loop.train(lm_config, section.workdir or os.path.join(workdir, name), task)
    return jax.device_get(state.params), model_cfg, lm_config


def _problems(seed: int, split: str, tag: int, n: int, num_steps, knobs: dict) -> list[arithmetic.Problem]:
    knobs = dict(knobs, num_steps=tuple(num_steps) if not isinstance(num_steps, int) else num_steps)
    return arithmetic.sample_problems(np.random.default_rng([data.split_seed(seed, split), tag]), n, **knobs)


def _sample_traces(policy, problems, per_problem: int, seed: int):
    rows = [p for p in problems for _ in range(per_problem)]
    out = policy.extend(rows, [""] * len(rows), until="answer", call_key=(seed, 99))
    return rows, out.texts


def make_labels(sources, policy, judge, problems, texts, seed: int, timings=None) -> dict[str, list[np.ndarray]]:
    """Line labels of every trace from each source (see framework.verifiers.labels): one set of max(n) Monte-Carlo
    rollouts per step serves every "mc:<n>" and "consensus:<n>", and the judge rewrites each line once. `timings`
    (a dict) gets the seconds of the Monte-Carlo rollouts and of the judge."""
    timings = {} if timings is None else timings
    parsed = {s: parse_source(s) for s in sources}
    ns = sorted({n for kind, n in parsed.values() if kind in ("mc", "consensus")})
    t0 = time.perf_counter()
    mc = verifiers.monte_carlo_label_sets(policy, problems, texts, ns=ns, seed=seed) if ns else {}
    timings["labels_mc"] = time.perf_counter() - t0
    judged = None
    out = {}
    for source, (kind, n) in parsed.items():
        if kind == "gold":
            out[source] = [verifiers.gold_labels(p, t) for p, t in zip(problems, texts)]
        elif kind == "orm":
            out[source] = [verifiers.outcome_labels(p, t) for p, t in zip(problems, texts)]
        elif kind == "mc":
            out[source] = mc[n].hard
        else:
            if judged is None:
                t0 = time.perf_counter()
                judged = verifiers.judge_verdicts(judge, problems, texts)
                timings["labels_judge"] = time.perf_counter() - t0
            out[source] = verifiers.consensus_labels(mc[n].hard, judged.line_ok)
    return out


def _verifier_dir(workdir: str, source: str) -> str:
    return os.path.join(os.path.abspath(workdir), "verifiers", source.replace(":", "_"))


def train_verifiers(config, policy_params, policy_cfg, policy, judge, knobs, workdir: str, mesh=None, timings=None):
    """One PRM/ORM per label source; held-out ProcessBench metrics against gold labels. Fitted params and their
    training metrics are saved under workdir/verifiers/<source>; a rerun loads them instead of refitting.
    `timings` (a dict) gets seconds per sub-stage: traces, labels_mc, labels_judge, fit, heldout."""
    timings = {} if timings is None else timings
    c = config.prm
    t_traces = time.perf_counter()
    train_p = _problems(config.seed, "train", 101, c.train_problems, c.num_steps, knobs)
    held_p = _problems(config.seed, "eval", 102, c.heldout_problems, c.num_steps, knobs)
    rows, texts = _sample_traces(policy, train_p, c.samples_per_problem, config.seed)
    held_rows, held_texts = _sample_traces(policy, held_p, c.samples_per_problem, config.seed + 1)
    held_gold = [verifiers.gold_labels(p, t) for p, t in zip(held_rows, held_texts)]
    timings["traces"] = time.perf_counter() - t_traces
    # A saved verifier is reused only if it was fitted from the same policy with the same settings.
    digest = hashlib.sha256(
        json.dumps([config.seed, config.prm.to_dict(), config.sampling.to_dict()], sort_keys=True).encode()
    )
    for leaf in jax.tree.leaves(policy_params):
        digest.update(np.asarray(leaf).tobytes())
    fingerprint = digest.hexdigest()

    def cached(source):
        path = os.path.join(_verifier_dir(workdir, source), "fit.json")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            return json.load(f).get("fingerprint") == fingerprint

    todo = [s for s in config.labels.sources if not cached(s)]
    t0 = time.perf_counter()
    labelled = make_labels(todo, policy, judge, rows, texts, config.seed, timings) if todo else {}
    label_seconds = time.perf_counter() - t0
    like = verifiers.init(policy_params, policy_cfg, jax.random.key(config.seed))
    bs = config.sampling.batch_size
    out = {}
    for source in config.labels.sources:
        t0 = time.perf_counter()
        where = _verifier_dir(workdir, source)
        if source not in labelled:
            params = verifiers.load(os.path.join(where, "params"), like)
            with open(os.path.join(where, "fit.json")) as f:
                fit_m = dict(json.load(f), loaded=True)
        else:
            lab = labelled[source]
            kept = [i for i, x in enumerate(lab) if np.any(~np.isnan(x))]
            gold = [verifiers.gold_labels(rows[i], texts[i]) for i in kept]
            flat = np.concatenate([lab[i] for i in kept]) if kept else np.zeros(0)
            gold_flat = np.concatenate(gold) if gold else np.zeros(0)
            has = ~np.isnan(flat)
            params, hist = verifiers.fit(
                like,
                policy_cfg,
                [rows[i] for i in kept],
                [texts[i] for i in kept],
                [lab[i] for i in kept],
                steps=c.steps,
                batch_size=c.batch_size,
                lr=c.lr,
                freeze_lm=c.freeze_lm,
                seed=config.seed,
            )
            fit_m = dict(
                label_agreement_with_gold=float(np.mean((flat[has] >= 0.5) == (gold_flat[has] >= 0.5)))
                if has.any()
                else float("nan"),
                labelled_fraction=float(has.mean()) if has.size else 0.0,
                final_train_loss=hist.loss[-1],
                seconds=time.perf_counter() - t0 + label_seconds / len(labelled),
                fingerprint=fingerprint,
            )
            # Every process takes part in the orbax save (it writes from the primary); fit.json marks it complete.
            if jax.process_index() == 0 and os.path.exists(os.path.join(where, "params")):
                shutil.rmtree(os.path.join(where, "params"))  # a stale or half-written fit
            verifiers.save(os.path.join(where, "params"), params)
            if jax.process_index() == 0:
                with open(os.path.join(where, "fit.json"), "w") as f:
                    json.dump(fit_m, f)
        timings["fit"] = timings.get("fit", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        v = verifiers.Verifier(params, policy_cfg, batch_size=bs, min_batch=bs, mesh=mesh)
        m = verifiers.process_metrics(v.score(held_rows, held_texts).scores, held_gold)
        timings["heldout"] = timings.get("heldout", 0.0) + time.perf_counter() - t0
        m.update({k: v for k, v in fit_m.items() if k != "fingerprint"})
        out[source] = (v, m)
        log.info("verifier %s: %s", source, m)
    return out


def train_revision_policy(config, pol_params, pol_lm, workdir: str):
    """The policy fine-tuned on retry data (framework.search.revision) with the generic loop; resumes."""
    rc = config.revision
    lm_config = ml_collections.ConfigDict(pol_lm.to_dict())
    lm_config.train.update(
        steps=rc.steps,
        lr=rc.lr,
        warmup_steps=min(20, rc.steps - 1),
        seq_len=rc.seq_len,
        checkpoint_every=rc.steps,
        progress=False,
    )
    lm_config.task.pack = False
    model_cfg = train_lm.validate(lm_config)
    tc, knobs = lm_config.train, train_lm.knobs(lm_config)

    def batches(start, rows=None):
        for i in itertools.count(start):
            b = revision.retry_batch(
                i, seed=config.seed, batch_size=tc.batch_size, seq_len=tc.seq_len, error_rate=rc.error_rate, knobs=knobs
            )
            yield b if rows is None else {k: v[rows[0] : rows[1]] for k, v in b.items()}

    task = loop.Task(
        init_params=lambda rng: pol_params,  # warm start: the policy learns to rewrite after "!"
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=train_lm._loss_fn(model_cfg),
        batches=batches,
        flops_per_example=lm.flops_per_token(model_cfg, tc.seq_len) * tc.seq_len,
    )
    state = loop.train(lm_config, os.path.join(workdir, "revision_policy"), task)
    return jax.device_get(state.params), model_cfg


# Seconds spent tracing, lowering and compiling (XLA) since import: the stage timings report each stage's share.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]
_listening = [False]


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def make_mesh(config):
    """The search mesh from `config.mesh`, or None when it would span a single device."""
    if jax.device_count() < 2:
        return None, sharding.DEFAULT_RULES
    return sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)


def _search_configs(e) -> list[tuple[str, str, int, int]]:
    """(name, search.run strategy, m, lookahead) of every re-run-per-N strategy of the study."""
    out = []
    for m in (e.m, *e.extra_ms):
        suffix = "" if m == e.m else f"_m{m}"
        for name, strategy, k in (("beam", "beam", 0), ("dvts", "dvts", 0), ("lookahead", "beam", e.lookahead)):
            if name in e.strategies:
                out.append((name + suffix, strategy, m, k))
    return out


def _compute_optimal(correct, flops, bins, select, budgets) -> tuple[dict, dict]:
    """Per N and at equal FLOPs (see the module docstring); both judged on the evaluation half (~select)."""
    per_n, at_flops = {}, {}
    ref_name = "weighted_best_of_n" if "weighted_best_of_n" in correct else "best_of_n"
    configs = {f"{k}@{n}": v for k, d in correct.items() if k != "pass_at_n" for n, v in d.items()}
    config_flops = {f"{k}@{n}": flops[k][n] for k, d in correct.items() if k != "pass_at_n" for n in d}
    ev = ~select
    for kind, bb in bins.items():
        per_n[kind], at_flops[kind] = {}, {}
        for n in budgets:
            cands = {k: d[n] for k, d in correct.items() if n in d and k != "pass_at_n"}
            chosen, right = analysis.compute_optimal(cands, bb, select)
            per_n[kind][n] = {"chosen": chosen, "accuracy": _mean(right[ev]), "bon": _mean(correct[ref_name][n][ev])}
            if ref_name not in flops or n not in flops[ref_name]:
                continue
            budget = flops[ref_name][n]
            chosen, right = analysis.compute_optimal_at_flops(configs, config_flops, budget, bb, select)
            row = {"flops": budget, "chosen": chosen, "accuracy": _mean(right[ev])}
            for ref in ("best_of_n", "weighted_best_of_n", "majority"):
                if ref in correct:
                    row[ref] = _mean(correct[ref][n][ev])
                    curve = {flops[ref][k]: _mean(correct[ref][k][ev]) for k in correct[ref]}
                    row[f"{ref}_flops_to_match"] = analysis.flops_to_match(row["accuracy"], curve)
            at_flops[kind][n] = row
    return per_n, at_flops


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every stage (see the module docstring), writes results and figures; returns the results dict."""
    validate(config)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    os.makedirs(workdir, exist_ok=True)
    loop.write_config(config, workdir)
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening[0] = True
    # Per stage: wall seconds (`timings`), process CPU seconds and compile seconds (both cumulative deltas).
    timings, cpu_timings, compile_timings = {}, {}, {}
    cpu_start, compile_start = time.process_time(), _compile_seconds[0]

    def lap(name):
        timings[name] = time.perf_counter() - t_start - sum(timings.values())
        cpu_timings[name] = time.process_time() - cpu_start - sum(cpu_timings.values())
        compile_timings[name] = _compile_seconds[0] - compile_start - sum(compile_timings.values())

    pol_params, pol_cfg, pol_lm = load_or_train(config.policy, workdir, "policy")
    lap("policy")
    if config.judge.use_policy:
        judge_params, judge_cfg = pol_params, pol_cfg
    else:
        judge_params, judge_cfg, _ = load_or_train(config.judge, workdir, "judge")
    lap("judge")
    knobs = train_lm.knobs(pol_lm)
    s = config.sampling
    mesh, rules = make_mesh(config)
    sample = dict(batch_size=s.batch_size, min_batch=s.batch_size, mesh=mesh, rules=rules)
    policy = search.LMPolicy(pol_params, pol_cfg, temperature=s.temperature, top_p=s.top_p, **sample)
    judge = search.LMPolicy(judge_params, judge_cfg, temperature=0.0, **sample)

    detail = {}
    vers = train_verifiers(config, pol_params, pol_cfg, policy, judge, knobs, workdir, mesh, detail)
    lap("verifiers")
    prm = vers[config.prm.label_source][0]
    e = config.eval
    problems = _problems(config.seed, "test", 103, e.problems, e.num_steps, knobs)
    gold = [p.answer for p in problems]
    n_max = max(e.budgets)
    pool = search.run("majority", policy, None, problems, n=n_max, seed=config.seed)
    pool_answers = [[search.answer_of(p, c) for c in cands] for p, cands in zip(problems, pool.candidates)]
    # The search PRM scores the whole pool; the other label sources' verifiers its first labels.pool samples.
    pool_scores = {}
    for source, (v, _) in vers.items():
        k = n_max if source == config.prm.label_source else min(config.labels.pool, n_max)
        flat_p = [p for p in problems for _ in range(k)]
        flat_t = [c for cands in pool.candidates for c in cands[:k]]
        sc = v.score(flat_p, flat_t)
        pool_scores[source] = ([sc.scores[i * k : (i + 1) * k] for i in range(len(problems))], sc.tokens)
    lines, pool_tok_scored = pool_scores[config.prm.label_source]
    n_right = np.asarray([sum(a == g for a in ans) for ans, g in zip(pool_answers, gold)])
    pass1 = n_right / n_max
    prm_mean = np.asarray([np.mean([search.aggregate(x, e.aggregation) for x in ls]) for ls in lines])
    bins = {"oracle": analysis.difficulty_bins(pass1, e.n_bins), "prm": analysis.difficulty_bins(prm_mean, e.n_bins)}
    lap("pool")

    # Greedy: the policy and the judge (the "bigger model" line).
    greedy = search.run("greedy", policy, None, problems, n=1)
    big = search.run("greedy", judge, None, problems, n=1)
    n_pol, n_ver, n_big = policy.num_params, prm.num_params, judge.num_params
    # Pool strategies at N cost N times the pool's mean per-sample FLOPs (policy prefill + decode, PRM pass).
    per_gen = float(pool.flops_per_problem(policy).mean()) / n_max
    per_scored = float(np.mean(lm.flops(prm.cfg, pool_tok_scored, 0)))  # the search PRM scored every pool sample

    correct: dict[str, dict[int, np.ndarray]] = {}  # name -> N -> [P] fraction right over seeds
    run_seconds: dict[str, dict[int, float]] = {}  # name -> N -> wall seconds of the re-run-per-N searches (all seeds)
    flops: dict[str, dict[int, float]] = {}
    for n in e.budgets:
        sub = [
            analysis.subsample_pool(pool_answers, lines, gold, n, np.random.default_rng([seed, n]), e.aggregation)
            for seed in e.seeds
        ]
        for name in ("majority", "best_of_n", "weighted_best_of_n", "pass_at_n"):
            if name in e.strategies or name == "pass_at_n":
                correct.setdefault(name, {})[n] = np.mean([x[name] for x in sub], axis=0)
                scored = 0.0 if name in ("majority", "pass_at_n") else per_scored
                flops.setdefault(name, {})[n] = n * (per_gen + scored)
    for n in (n for n in e.budgets if n <= max(e.search_max_n, e.lookahead_max_n)):
        for name, strategy, m, k in _search_configs(e):
            if n < m or n % m or n > (e.lookahead_max_n if k else e.search_max_n):
                continue
            t0 = time.perf_counter()
            runs = [
                search.run(strategy, policy, prm, problems, n=n, m=m, lookahead=k, seed=seed, aggregation=e.aggregation)
                for seed in e.seeds
            ]
            correct.setdefault(name, {})[n] = np.mean([r.correct(problems) for r in runs], axis=0)
            flops.setdefault(name, {})[n] = float(np.mean([r.flops(policy, prm) for r in runs])) / len(problems)
            run_seconds.setdefault(name, {})[n] = time.perf_counter() - t0
            log.info("%s N=%d: acc %.3f (%.1f s)", name, n, _mean(correct[name][n]), run_seconds[name][n])
    lap("search")

    rc = config.revision
    if rc.enabled:
        rev_params, rev_cfg = train_revision_policy(config, pol_params, pol_lm, workdir)
        rev_policy = search.LMPolicy(rev_params, rev_cfg, temperature=s.temperature, top_p=s.top_p, **sample)
        for n in (n for n in e.budgets if n <= e.revision_max_n):
            for r in rc.ratios:
                if n % r:
                    continue
                name = f"revision_r{r}"
                t0 = time.perf_counter()
                runs = [
                    revision.revise(
                        rev_policy,
                        prm,
                        problems,
                        chains=n // r,
                        revisions=(r - 1) * rc.lines_per_sample,
                        threshold=rc.threshold,
                        seed=seed,
                        aggregation=e.aggregation,
                    )
                    for seed in e.seeds
                ]
                correct.setdefault(name, {})[n] = np.mean([x.correct(problems) for x in runs], axis=0)
                flops.setdefault(name, {})[n] = float(np.mean([x.flops(rev_policy, prm) for x in runs])) / len(problems)
                run_seconds.setdefault(name, {})[n] = time.perf_counter() - t0
                log.info("%s N=%d: acc %.3f (%.1f s)", name, n, _mean(correct[name][n]), run_seconds[name][n])
        lap("revision")
    curves = {k: {n: _mean(v) for n, v in d.items()} for k, d in correct.items()}
    by_bin = {
        kind: {
            k: {n: {int(b): _mean(v[bb == b]) for b in np.unique(bb)} for n, v in d.items()} for k, d in correct.items()
        }
        for kind, bb in bins.items()
    }
    greedy_acc, big_acc = greedy.accuracy(problems), big.accuracy(problems)
    scaling = {
        "budgets": list(e.budgets),
        "accuracy": curves,
        "flops_per_problem": flops,
        "greedy": {"accuracy": greedy_acc, "flops_per_problem": greedy.flops(policy) / len(problems)},
        "bigger_model_greedy": {
            "accuracy": big_acc,
            "params": n_big,
            "flops_per_problem": big.flops(judge) / len(problems),
        },
        "params": {"policy": n_pol, "verifier": n_ver, "judge": n_big},
        "flops_convention": "lm.flops per model call: prefill + decode, attention included; policy + verifier",
        "accuracy_by_bin": by_bin,
        "bins": {k: v.tolist() for k, v in bins.items()},
        "oracle_pass1": pass1.tolist(),
        "problems": len(problems),
        "seeds": list(e.seeds),
        "num_steps": list(e.num_steps),
        "mesh": None if mesh is None else dict(mesh.shape),
    }

    # Coverage: unbiased pass@k from the pool, with the exponentiated power-law fit.
    ks = [k for k in e.budgets if k <= n_max]
    cov = [_mean([analysis.pass_at_k(n_max, int(c), k) for c in n_right]) for k in ks]
    fit = analysis.fit_coverage(ks, cov)
    coverage = {"k": ks, "coverage": cov, "fit": fit}

    # Compute-optimal: per oracle / PRM bin, the best configuration chosen on a selection split, per N and per FLOPs.
    select = np.random.default_rng(config.seed).random(len(problems)) < e.selection_fraction
    optimal, optimal_flops = _compute_optimal(correct, flops, bins, select, e.budgets)

    # The label-source table: held-out F1/AUROC and weighted-BoN accuracy at bon_n with each verifier.
    label_table = {}
    for source, (v, m) in vers.items():
        ls = pool_scores[source][0]
        pool_k = len(ls[0])
        acc = {}
        for agg in search.AGGREGATIONS:
            sub = [
                analysis.subsample_pool(
                    [a[:pool_k] for a in pool_answers],
                    ls,
                    gold,
                    config.labels.bon_n,
                    np.random.default_rng([seed, 7]),
                    agg,
                )
                for seed in e.seeds
            ]
            acc[agg] = {k: _mean(np.mean([x[k] for x in sub], axis=0)) for k in ("best_of_n", "weighted_best_of_n")}
        label_table[source] = dict(m, bon=acc)

    lap("analysis")
    results = {
        "scaling": scaling,
        "coverage": coverage,
        "compute_optimal": optimal,
        "compute_optimal_flops": optimal_flops,
        "label_sources": label_table,
        "timings": timings,
        "timings_verifiers": detail,
        "cpu_seconds": cpu_timings,
        "compile_seconds": compile_timings,
        "search_seconds": run_seconds,
        "seconds": time.perf_counter() - t_start,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
    }
    if jax.process_index() == 0:
        report.write(workdir, results)
        print(report.summary(results))
        print("seconds per stage:", {k: round(v, 1) for k, v in timings.items()})
        print("CPU seconds per stage:", {k: round(v, 1) for k, v in cpu_timings.items()})
        print("compile seconds per stage:", {k: round(v, 1) for k, v in compile_timings.items()})
        print("verifier sub-stages:", {k: round(v, 1) for k, v in detail.items()})
    return results
