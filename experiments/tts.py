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

The policy may be an imported Hugging Face checkpoint instead (`config.model.hf_path`, the policy's `model` section:
a local folder with config.json, weights and tokenizer.json, loaded by `framework.models.hf.model_from_config`). It is
used as given (nothing is trained): its prompts are the task's question text in its own tokenizer, its completions
are decoded to text (`search.LMPolicy(tokenizer=)`) and checked by the arithmetic checker, and its FLOPs are
`lm.flops` of the imported config on its own token counts. The PRMs stay Lumen LMs on the arithmetic character
tokenizer, warm-started from the judge (which must then be its own model, not `judge.use_policy`), and read the
decoded text re-tokenized in their tokenizer. Sequential revision fine-tunes the policy on arithmetic retry data with
Lumen's trainer, which an imported checkpoint's tokenizer does not fit: it must be off (`revision.enabled=False`).

Search runs on `config.mesh` when it spans more than one device: policy and PRM replicated, every batch split over
the mesh's batch axes (`framework.search.LMPolicy`, `framework.verifiers.Verifier`).

Every accuracy comes with its diagnostics (`framework.search.diagnostics`): gold-path pass@N (some sample is right on
the gold path: the ceiling of a perfect PRM) beside answer pass@N, each selector's gap to it, whether the chosen trace
is on the gold path, standard errors over problems, and each PRM's selection accuracy (its top-scored sample is on
the gold path when the pool holds one) beside F1 / AUROC, with the oracle PRM (`verifiers.OracleVerifier`) as a row.

The stages live in the library: verifier labelling, fitting and caching in `framework.verifiers.sources`, the budget
sweeps in `framework.search.sweep`, compute-optimal selection in `framework.search.compute_optimal`, figures and
tables in `framework.search.report`.

Training FLOPs (policy, bigger model, the search PRM's fit and its training traces) sit beside the inference FLOPs,
so the PRM-vs-bigger-model comparison counts them apart and together (`report.prm_vs_bigger_lines`); compute-optimal
selection at equal FLOPs is scored on answers and on the gold path.

Artifacts in `workdir`: config.json, results/{label_sources,scaling,coverage,compute_optimal,compute_optimal_flops,
compute_optimal_flops_gold_path}.json, figures/{accuracy_vs_n,gold_path_vs_n,accuracy_vs_flops,accuracy_by_difficulty_*,
compute_optimal,serial_vs_parallel,coverage,label_sources}.png (error bars: standard errors over problems).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from configs.scaling.common import scaling_experiment
from experiments import train_lm
from framework import config as config_lib
from framework import search, sharding, verifiers
from framework.models import hf, lm
from framework.search import analysis, compute_optimal, diagnostics, report, revision, sweep, timing
from framework.tasks import arithmetic, data
from framework.training import loop
from framework.verifiers import sources

STUDY_STRATEGIES = ("majority", "best_of_n", "weighted_best_of_n", "beam", "dvts", "lookahead")
parse_source = sources.parse_source


def _lm_config(section) -> ml_collections.ConfigDict:
    if section.workdir is None:
        return section.train_lm
    path = os.path.join(section.workdir, "config.json")
    if not os.path.exists(path):
        raise config_lib.ConfigError(f"{section.workdir!r} holds no config.json (a train_lm workdir is expected)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def hf_path(config: ml_collections.ConfigDict) -> str | None:
    """The imported policy checkpoint's folder (`config.model.hf_path`, i.e. the policy's model section), or None."""
    return config.policy.train_lm.model.get("hf_path")


def _validate_hf_policy(config: ml_collections.ConfigDict) -> None:
    req, path = config_lib.require, hf_path(config)
    req(config.policy.workdir is None, "policy.workdir", f"and model.hf_path={path!r} both name the policy; set one")
    try:
        hf.hf_model_config(config.model)
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise config_lib.ConfigError(f"config key 'model.hf_path': {e}") from None
    req(
        os.path.exists(os.path.join(path, hf.TOKENIZER_FILE)),
        "model.hf_path",
        f"{path!r} holds no {hf.TOKENIZER_FILE}: the imported policy reads and writes the task's text",
    )
    req(
        not config.judge.use_policy,
        "judge.use_policy",
        "an imported policy cannot be the judge: the PRMs are warm-started from the judge, a Lumen LM on the "
        "arithmetic character tokenizer (set judge.use_policy=False)",
    )
    req(
        not config.revision.enabled,
        "revision.enabled",
        "sequential revision fine-tunes the policy on arithmetic retry data with Lumen's trainer, which an imported "
        "checkpoint's tokenizer does not fit (set revision.enabled=False with model.hf_path)",
    )
    try:
        arithmetic.make_knobs(**train_lm.knobs(config.policy.train_lm))
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"config section 'task': {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks keys, types and values of every section; compiles nothing."""
    config_lib.check_against(config, scaling_experiment())
    req = config_lib.require
    if hf_path(config) is not None:
        _validate_hf_policy(config)
        train_lm.validate(_lm_config(config.judge))
    else:
        pol = train_lm.validate(_lm_config(config.policy))
        if not config.judge.use_policy:
            judge = train_lm.validate(_lm_config(config.judge))
            req(judge.vocab_size == pol.vocab_size, "judge", "the judge must share the policy's tokenizer")
    for key in config.labels.sources:
        try:
            sources.parse_source(key)
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


def _sample_traces(policy, problems, per_problem: int, seed: int, flops: list | None = None):
    """Rows and texts of `per_problem` sampled traces per problem; appends their `lm.flops` to `flops` if given."""
    rows = [p for p in problems for _ in range(per_problem)]
    out = policy.extend(rows, [""] * len(rows), until="answer", call_key=(seed, 99))
    if flops is not None:
        flops.append(float(np.sum(lm.flops(policy.cfg, out.prompt_tokens, out.tokens))))
    return rows, out.texts


def training_flops(lm_config: ml_collections.ConfigDict, cfg: lm.LMConfig) -> float:
    """Training FLOPs of a train_lm run (its steps x batch x seq_len packed tokens, `lm.flops_per_token`)."""
    tc = lm_config.train
    return lm.flops_per_token(cfg, tc.seq_len) * tc.seq_len * tc.batch_size * tc.steps


def fit_flops(cfg: lm.LMConfig, rows, texts, steps: int, batch_size: int) -> float:
    """Training FLOPs of a verifier fit: steps x traces per batch x the traces' mean tokens (`lm.flops_per_token` at
    that length; the value head is not counted)."""
    mean = float(np.mean([len(data.encode_prompt(p)) + len(t) for p, t in zip(rows, texts)]))
    return lm.flops_per_token(cfg, max(1, round(mean))) * mean * batch_size * steps


def _grouped(flat: list, k: int) -> list[list]:
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def train_verifiers(
    config, policy_params, policy_cfg, policy, judge, knobs, workdir: str, mesh=None, timings=None, base=None
):
    """{source: (Verifier, held-out metrics)}: one PRM/ORM per label source (`verifiers.sources.fit_sources`, cached
    under workdir/verifiers/<source>) plus the oracle PRM, with ProcessBench F1 / AUROC against gold labels and the
    selection accuracy among each held-out problem's samples. The verifiers are warm-started from `base`
    ((params, LMConfig) of a Lumen LM on the arithmetic tokenizer; default the policy's). `timings` (a dict) gets
    seconds per sub-stage."""
    base_params, base_cfg = (policy_params, policy_cfg) if base is None else base
    timings = {} if timings is None else timings
    clock = timing.StageClock()
    c = config.prm
    train_p = _problems(config.seed, "train", 101, c.train_problems, c.num_steps, knobs)
    held_p = _problems(config.seed, "eval", 102, c.heldout_problems, c.num_steps, knobs)
    trace_flops = []
    rows, texts = _sample_traces(policy, train_p, c.samples_per_problem, config.seed, trace_flops)
    held_rows, held_texts = _sample_traces(policy, held_p, c.samples_per_problem, config.seed + 1)
    held_gold = [verifiers.gold_labels(p, t) for p, t in zip(held_rows, held_texts)]
    held_flags = diagnostics.gold_flags(held_p, _grouped(held_texts, c.samples_per_problem))
    clock.lap("traces")
    # A saved verifier is reused only if it was fitted from the same policy with the same settings.
    settings = [config.seed, c.to_dict(), config.sampling.to_dict()]
    if base is not None:
        settings.append(sources.fingerprint(base_params, []))
    fp = sources.fingerprint(policy_params, settings)
    like = verifiers.init(base_params, base_cfg, jax.random.key(config.seed))
    fit_kw = dict(steps=c.steps, batch_size=c.batch_size, lr=c.lr, freeze_lm=c.freeze_lm)
    fitted = sources.fit_sources(
        config.labels.sources,
        like,
        base_cfg,
        rows,
        texts,
        workdir=workdir,
        fp=fp,
        policy=policy,
        judge=judge,
        seed=config.seed,
        fit_kw=fit_kw,
        timings=timings,
    )
    bs = config.sampling.batch_size
    scorers = {
        s: (verifiers.Verifier(p, base_cfg, batch_size=bs, min_batch=bs, mesh=mesh), m) for s, (p, m) in fitted.items()
    }
    scorers["oracle"] = (verifiers.OracleVerifier(base_cfg), {})
    clock.lap("labels_and_fit")
    out = {}
    for source, (v, fit_m) in scorers.items():
        scores = v.score(held_rows, held_texts).scores
        m = verifiers.process_metrics(scores, held_gold)
        sel = diagnostics.selection_accuracy(
            _grouped(scores, c.samples_per_problem), held_flags, config.eval.aggregation
        )
        m.update(selection_accuracy_heldout=sel["selection_accuracy"], **fit_m)
        if source != "oracle":  # sampling its training traces, and the fit (label costs are not counted)
            m.update(traces_flops=trace_flops[0], fit_flops=fit_flops(base_cfg, rows, texts, c.steps, c.batch_size))
        out[source] = (v, m)
    clock.lap("heldout")
    timings.update(traces=clock.wall["traces"], heldout=clock.wall["heldout"])
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
        i = start
        while True:
            b = revision.retry_batch(
                i, seed=config.seed, batch_size=tc.batch_size, seq_len=tc.seq_len, error_rate=rc.error_rate, knobs=knobs
            )
            yield b if rows is None else {k: v[rows[0] : rows[1]] for k, v in b.items()}
            i += 1

    task = loop.Task(
        init_params=lambda rng: pol_params,  # warm start: the policy learns to rewrite after "!"
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=revision.retry_loss_fn(model_cfg),
        batches=batches,
        flops_per_example=lm.flops_per_token(model_cfg, tc.seq_len) * tc.seq_len,
    )
    state = loop.train(lm_config, os.path.join(workdir, "revision_policy"), task)
    return jax.device_get(state.params), model_cfg


def make_mesh(config):
    """The search mesh from `config.mesh`, or None when it would span a single device."""
    if jax.device_count() < 2:
        return None, sharding.DEFAULT_RULES
    return sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)


def _pool(config, policy, vers, problems) -> dict:
    """One pool of max(budgets) samples per problem: answers, gold-path flags, every verifier's scores (the search
    PRM on the whole pool, the others on its first labels.pool samples), difficulty bins and the pool sweep."""
    e = config.eval
    n_max = max(e.budgets)
    pool = search.run("majority", policy, None, problems, n=n_max, seed=config.seed)
    answers = [[search.answer_of(p, c) for c in cands] for p, cands in zip(problems, pool.candidates)]
    flags = diagnostics.gold_flags(problems, pool.candidates)
    scores = {}
    for source, (v, _) in vers.items():
        k = n_max if source == config.prm.label_source else min(config.labels.pool, n_max)
        sc = v.score([p for p in problems for _ in range(k)], [c for cands in pool.candidates for c in cands[:k]])
        scores[source] = (_grouped(sc.scores, k), sc.tokens)
    lines, tokens_scored = scores[config.prm.label_source]
    n_right = np.asarray([sum(a == p.answer for a in ans) for ans, p in zip(answers, problems)])
    prm_mean = np.asarray([np.mean([search.aggregate(x, e.aggregation) for x in ls]) for ls in lines])
    bins = {
        "oracle": analysis.difficulty_bins(n_right / n_max, e.n_bins),
        "prm": analysis.difficulty_bins(prm_mean, e.n_bins),
    }
    prm = vers[config.prm.label_source][0]
    sw = sweep.pool_sweep(
        answers,
        lines,
        flags,
        [p.answer for p in problems],
        e.budgets,
        e.seeds,
        aggregation=e.aggregation,
        strategies=e.strategies,
        flops_per_sample=float(pool.flops_per_problem(policy).mean()) / n_max,
        flops_per_score=float(np.mean(lm.flops(prm.cfg, tokens_scored, 0))),
    )
    return dict(answers=answers, flags=flags, scores=scores, n_right=n_right, bins=bins, sweep=sw)


def _label_table(config, vers, pool, problems) -> dict:
    """Per verifier: held-out metrics, selection accuracy on the test pool, and (weighted) BoN at labels.bon_n under
    each aggregation."""
    e, gold, table = config.eval, [p.answer for p in problems], {}
    for source, (_, m) in vers.items():
        ls = pool["scores"][source][0]
        k = len(ls[0])
        answers, flags = [a[:k] for a in pool["answers"]], [f[:k] for f in pool["flags"]]
        acc = {}
        for agg in search.AGGREGATIONS:
            sub = [
                diagnostics.subsample_pool(
                    answers, ls, flags, gold, config.labels.bon_n, np.random.default_rng([s, 7]), agg
                )
                for s in e.seeds
            ]
            acc[agg] = {k: float(np.mean([x[k] for x in sub])) for k in ("best_of_n", "weighted_best_of_n")}
        sel = diagnostics.selection_accuracy(ls, flags, e.aggregation)
        table[source] = dict(m, bon=acc, selection_accuracy=sel["selection_accuracy"], pool_size=k)
    return table


def _stepwise(config, policy, prm, problems, pol_params, pol_lm, workdir, sample, clock) -> sweep.Sweep:
    """Beam / DVTS / lookahead re-run per N, then (if enabled) sequential revision with the retry-trained policy."""
    e, rc, s = config.eval, config.revision, config.sampling
    configs = sweep.search_configs(e.m, e.extra_ms, e.strategies, e.lookahead)
    out = sweep.search_sweep(
        policy,
        prm,
        problems,
        e.budgets,
        configs,
        e.seeds,
        aggregation=e.aggregation,
        max_n=e.search_max_n,
        lookahead_max_n=e.lookahead_max_n,
    )
    clock.lap("search")
    if rc.enabled:
        rev_params, rev_cfg = train_revision_policy(config, pol_params, pol_lm, workdir)
        rev_policy = search.LMPolicy(rev_params, rev_cfg, temperature=s.temperature, top_p=s.top_p, **sample)
        out.update(
            sweep.revision_sweep(
                rev_policy,
                prm,
                problems,
                e.budgets,
                rc.ratios,
                e.seeds,
                max_n=e.revision_max_n,
                lines_per_sample=rc.lines_per_sample,
                threshold=rc.threshold,
                aggregation=e.aggregation,
            )
        )
        clock.lap("revision")
    return out


def _curves(d: dict, fn=np.mean) -> dict:
    return {k: {n: float(fn(v)) for n, v in x.items()} for k, x in d.items()}


def _scaling(config, sw: sweep.Sweep, pool, problems, policy, judge, vers, mesh, train_flops=None) -> dict:
    """The scaling table: accuracy, FLOPs, standard errors, gold-path ceilings and gaps, by difficulty bin, and the
    training FLOPs of the policy, the search PRM and the bigger model (`train_flops`: {"policy", "judge"})."""
    e = config.eval
    train_flops = dict(train_flops or {})
    prm_m = vers[config.prm.label_source][1]
    train_flops.update(prm_fit=prm_m.get("fit_flops"), prm_traces=prm_m.get("traces_flops"))
    greedy = search.run("greedy", policy, None, problems, n=1)
    big = search.run("greedy", judge, None, problems, n=1)
    ceiling = sw.gold_ceiling["pass_at_n"]
    return {
        "budgets": list(e.budgets),
        "accuracy": _curves(sw.correct),
        "stderr": _curves(sw.correct, lambda v: diagnostics.mean_se(v)[1]),
        "flops_per_problem": sw.flops,
        "ceilings": {
            "pass_at_n": _curves(sw.correct)["pass_at_n"],
            "gold_pass_at_n": _curves(sw.gold_ceiling)["pass_at_n"],
        },
        "on_gold_path": _curves(sw.on_gold),
        "stderr_on_gold_path": _curves(sw.on_gold, lambda v: diagnostics.mean_se(v)[1]),
        "own_gold_ceiling": _curves(sw.gold_ceiling),
        "gap_to_gold_ceiling": {
            k: {n: float(np.mean(ceiling[n] - v)) for n, v in d.items() if n in ceiling}
            for k, d in sw.correct.items()
            if k != "pass_at_n"
        },
        "greedy": {"accuracy": greedy.accuracy(problems), "flops_per_problem": greedy.flops(policy) / len(problems)},
        "bigger_model_greedy": {
            "accuracy": big.accuracy(problems),
            "params": judge.num_params,
            "flops_per_problem": big.flops(judge) / len(problems),
        },
        "params": {
            "policy": policy.num_params,
            "verifier": vers[config.prm.label_source][0].num_params,
            "judge": judge.num_params,
        },
        "flops_convention": "lm.flops per model call: prefill + decode, attention included; policy + verifier",
        "training_flops": train_flops,
        **{
            f"{name}_by_bin": {
                kind: {
                    k: {n: {int(b): float(fn(v[bb == b])) for b in np.unique(bb)} for n, v in d.items()}
                    for k, d in curves.items()
                }
                for kind, bb in pool["bins"].items()
            }
            for name, curves, fn in (
                ("accuracy", sw.correct, np.mean),
                ("stderr", sw.correct, lambda v: diagnostics.mean_se(v)[1]),
                ("on_gold_path", sw.on_gold, np.mean),
            )
        },
        "bins": {k: v.tolist() for k, v in pool["bins"].items()},
        "oracle_pass1": (pool["n_right"] / max(e.budgets)).tolist(),
        "problems": len(problems),
        "seeds": list(e.seeds),
        "num_steps": list(e.num_steps),
        "mesh": None if mesh is None else dict(mesh.shape),
    }


def _coverage(config, pool) -> dict:
    """Unbiased answer pass@k from the pool with the exponentiated power-law fit."""
    n_max = max(config.eval.budgets)
    ks = list(config.eval.budgets)
    cov = [float(np.mean([analysis.pass_at_k(n_max, int(c), k) for c in pool["n_right"]])) for k in ks]
    return {"k": ks, "coverage": cov, "fit": analysis.fit_coverage(ks, cov)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every stage (see the module docstring), writes results and figures; returns the results dict."""
    validate(config)
    load_start = os.getloadavg()
    os.makedirs(workdir, exist_ok=True)
    loop.write_config(config, workdir)
    clock = timing.StageClock()
    if hf_path(config) is not None:
        pol_cfg, pol_params, pol_tok = hf.model_from_config(config.model)
        pol_lm = config.policy.train_lm  # its task section names the problems; its model is the imported one
    else:
        (pol_params, pol_cfg, pol_lm), pol_tok = load_or_train(config.policy, workdir, "policy"), None
    clock.lap("policy")
    if config.judge.use_policy:
        judge_params, judge_cfg, judge_lm = pol_params, pol_cfg, None
    else:
        judge_params, judge_cfg, judge_lm = load_or_train(config.judge, workdir, "judge")
    clock.lap("judge")
    s, e = config.sampling, config.eval
    mesh, rules = make_mesh(config)
    sample = dict(batch_size=s.batch_size, min_batch=s.batch_size, mesh=mesh, rules=rules)
    policy = search.LMPolicy(pol_params, pol_cfg, temperature=s.temperature, top_p=s.top_p, tokenizer=pol_tok, **sample)
    judge = search.LMPolicy(judge_params, judge_cfg, temperature=0.0, **sample)
    knobs = train_lm.knobs(pol_lm)
    detail = {}
    base = None if pol_tok is None else (judge_params, judge_cfg)
    vers = train_verifiers(config, pol_params, pol_cfg, policy, judge, knobs, workdir, mesh, detail, base)
    clock.lap("verifiers")
    problems = _problems(config.seed, "test", 103, e.problems, e.num_steps, knobs)
    pool = _pool(config, policy, vers, problems)
    clock.lap("pool")
    prm = vers[config.prm.label_source][0]
    sw = pool["sweep"].update(_stepwise(config, policy, prm, problems, pol_params, pol_lm, workdir, sample, clock))
    train_flops = {
        "policy": None if pol_tok is not None else training_flops(pol_lm, pol_cfg),  # imported: not known here
        "judge": training_flops(judge_lm, judge_cfg) if judge_lm is not None else None,
    }
    scaling = _scaling(config, sw, pool, problems, policy, judge, vers, mesh, train_flops)
    select = np.random.default_rng(config.seed).random(len(problems)) < e.selection_fraction
    optimal, optimal_flops = compute_optimal.tables(sw.correct, sw.flops, pool["bins"], select, e.budgets)
    # The same selection scored on the gold path (the chosen trace right step by step: no chance hits).
    _, optimal_flops_gold = compute_optimal.tables(sw.on_gold, sw.flops, pool["bins"], select, e.budgets)
    label_table = _label_table(config, vers, pool, problems)
    clock.lap("analysis")
    results = {
        "scaling": scaling,
        "coverage": _coverage(config, pool),
        "compute_optimal": optimal,
        "compute_optimal_flops": optimal_flops,
        "compute_optimal_flops_gold_path": optimal_flops_gold,
        "label_sources": label_table,
        "selection_fraction": e.selection_fraction,
        "timings": clock.wall,
        "timings_verifiers": detail,
        "cpu_seconds": clock.cpu,
        "compile_seconds": clock.compile,
        "search_seconds": sw.seconds,
        "seconds": clock.seconds(),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
    }
    if jax.process_index() == 0:
        report.write(workdir, results)
        print(report.summary(results))
        print(report.timing_summary(results))
    return results
