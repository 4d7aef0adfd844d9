"""PRM label sources and cached verifier fits: one value head per source, saved and reused while its inputs hold.

Glossary: R training traces.

A label source is "gold" (the exact checker), "orm" (the outcome on the last line), "mc:<n>" (Monte-Carlo hard
labels from n policy rollouts per step) or "consensus:<n>" (those kept where a judge agrees). `make_labels` builds
every requested source from one set of max(n) rollouts per step. `fit_sources` fits one verifier per source
(warm-started from `like`) or loads it from `<workdir>/verifiers/<source>` when its `fit.json` records the same
fingerprint (`fingerprint`: a hash of the policy's parameters and the fit settings), so a rerun refits nothing that
is still valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from framework.tasks import arithmetic
from framework.verifiers import labels, model

log = logging.getLogger(__name__)
SOURCES = ("gold", "mc", "consensus", "orm")


def parse_source(source: str) -> tuple[str, int]:
    """("mc", 4) from "mc:4"; ("gold", 0) from "gold"; ValueError naming the source otherwise."""
    kind, _, n = source.partition(":")
    if kind not in SOURCES or (kind in ("mc", "consensus")) != bool(n) or (n and (not n.isdigit() or int(n) < 1)):
        raise ValueError(f"label source {source!r}: expected gold, orm, mc:<n> or consensus:<n> with n >= 1")
    return kind, int(n or 0)


def make_labels(sources, policy, judge, problems, texts, seed: int, timings=None) -> dict[str, list[np.ndarray]]:
    """Line labels of every trace from each source (see framework.verifiers.labels): one set of max(n) Monte-Carlo
    rollouts per step serves every "mc:<n>" and "consensus:<n>", and the judge rewrites each line once. `timings`
    (a dict) gets the seconds of the Monte-Carlo rollouts and of the judge."""
    timings = {} if timings is None else timings
    parsed = {s: parse_source(s) for s in sources}
    ns = sorted({n for kind, n in parsed.values() if kind in ("mc", "consensus")})
    t0 = time.perf_counter()
    mc = labels.monte_carlo_label_sets(policy, problems, texts, ns=ns, seed=seed) if ns else {}
    timings["labels_mc"] = time.perf_counter() - t0
    judged = None
    out = {}
    for source, (kind, n) in parsed.items():
        if kind == "gold":
            out[source] = [labels.gold_labels(p, t) for p, t in zip(problems, texts)]
        elif kind == "orm":
            out[source] = [labels.outcome_labels(p, t) for p, t in zip(problems, texts)]
        elif kind == "mc":
            out[source] = mc[n].hard
        else:
            if judged is None:
                t0 = time.perf_counter()
                judged = labels.judge_verdicts(judge, problems, texts)
                timings["labels_judge"] = time.perf_counter() - t0
            out[source] = labels.consensus_labels(mc[n].hard, judged.line_ok)
    return out


def fingerprint(policy_params: Any, settings: Any) -> str:
    """sha256 of the JSON of `settings` and every parameter's bytes: what a saved fit must have been made from."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for leaf in jax.tree.leaves(policy_params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def source_dir(workdir: str, source: str) -> str:
    """Where the verifier of `source` is saved: <workdir>/verifiers/<source with ":" as "_">."""
    return os.path.join(os.path.abspath(workdir), "verifiers", source.replace(":", "_"))


def _cached(workdir: str, source: str, fp: str) -> bool:
    path = os.path.join(source_dir(workdir, source), "fit.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("fingerprint") == fp


def fit_sources(
    sources: Sequence[str],
    like: dict,
    cfg,
    rows: Sequence[arithmetic.Problem],
    texts: Sequence[str],
    *,
    workdir: str,
    fp: str,
    policy,
    judge,
    seed: int,
    fit_kw: dict,
    timings: dict | None = None,
) -> dict[str, tuple[dict, dict]]:
    """{source: (verifier params, fit metrics)}: loaded where a saved fit carries fingerprint `fp`, else labelled
    (`make_labels`), fitted (`model.fit(like, cfg, ..., **fit_kw)`) and saved. Fit metrics: label agreement with the
    gold labels, the labelled fraction of lines, the final training loss, seconds, and `loaded` for a reused fit.
    `timings` (a dict) gets labels_mc, labels_judge and fit seconds."""
    timings = {} if timings is None else timings
    todo = [s for s in sources if not _cached(workdir, s, fp)]
    t0 = time.perf_counter()
    labelled = make_labels(todo, policy, judge, rows, texts, seed, timings) if todo else {}
    label_seconds = time.perf_counter() - t0
    out = {}
    for source in sources:
        t0 = time.perf_counter()
        where = source_dir(workdir, source)
        if source not in labelled:
            params = model.load(os.path.join(where, "params"), like)
            with open(os.path.join(where, "fit.json")) as f:
                fit_m = dict(json.load(f), loaded=True)
        else:
            lab = labelled[source]
            kept = [i for i, x in enumerate(lab) if np.any(~np.isnan(x))]
            gold = [labels.gold_labels(rows[i], texts[i]) for i in kept]
            flat = np.concatenate([lab[i] for i in kept]) if kept else np.zeros(0)
            gold_flat = np.concatenate(gold) if gold else np.zeros(0)
            has = ~np.isnan(flat)
            params, hist = model.fit(
                like,
                cfg,
                [rows[i] for i in kept],
                [texts[i] for i in kept],
                [lab[i] for i in kept],
                seed=seed,
                **fit_kw,
            )
            fit_m = dict(
                label_agreement_with_gold=float(np.mean((flat[has] >= 0.5) == (gold_flat[has] >= 0.5)))
                if has.any()
                else float("nan"),
                labelled_fraction=float(has.mean()) if has.size else 0.0,
                final_train_loss=hist.loss[-1],
                seconds=time.perf_counter() - t0 + label_seconds / len(labelled),
                fingerprint=fp,
            )
            # Every process takes part in the orbax save (it writes from the primary); fit.json marks it complete.
            if jax.process_index() == 0 and os.path.exists(os.path.join(where, "params")):
                shutil.rmtree(os.path.join(where, "params"))  # a stale or half-written fit
            model.save(os.path.join(where, "params"), params)
            if jax.process_index() == 0:
                with open(os.path.join(where, "fit.json"), "w") as f:
                    json.dump(fit_m, f)
        timings["fit"] = timings.get("fit", 0.0) + time.perf_counter() - t0
        out[source] = (params, {k: v for k, v in fit_m.items() if k != "fingerprint"})
    return out
