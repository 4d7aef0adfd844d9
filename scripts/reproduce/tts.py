"""Test-time compute on the arithmetic task, two studies.

`--study=scaling` (default): accuracy vs N (greedy, majority, BoN, weighted BoN, beam, DVTS, lookahead, revision at
serial:parallel ratios, pass@N and gold-path pass@N), standard errors and gaps to the gold-path ceiling, the same per
difficulty bin, FLOPs, compute-optimal vs best-of-N per N and at equal FLOPs, coverage with a fitted curve, the PRM
label-source table (gold vs Monte-Carlo vs consensus vs ORM vs the oracle PRM: F1, AUROC, selection accuracy, BoN
accuracy) and the aggregation ablation (last / min / product).

`--study=regimes`: the regime map (`configs/scaling/regimes.py`, `framework.search.regimes`): beam search against
weighted best-of-N at equal FLOPs across policy strength, temperature, PRM quality (oracle, noisy oracle, gold-label
and Monte-Carlo PRMs) and difficulty, in answer and in gold-path accuracy, with standard errors over problems.

  .venv/bin/python -m scripts.reproduce.tts --workdir=runs/test_time_compute            # default scale
  .venv/bin/python -m scripts.reproduce.tts --workdir=/tmp/ttc --scale=tiny              # CI scale (~1 min)
  .venv/bin/python -m scripts.reproduce.tts --workdir=runs/tts_full --scale=full         # 100 problems, search N <= 32
  .venv/bin/python -m scripts.reproduce.tts --workdir=runs/ttc \\
      --policy_workdir=runs/tts/policy --judge_workdir=runs/tts/judge                    # reuse trained policies
  .venv/bin/python -m scripts.reproduce.tts --study=regimes --workdir=runs/tts_map \\
      --regimes_config=configs/scaling/regimes.py:small                                   # the reduced regime map

The scaling study trains the policy (the tiny LM on the quickstart's task, `configs/scaling/common.py`) and the judge
(the small size, same task) into <workdir>/policy and <workdir>/judge unless given; rerunning resumes them and reuses
the fitted verifiers; docs/results/tts.md has the measured runs. It writes <workdir>/results/*.json,
<workdir>/figures/*.png and <workdir>/results/summary.txt. The regime map trains its policies into
<workdir>/policy_<name> (or loads `--regimes_config.workdirs.<name>`), fits its PRMs into <workdir>/prms_<name>,
writes one <workdir>/regimes/<policy>_T<temperature>.json per finished cell (a rerun skips them) and
<workdir>/regime_map.png, <workdir>/regime_summary.txt.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs.scaling import default, tiny
from experiments import train_lm, tts
from framework import search, verifiers
from framework.search import regimes, report
from framework.tasks import arithmetic, data
from framework.verifiers import sources

_WORKDIR = flags.DEFINE_string("workdir", "runs/test_time_compute", "Output directory.")
_STUDY = flags.DEFINE_enum("study", "scaling", ["scaling", "regimes"], "The scaling study or the regime map.")
_SCALE = flags.DEFINE_enum(
    "scale",
    "default",
    ["default", "full", "tiny"],
    "default, full (configs/scaling/default.py:full) or tiny (CI).",
)
_POLICY = flags.DEFINE_string("policy_workdir", None, "A finished train_lm workdir to use as the policy.")
_JUDGE = flags.DEFINE_string("judge_workdir", None, "A finished train_lm workdir to use as the judge.")
_PROBLEMS = flags.DEFINE_integer("problems", None, "Override eval.problems.")
_REGIMES = config_flags.DEFINE_config_file("regimes_config", "configs/scaling/regimes.py", "The regime map's config.")


def _sample(seed: int, split: str, tag: int, n: int, num_steps, knobs: dict) -> list[arithmetic.Problem]:
    knobs = dict(knobs, num_steps=tuple(num_steps))
    return arithmetic.sample_problems(np.random.default_rng([data.split_seed(seed, split), tag]), n, **knobs)


def _scorers(config, name: str, params, cfg, lm_config, workdir: str) -> dict:
    """The regime map's scorers for one policy: oracles, and PRMs fitted (or loaded) on its traces."""
    out, trained = {}, []
    for s in config.scorers:
        if s == "oracle":
            out[s] = verifiers.OracleVerifier(cfg)
        elif s.startswith("noisy:"):
            out[s] = verifiers.OracleVerifier(cfg, noise=float(s.partition(":")[2]), seed=config.seed)
        else:
            sources.parse_source(s)
            trained.append(s)
    if trained:
        c, bs = config.prm, config.eval.batch_size
        policy = search.LMPolicy(params, cfg, temperature=c.temperature, batch_size=bs, min_batch=bs)
        problems = _sample(config.seed, "train", 201, c.train_problems, c.num_steps, train_lm.knobs(lm_config))
        rows = [p for p in problems for _ in range(c.samples_per_problem)]
        texts = policy.extend(rows, [""] * len(rows), until="answer", call_key=(config.seed, 98)).texts
        fitted = sources.fit_sources(
            trained, verifiers.init(params, cfg, jax.random.key(config.seed)), cfg, rows, texts,
            workdir=os.path.join(workdir, f"prms_{name}"), fp=sources.fingerprint(params, [config.seed, c.to_dict()]),
            policy=policy, judge=policy, seed=config.seed,
            fit_kw=dict(steps=c.steps, batch_size=c.batch_size, lr=c.lr, freeze_lm=c.freeze_lm),
        )  # fmt: skip
        for s, (p, _) in fitted.items():
            out[s] = verifiers.Verifier(p, cfg, batch_size=bs, min_batch=bs)
    return {s: out[s] for s in config.scorers}


def regime_map(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every missing (policy, temperature) cell of the regime map; writes the JSON cells, table and figure."""
    os.makedirs(os.path.join(workdir, "regimes"), exist_ok=True)
    e, cells = config.eval, {}
    for name in config.policies:
        section = ml_collections.ConfigDict(
            {"workdir": config.workdirs.get(name) or None, "train_lm": config.policies[name]}
        )
        params, cfg, lm_config = tts.load_or_train(section, workdir, f"policy_{name}")
        problems = _sample(config.seed, "test", 203, e.problems, e.num_steps, train_lm.knobs(lm_config))
        mid = (e.num_steps[0] + e.num_steps[1]) // 2
        ks = np.asarray([p.num_steps for p in problems])
        groups = {f"K{e.num_steps[0]}-{mid}": ks <= mid, f"K{mid + 1}-{e.num_steps[1]}": ks > mid}
        scorers = None
        for t in config.temperatures:
            path = os.path.join(workdir, "regimes", f"{name}_T{t}.json")
            if not os.path.exists(path):
                scorers = scorers or _scorers(config, name, params, cfg, lm_config, workdir)
                policy = search.LMPolicy(params, cfg, temperature=t, batch_size=e.batch_size, min_batch=e.batch_size)
                cell = regimes.map_cell(
                    policy, scorers, problems, pool_size=e.pool, budgets=e.budgets, beam_ns=e.beam_ns, m=e.m,
                    seeds=e.seeds, groups=groups, aggregation=e.aggregation,
                )  # fmt: skip
                with open(path, "w") as f:
                    json.dump(cell, f, default=float)
                print(f"wrote {path}")
            with open(path) as f:
                cells[f"{name} T={t}"] = json.load(f)
    text = "\n\n".join(regimes.summary(cells, g) for g in next(iter(cells.values()))["groups"])
    with open(os.path.join(workdir, "regime_summary.txt"), "w") as f:
        f.write(text + "\n")
    regimes.figure(cells, os.path.join(workdir, "regime_map.png"))
    print(text)
    return cells


def main(argv):
    del argv
    if _STUDY.value == "regimes":
        regime_map(_REGIMES.value, _WORKDIR.value)
        return
    config = (
        tiny.get_config() if _SCALE.value == "tiny" else default.get_config("full" if _SCALE.value == "full" else None)
    )
    with config.unlocked():
        config.policy.workdir = _POLICY.value
        config.judge.workdir = _JUDGE.value
        if _PROBLEMS.value:
            config.eval.problems = _PROBLEMS.value
    results = tts.run(config, _WORKDIR.value)
    with open(os.path.join(_WORKDIR.value, "results", "summary.txt"), "w") as f:
        f.write(report.summary(results) + "\n")
    print(f"wrote {_WORKDIR.value}/results and {_WORKDIR.value}/figures in {results['seconds']:.0f} s")


if __name__ == "__main__":
    app.run(main)
