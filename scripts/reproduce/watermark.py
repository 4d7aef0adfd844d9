"""Watermark study: detection power vs length, attacks, the arithmetic policy's exact match under each scheme (the
quality cost), where the low-entropy arithmetic format leaves any signal, windowed detection, and p-value calibration.

  .venv/bin/python -m scripts.reproduce.watermark --workdir=runs/watermark             (default scale, ~15-25 min)
  .venv/bin/python -m scripts.reproduce.watermark --workdir=runs/watermark --rows=256 --problems=400   (larger)

Writes <workdir>/results/{calibration,high_entropy,arithmetic}.json (one per part; `--skip` runs parts as separate
processes), their join <workdir>/results/watermark.json and <workdir>/figures/watermark.png (docs/results/watermark.md, with copies
in docs/figures/watermark.{png,json}).

Setting. High-entropy text: a random-weight 1-layer Lumen LM with a --vocab token vocabulary whose weights are
scaled by 5 (next-token entropy a few nats), --rows ragged prompts of 4-16 tokens, --new tokens at temperature 1,
no early stop. Schemes: KGW (γ = 0.25, δ = 2, LeftHash h = 1), SynthID (20 keys, n-gram 5), Gumbel (h = 4); the
control is the same model and prompts with no watermark (the rows' keys are equal, so each watermarked row and its
control share their prompt). Every p-value is the detector's own (exact for KGW, SynthID's mean and Gumbel): "TPR at
FPR a" counts watermarked rows with p <= a, and the controls give the measured FPR.
Attacks at ε in {0.1, ..., 0.5}: substitution, deletion, insertion (`attacks`), copy-paste of a fraction ε of the
control's text into the watermarked text, and re-generation of 20-token blocks with probability ε by a second
random-weight model (another seed). ROC: attacked watermarked rows against controls, by the detector's score.
Arithmetic: the quickstart policy (mod 10, trained into <workdir>/policy or resumed) at temperature 1 on --problems
held-out problems with K = 4, with KGW at δ in {0, 0.5, 1, 2, 4}, SynthID and Gumbel; exact match by the checker,
and per generated token the policy's entropy beside the per-token watermark statistic.
Windowed detection: a --span-token watermarked stretch pasted at a random offset into each control row; the best
window of the same width vs the whole-text test. Calibration: KS of p-values on --ks_rows rows of uniform random
tokens, and their median on Zipfian text (rows share n-grams, so one key's p-values correlate across rows).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from framework import watermark as wm
from framework.inference import generate
from framework.models import lm

KEYS = (654, 400, 836, 123, 340, 443, 597, 160, 57, 29, 590, 639, 13, 715, 468, 990, 966, 226, 324, 585)
EPS = (0.1, 0.2, 0.3, 0.4, 0.5)
LENGTHS = (10, 25, 50, 100, 150, 200)


def _schemes(V):
    return {
        "kgw": wm.KGW(V, gamma=0.25, delta=2.0),
        "synthid": wm.SynthID(V, keys=KEYS, ngram_len=5),
        "gumbel": wm.Gumbel(V, context_width=4),
    }


def _hook(scheme):
    if scheme is None:
        return {}
    return {"sampler": scheme} if isinstance(scheme, wm.Gumbel) else {"logits_processors": (scheme,)}


def _random_model(V, seed):
    cfg = lm.LMConfig(
        vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=512
    )
    return cfg, jax.tree.map(lambda x: 5.0 * x, lm.init(cfg, jax.random.key(seed)))


def _auc(pos, neg):
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return float(greater)


def _roc(pos, neg):
    thr = np.unique(np.concatenate([pos, neg]))[::-1]
    return [float((neg >= t).mean()) for t in thr], [float((pos >= t).mean()) for t in thr]


def high_entropy(args, out):
    V = args.vocab
    cfg, params = _random_model(V, 0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, V, int(n)).astype(np.int32) for n in rng.integers(4, 17, args.rows)]
    kw = dict(max_new_tokens=args.new, temperature=1.0, stop_tokens=(), rng=jax.random.key(1))
    clean = wm.join_generation(prompts, generate(params, cfg, prompts, **kw))
    res = {"mean_surprisal_nats": None, "length": {}, "attacks": {}, "windows": {}}
    marked = {}
    for name, scheme in _schemes(V).items():
        o = generate(params, cfg, prompts, **kw, **_hook(scheme))
        marked[name] = wm.join_generation(prompts, o)
        res["mean_surprisal_nats"] = float(-np.mean(np.asarray(o.logprobs)))
        toks, lens, start = marked[name]
        ctoks, clens, cstart = clean
        rows = {}
        for L in LENGTHS:
            d = wm.detect(scheme, toks, np.minimum(start + L, lens), start)
            c = wm.detect(scheme, ctoks, np.minimum(cstart + L, clens), cstart)
            p, pc = np.asarray(d.p_value), np.asarray(c.p_value)
            rows[L] = dict(
                score_median=float(np.median(d.score)),
                score_q10=float(np.quantile(d.score, 0.1)),
                control_score_median=float(np.median(c.score)),
                tpr_1e2=float((p <= 1e-2).mean()),
                tpr_1e4=float((p <= 1e-4).mean()),
                fpr_1e2=float((pc <= 1e-2).mean()),
                fpr_1e4=float((pc <= 1e-4).mean()),
                auc=_auc(d.score, c.score),
            )
        res["length"][name] = rows
        print(name, "by length", json.dumps(rows[LENGTHS[-1]]), flush=True)
    res["attacks"] = attacks(args, V, marked, clean, cfg)
    res["windows"] = windows(args, marked, clean)
    out["high_entropy"] = res


def attacks(args, V, marked, clean, cfg):
    ctoks, clens, cstart = clean
    attacker = _random_model(V, 11)
    res = {}
    for name, scheme in _schemes(V).items():
        toks, lens, start = marked[name]
        neg = np.asarray(wm.detect(scheme, ctoks, clens, cstart).score)
        res[name] = {}
        for attack in ("substitute", "delete", "insert", "copy_paste", "regenerate"):
            res[name][attack] = {}
            for eps in EPS:
                if attack in ("substitute", "insert"):
                    a = getattr(wm.attacks, attack)(toks, lens, start, rate=eps, vocab_size=V, seed=5)
                elif attack == "delete":
                    a = wm.attacks.delete(toks, lens, start, rate=eps, seed=5)
                elif attack == "copy_paste":
                    a = wm.attacks.copy_paste(toks, lens, start, ctoks, rate=eps, seed=5)
                else:
                    a = wm.attacks.regenerate(
                        toks, lens, start, params=attacker[1], cfg=attacker[0], rate=eps, span=20, seed=5
                    )
                d = wm.detect(scheme, a[0], a[1], start)
                pos, p = np.asarray(d.score), np.asarray(d.p_value)
                fpr, tpr = _roc(pos, neg)
                res[name][attack][eps] = dict(
                    auc=_auc(pos, neg),
                    tpr_1e2=float((p <= 1e-2).mean()),
                    tpr_1e4=float((p <= 1e-4).mean()),
                    roc_fpr=fpr,
                    roc_tpr=tpr,
                )
            print(name, attack, {e: round(v["tpr_1e2"], 3) for e, v in res[name][attack].items()}, flush=True)
    return res


def windows(args, marked, clean):
    ctoks, clens, cstart = clean
    rng = np.random.default_rng(9)
    res = {}
    for name, scheme in _schemes(args.vocab).items():
        toks = marked[name][0]
        mixed = ctoks.copy()
        at = np.array([cstart[b] + rng.integers(0, clens[b] - cstart[b] - args.span + 1) for b in range(len(ctoks))])
        for b in range(len(ctoks)):
            mixed[b, at[b] : at[b] + args.span] = toks[b, at[b] : at[b] + args.span]
        w = wm.detect_windows(scheme, mixed, clens, cstart, window=args.span)
        whole = wm.detect(scheme, mixed, clens, cstart)
        cw = wm.detect_windows(scheme, ctoks, clens, cstart, window=args.span)
        off = np.abs(np.asarray(w.start) - at)
        res[name] = dict(
            span=args.span,
            window_detect_1e2=float((np.asarray(w.p_value) <= 1e-2).mean()),
            whole_text_detect_1e2=float((np.asarray(whole.p_value) <= 1e-2).mean()),
            control_window_fpr_1e2=float((np.asarray(cw.p_value) <= 1e-2).mean()),
            median_start_error=float(np.median(off)),
            start_error_le_10=float((off <= 10).mean()),
        )
        print(name, "windows", res[name], flush=True)
    return res


def calibration(args, out):
    V = args.vocab
    rng = np.random.default_rng(0)
    res = {}
    for kind in ("uniform", "zipf"):
        if kind == "uniform":
            tokens = rng.integers(0, V, (args.ks_rows, 64)).astype(np.int32)
        else:
            tokens = np.minimum(rng.zipf(2.0, (args.ks_rows, 64)), V - 1).astype(np.int32)
        res[kind] = {}
        for name, scheme in _schemes(V).items():
            kw = {"ignore_repeated_ngrams": True} if name == "kgw" else {}
            p = np.sort(np.asarray(wm.detect(scheme, tokens, **kw).p_value, np.float64))
            n = len(p)
            res[kind][name] = dict(
                ks_d_plus=float(np.max(np.arange(1, n + 1) / n - p)),
                ks_d_minus=float(np.max(p - np.arange(n) / n)),
                median=float(np.median(p)),
                frac_le_1e2=float((p <= 1e-2).mean()),
                rows=n,
                ks_crit_1pct=1.63 / np.sqrt(n),
            )
        print("calibration", kind, res[kind], flush=True)
    # The same Zipfian rows under 16 other keys: one key's p-values are correlated across rows that share n-grams,
    # but validity is a statement over keys: the FPR averaged over keys should sit at the nominal level.
    res["zipf_over_keys"] = {}
    for name in ("kgw", "synthid", "gumbel"):
        fpr = {a: [] for a in (0.01, 0.05, 0.5)}
        for k in range(16):
            scheme = {
                "kgw": lambda: wm.KGW(V, key=1000 + k),
                "gumbel": lambda: wm.Gumbel(V, key=1000 + k),
                "synthid": lambda: wm.SynthID(V, keys=tuple(x + 7919 * (k + 1) for x in KEYS)),
            }[name]()
            kw = {"ignore_repeated_ngrams": True} if name == "kgw" else {}
            p = np.asarray(wm.detect(scheme, tokens, **kw).p_value)
            for a in fpr:
                fpr[a].append(float((p <= a).mean()))
        res["zipf_over_keys"][name] = {
            str(a): dict(mean=float(np.mean(v)), min=min(v), max=max(v)) for a, v in fpr.items()
        }
        print("calibration zipf over keys", name, res["zipf_over_keys"][name], flush=True)
    out["calibration"] = res


def arithmetic_study(args, out, workdir):
    from configs import quickstart
    from experiments import train_lm
    from framework.tasks import arithmetic, data, policy_eval
    from framework.tasks import tokenizer as tok
    from framework.training import loop

    config = quickstart.get_config()
    model_cfg, task = train_lm.make_task(config)
    params = jax.device_get(loop.train(config, os.path.join(workdir, "policy"), task).params)
    V = model_cfg.vocab_size
    problems = policy_eval.eval_problems(config.seed, 4, args.problems, modulus=10)
    prompts = [data.encode_prompt(p) for p in problems]
    max_new = arithmetic.solution_length(4, 10) + 1
    settings = {"none": None}
    for delta in (0.5, 1.0, 2.0, 4.0):
        settings[f"kgw_delta{delta:g}"] = wm.KGW(V, gamma=0.25, delta=delta)
    settings["synthid"] = wm.SynthID(V, keys=KEYS, ngram_len=5)
    settings["gumbel"] = wm.Gumbel(V, context_width=4)
    res = {}
    for name, scheme in settings.items():
        o = generate(
            params, model_cfg, prompts, max_new_tokens=max_new, temperature=1.0, rng=jax.random.key(3), **_hook(scheme)
        )
        toks, lens = np.asarray(o.tokens), np.asarray(o.lengths)
        texts = [tok.decode(toks[i, : lens[i]]) for i in range(len(problems))]
        grade = policy_eval.grade(problems, texts)
        row = dict(exact_match=grade["exact_match"], step_accuracy=grade["step_accuracy"], n=grade["n"])
        det_scheme = scheme if scheme is not None else settings["kgw_delta2"]
        joined = wm.join_generation(prompts, o)
        d = wm.detect(det_scheme, *joined)
        row.update(
            detected_1e2=float((np.asarray(d.p_value) <= 1e-2).mean()),
            median_p=float(np.median(d.p_value)),
            mean_scored=float(np.mean(d.num_scored)),
        )
        if name in ("none", "kgw_delta2", "synthid", "gumbel"):
            row["low_entropy"] = _signal_by_entropy(params, model_cfg, det_scheme, joined)
        res[name] = row
        print("arith", name, {k: v for k, v in row.items() if k != "low_entropy"}, flush=True)
    out["arithmetic"] = dict(k=4, temperature=1.0, problems=len(problems), settings=res)


BAYES_LENGTHS = (2, 4, 8, 16, 32, 64)


def bayesian_study(args, out):
    """SynthID's trained Bayesian detector vs the mean and weighted-mean scores: TPR at 1% FPR vs length."""
    V = args.vocab
    cfg, params = _random_model(V, 0)
    scheme = _schemes(V)["synthid"]
    n = args.bayes_rows
    res = dict(rows_per_set=n, new_tokens=args.bayes_new, steps=args.bayes_steps, l2=args.bayes_l2, by_temperature={})
    for temp in args.bayes_temperatures:
        sets = {}
        for i, name in enumerate(("train", "cal", "test")):
            rng = np.random.default_rng(20 + i)
            prompts = [rng.integers(3, V, int(k)).astype(np.int32) for k in rng.integers(4, 17, n)]
            kw = dict(max_new_tokens=args.bayes_new, temperature=temp, stop_tokens=(), rng=jax.random.key(20 + i))
            sets[f"{name}_clean"] = wm.join_generation(prompts, generate(params, cfg, prompts, **kw))
            if name != "cal":
                o = generate(params, cfg, prompts, logits_processors=(scheme,), **kw)
                sets[f"{name}_marked"] = wm.join_generation(prompts, o)
        t0 = time.time()
        det = wm.fit_bayesian(
            scheme, sets["train_marked"], sets["train_clean"], steps=args.bayes_steps, l2=args.bayes_l2
        )
        det = det.calibrate(sets["cal_clean"], min_rows=n // 2)
        fit_s = time.time() - t0

        def scores(kind, data, L):
            toks, lens, start = data
            lens = np.minimum(start + L, lens)
            if kind == "bayesian":
                d = wm.detect_bayesian(det, toks, lens, start)
            else:
                d = wm.detect(scheme, toks, lens, start, weighted=kind == "weighted_mean")
            return np.asarray(d.score, np.float64), np.asarray(d.p_value, np.float64)

        rows = {}
        for L in BAYES_LENGTHS:
            rows[L] = {}
            for kind in ("mean", "weighted_mean", "bayesian"):
                null, _ = scores(kind, sets["cal_clean"], L)
                pos, p_pos = scores(kind, sets["test_marked"], L)
                neg, p_neg = scores(kind, sets["test_clean"], L)
                row = dict(auc=_auc(pos, neg))
                for a in (0.01, 0.1):
                    thr = np.quantile(null, 1 - a, method="higher")  # flag scores above the null's (1-a) quantile
                    row[f"tpr_at_fpr_{a:g}"] = float((pos > thr).mean())
                    row[f"measured_fpr_{a:g}"] = float((neg > thr).mean())
                row["tpr_own_p_1e2"] = float((p_pos <= 0.01).mean())
                row["fpr_own_p_1e2"] = float((p_neg <= 0.01).mean())
                rows[L][kind] = row
            print(
                f"T={temp} L={L}",
                {k: round(v["tpr_at_fpr_0.01"], 3) for k, v in rows[L].items()},
                flush=True,
            )
        lik = det.params["params"]["likelihood"]
        res["by_temperature"][str(temp)] = dict(
            mean_surprisal_nats=float(-np.mean(np.asarray(o.logprobs))),
            fit_seconds=fit_s,
            beta=np.asarray(lik["beta"]).tolist(),
            delta_abs_mean=float(
                np.abs(np.tril(np.asarray(lik["delta"]), -1)).sum() / (scheme.depth * (scheme.depth - 1) / 2)
            ),
            prior_logit=float(det.params["params"]["prior_logit"]),
            lengths=rows,
        )
    out["bayesian"] = res


def bayesian_figure(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(res["by_temperature"])
    fig, ax = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4), squeeze=False)
    for i, temp in enumerate(temps):
        rows = res["by_temperature"][temp]["lengths"]
        Ls = sorted(rows, key=int)
        for kind, style in (("mean", "o-"), ("weighted_mean", "s--"), ("bayesian", "^-")):
            ax[0, i].plot([int(L) for L in Ls], [rows[L][kind]["tpr_at_fpr_0.01"] for L in Ls], style, label=kind)
        ax[0, i].set_xscale("log", base=2)
        ax[0, i].set_xticks([int(L) for L in Ls], Ls)
        ax[0, i].set(xlabel="generated tokens", ylabel="TPR at 1% FPR", ylim=(0, 1.02), title=f"SynthID, T={temp}")
        ax[0, i].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _signal_by_entropy(params, cfg, scheme, joined):
    """Per generated token: the policy's entropy there, and the watermark statistic's excess over its null mean."""
    toks, lens, start = joined
    logits = np.asarray(lm.forward(params, np.asarray(toks), cfg).logits, np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    ent = -(np.exp(logp) * logp).sum(-1)  # entropy of the distribution predicting position t + 1
    val, scored = (np.asarray(x) for x in wm.token_scores(scheme, toks, lens, start))
    null = {wm.KGW: lambda s: s.gamma, wm.SynthID: lambda s: s.g_rate * s.depth, wm.Gumbel: lambda s: 1.0}
    excess = val - null[type(scheme)](scheme)
    T = toks.shape[1]
    ent_at = np.concatenate([np.zeros((len(toks), 1)), ent[:, : T - 1]], axis=1)  # entropy when token t was drawn
    bins = [(0, 0.05), (0.05, 0.5), (0.5, 10)]
    out = {}
    for lo, hi in bins:
        m = scored & (ent_at >= lo) & (ent_at < hi)
        out[f"{lo}-{hi}"] = dict(
            tokens_share=float(m.sum() / max(scored.sum(), 1)), mean_excess=float(excess[m].mean()) if m.any() else None
        )
    return out


def figure(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    he = out["high_entropy"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    for name, rows in he["length"].items():
        Ls = sorted(rows, key=int)
        ax[0, 0].plot(Ls, [rows[L]["tpr_1e2"] for L in Ls], "o-", label=f"{name} p<=1e-2")
        ax[0, 0].plot(Ls, [rows[L]["tpr_1e4"] for L in Ls], "s--", label=f"{name} p<=1e-4")
    ax[0, 0].set(xlabel="scored tokens", ylabel="TPR", title="TPR at FPR 1% / 0.01% vs length")
    ax[0, 0].legend(fontsize=7)
    rows = he["length"]["kgw"]
    Ls = sorted(rows, key=int)
    ax[0, 1].plot(Ls, [rows[L]["score_median"] for L in Ls], "o-", label="KGW watermarked (median)")
    ax[0, 1].plot(Ls, [rows[L]["score_q10"] for L in Ls], "o:", label="KGW watermarked (10th pct)")
    ax[0, 1].plot(Ls, [rows[L]["control_score_median"] for L in Ls], "x-", label="control (median)")
    ax[0, 1].set(xlabel="scored tokens", ylabel="z", title="KGW z vs length")
    ax[0, 1].legend(fontsize=7)
    for i, name in enumerate(("kgw", "synthid")):
        for attack, by_eps in he["attacks"][name].items():
            eps = sorted(by_eps, key=float)
            ax[1, i].plot([float(e) for e in eps], [by_eps[e]["auc"] for e in eps], "o-", label=attack)
        ax[1, i].set(xlabel="ε", ylabel="ROC AUC", title=f"{name}: AUC under attack", ylim=(0.4, 1.02))
        ax[1, i].legend(fontsize=7)
    for attack, by_eps in he["attacks"]["gumbel"].items():
        eps = sorted(by_eps, key=float)
        ax[0, 2].plot([float(e) for e in eps], [by_eps[e]["auc"] for e in eps], "o-", label=attack)
    ax[0, 2].set(xlabel="ε", ylabel="ROC AUC", title="gumbel: AUC under attack", ylim=(0.4, 1.02))
    ax[0, 2].legend(fontsize=7)
    ar = out.get("arithmetic")
    if ar:
        names = list(ar["settings"])
        ax[1, 2].bar(range(len(names)), [ar["settings"][n]["exact_match"] for n in names])
        ax[1, 2].set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax[1, 2].set(ylabel="exact match (K=4, T=1)", title="arithmetic policy quality per scheme")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/watermark")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--new", type=int, default=200)
    p.add_argument("--span", type=int, default=50)
    p.add_argument("--ks_rows", type=int, default=4000)
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--bayes_rows", type=int, default=512, help="rows in each of the train/calibration/test sets")
    p.add_argument("--bayes_new", type=int, default=64)
    p.add_argument("--bayes_steps", type=int, default=2000)
    p.add_argument("--bayes_l2", type=float, default=1.0)
    p.add_argument("--bayes_temperatures", type=lambda x: [float(t) for t in x.split(",")], default=[1.0, 0.5])
    p.add_argument(
        "--skip", default="", help="comma-separated parts to skip: high_entropy,calibration,arithmetic,bayesian"
    )
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    results = os.path.join(args.workdir, "results")
    os.makedirs(results, exist_ok=True)
    os.makedirs(os.path.join(args.workdir, "figures"), exist_ok=True)
    # One JSON per part, so parts may run as separate processes on the same workdir; the figure and the joined
    # results/watermark.json are made from whatever parts exist.
    parts = (
        ("calibration", calibration),
        ("high_entropy", high_entropy),
        ("arithmetic", arithmetic_study),
        ("bayesian", bayesian_study),
    )
    for part, fn in parts:
        if part in skip:
            continue
        out = {"args": vars(args)}
        t0 = time.time()
        fn(args, out, args.workdir) if part == "arithmetic" else fn(args, out)
        out["seconds"] = time.time() - t0
        with open(os.path.join(results, f"{part}.json"), "w") as f:
            json.dump(out, f, indent=1, default=float)
    joined = {}
    for part, _ in parts:
        path = os.path.join(results, f"{part}.json")
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            joined[part] = d[part]
            joined.setdefault("args", {})[part] = d["args"]
            joined.setdefault("seconds", {})[part] = d["seconds"]
    with open(os.path.join(results, "watermark.json"), "w") as f:
        json.dump(joined, f, indent=1)
    if "high_entropy" in joined:
        figure(joined, os.path.join(args.workdir, "figures", "watermark.png"))
    if "bayesian" in joined:
        bayesian_figure(joined["bayesian"], os.path.join(args.workdir, "figures", "watermark_bayesian.png"))
    print("wrote", os.path.join(results, "watermark.json"))


if __name__ == "__main__":
    main()
