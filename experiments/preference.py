"""Preference optimisation (the DPO family) on the one training loop: policy + frozen reference, pairs, evaluation.

Glossary: B pairs per batch, N pairs in the data set, T tokens.

Stages of `run(config, workdir)`:
1. SFT (`config.sft.steps` > 0): the arithmetic LM trained for that many steps in `workdir/sft` (resumable), a
   partly right policy; steps = 0 starts from a random init (tests).
2. Pairs: `prefopt.arithmetic_pairs` (gold trace vs one corrupted step) or, with `config.pairs.source = "policy"`,
   `policy_pairs` (gold trace vs a wrong sample of the starting policy: pairs that differ where it errs), with
   `config.pairs.flip_rate` and `length_skew`, encoded once, shuffled once by the seed; batch i is chunk i mod (N // B): a pure function of (seed, i). Kind
   "kto" unpairs them (2N rows: chosen desirable, rejected undesirable; each row's KL row is its prompt with another
   prompt's completion) and trains with `prefopt.kto_loss` (z₀ from the batch's KL rows, detached, clamped >= 0).
3. Preference training (`preference_task`, a `loop.Task`): each step scores chosen and rejected in one forward pass
   of the policy ([2B, T]) and, for kinds that use one, the frozen reference, then `prefopt.preference_loss`; every
   TRL metric is logged as train/<name>. The reference is the loop's frozen input (sharded like the LM), or, with
   `pref.precompute_ref_logps`, never held during training: its log-probs are computed once, chunk by chunk under the
   same mesh and shardings as the step, and cached as the data set columns `ref_chosen_logps`/`ref_rejected_logps`.
   Reference-free kinds (simpo, orpo, sft) never run a reference forward pass. With `pref.lora_rank` > 0 only LoRA
   adapters train; the reference is the same frozen base with the adapters at their initial value (B = 0, so
   exactly the base): no second copy of the weights.
4. Evaluation: held-out exact match by K of the SFT and the trained policy (greedy), held-out pair metrics
   (reward accuracy, margins), and the mean length of greedy completions (length bias). Written to
   `workdir/results/preference.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from configs import common
from configs.preference.common import preference_experiment
from framework import config as config_lib
from framework import inference, peft, prefopt, sharding
from framework.models import lm
from framework.tasks import arithmetic, policy_eval
from framework.tasks import data as task_data
from framework.tasks import tokenizer as tok
from framework.training import loop
from framework.training.loss import sequence_logprobs

log = logging.getLogger(__name__)

PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
KTO = "kto"  # the unpaired kind: rows (prompt, completion, desirable) and `prefopt.kto_loss`
KTO_KEYS = ("tokens", "mask", "kl_tokens", "kl_mask", "desirable")
KTO_REF_KEYS = ("ref_logps", "ref_kl_logps")


# --------------------------------------------------------------------------------------------------- config
def kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The loss kinds of `config.pref.kind` ("sigmoid", "sigmoid,sft", or "kto" for unpaired rows)."""
    if config.pref.kind.strip() == KTO:
        return (KTO,)
    return prefopt.kinds_of(tuple(k.strip() for k in config.pref.kind.split(",")))


def kto_hparams(beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> dict[str, float]:
    """KTO's hyper-parameters, checked: β > 0 and finite class weights λ_D, λ_U >= 0 (ValueError naming the field)."""
    prefopt.check_hparams("sigmoid", {"beta": beta})
    for name, v in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (np.isfinite(v) and v >= 0):
            raise ValueError(f"{name} = {v!r}; expected a finite number >= 0")
    return dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)


def loss_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The hyper-parameters the config's loss takes (`preference_loss`'s, or `kto_loss`'s), from `config.pref`."""
    p = config.pref
    if kinds(config) == (KTO,):
        return kto_hparams(p.beta, p.desirable_weight, p.undesirable_weight)
    h = dict(beta=p.beta, epsilon=p.epsilon, gamma=p.gamma, alpha=p.alpha, tau=p.tau)
    if p.weights is not None:
        h["weights"] = tuple(p.weights)
    return prefopt.check_hparams(kinds(config), h) | {"chosen_nll": None}


def task_knobs(config: ml_collections.ConfigDict) -> dict:
    """The task section's knobs as keyword arguments (`arithmetic.Knobs.from_config`)."""
    return arithmetic.Knobs.from_config(config.task).as_kwargs()


def validate(config: ml_collections.ConfigDict) -> lm.LMConfig:
    """Checks keys, types and values of a preference config; returns the model config. Compiles nothing."""
    config_lib.check_against(config, preference_experiment())
    try:
        model_cfg = lm.LMConfig.from_config(config.model)
        arithmetic.make_knobs(**task_knobs(config))
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from None
    req = config_lib.require
    try:
        loss_hparams(config)
    except ValueError as e:
        raise config_lib.ConfigError(f"config section 'pref': {e}") from None
    tc, pc = config.train, config.pairs
    req(model_cfg.vocab_size == tok.VOCAB_SIZE, "model.vocab_size", f"must be {tok.VOCAB_SIZE} (arithmetic)")
    req(tc.seq_len <= model_cfg.max_seq_len, "train.seq_len", f"{tc.seq_len} exceeds model.max_seq_len")
    for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
        req(tc[key] > 0, f"train.{key}", f"must be positive, got {tc[key]}")
    req(tc.lr > 0, "train.lr", f"must be positive, got {tc.lr}")
    req(pc.n >= tc.batch_size, "pairs.n", f"{pc.n} pairs are fewer than one batch (train.batch_size={tc.batch_size})")
    req(pc.eval_n >= 1, "pairs.eval_n", f"must be >= 1, got {pc.eval_n}")
    req(0.0 <= pc.flip_rate <= 1.0, "pairs.flip_rate", f"must be in [0, 1], got {pc.flip_rate}")
    req(pc.source in ("corrupt", "policy"), "pairs.source", f"must be 'corrupt' or 'policy', got {pc.source!r}")
    req(pc.samples >= 1, "pairs.samples", f"must be >= 1, got {pc.samples}")
    req(pc.temperature > 0, "pairs.temperature", f"must be > 0 (sampled completions), got {pc.temperature}")
    req(
        config.pref.lora_rank >= 0,
        "pref.lora_rank",
        f"must be >= 0 (0 = full fine-tuning), got {config.pref.lora_rank}",
    )
    req(config.sft.steps >= 0, "sft.steps", f"must be >= 0 (0 = start from a random init), got {config.sft.steps}")
    split = sharding.mesh_shape(config.mesh)
    req(tc.batch_size % (split[0] * split[1]) == 0, "train.batch_size", "must divide by mesh.data*mesh.fsdp")
    return model_cfg


# ------------------------------------------------------------------------------------------ scoring functions
def policy_stats(params, cfg, tokens_BT, mask_BT):
    """(Σ log-prob, completion tokens, Σ vocab-mean logit) per sequence [B], over mask[t] for t >= 1."""
    logits_BTV = lm.forward(params, tokens_BT, cfg).logits[:, :-1].astype(jnp.float32)
    logp_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:])
    w_BT = mask_BT[:, 1:].astype(jnp.float32)
    logits_sum_B = jnp.sum(jnp.mean(logits_BTV, -1) * w_BT, -1)
    return jnp.sum(logp_BT * w_BT, -1), jnp.sum(w_BT, -1), logits_sum_B


def reference_logps(params, cfg, tokens_BT, mask_BT):
    """Σ log-prob per sequence [B] under the reference (`training.loss.sequence_logprobs`)."""
    return sequence_logprobs(params, cfg, tokens_BT, mask_BT)[0]


def _both(batch):
    """[2B, T] tokens and masks the reference scores: chosen then rejected (pairs), or rows then KL rows (KTO)."""
    a, b = ("chosen_", "rejected_") if "chosen_tokens" in batch else ("", "kl_")
    tokens = jnp.concatenate([batch[f"{a}tokens"], batch[f"{b}tokens"]])
    mask = jnp.concatenate([batch[f"{a}mask"], batch[f"{b}mask"]])
    return tokens, mask


# ------------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class PairData:
    """Encoded pairs (or KTO rows) shuffled once by the seed and cut to whole batches; batch i = chunk i mod chunks."""

    arrays: dict[str, np.ndarray]
    batch_size: int

    @classmethod
    def make(cls, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int) -> PairData:
        n = len(next(iter(arrays.values())))
        if n < batch_size:
            raise ValueError(f"{n} pairs are fewer than one batch of {batch_size}")
        order = np.random.default_rng([seed, 0x5EED]).permutation(n)[: n - n % batch_size]
        return cls({k: np.asarray(v)[order] for k, v in arrays.items()}, batch_size)

    @property
    def chunks(self) -> int:
        return len(next(iter(self.arrays.values()))) // self.batch_size

    def chunk(self, i: int, keys) -> dict[str, np.ndarray]:
        j = (i % self.chunks) * self.batch_size
        return {k: self.arrays[k][j : j + self.batch_size] for k in keys}

    def batches(self, start: int, keys, rows=None):
        i = start
        while True:
            b = self.chunk(i, keys)
            yield b if rows is None else {k: v[rows[0] : rows[1]] for k, v in b.items()}
            i += 1


def _is_lora(x) -> bool:
    return isinstance(x, peft.LoraWeight)


def precompute_reference(data: PairData, ref_params, cfg, mesh, rules, ref_logps_fn=reference_logps) -> None:
    """Adds `ref_chosen_logps`/`ref_rejected_logps` columns to `data` (KTO rows: `ref_logps`/`ref_kl_logps`): the
    reference scored once per chunk, under the same mesh, shardings and batch composition as the train step (so
    training is bitwise that of on-the-fly)."""
    shapes = jax.eval_shape(lambda: ref_params)
    if any(isinstance(x, peft.LoraWeight) for x in jax.tree.leaves(ref_params, is_leaf=_is_lora)):
        # Adapted params are the loop's frozen input, replicated (peft.adapter_task does the same).
        shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, P()), shapes)
    else:
        shardings = sharding.tree_shardings(lm.logical_axes(cfg), shapes, mesh, rules)
    ref = jax.device_put(ref_params, shardings)

    @jax.jit
    def score(ref, batch):
        logps = ref_logps_fn(jax.lax.stop_gradient(ref), cfg, *_both(batch))
        return jnp.split(logps, 2)

    kto = "chosen_tokens" not in data.arrays
    keys, columns = (KTO_KEYS[:4], KTO_REF_KEYS) if kto else (PAIR_KEYS, REF_KEYS)
    out_w, out_l = [], []
    with sharding.rules_context(mesh, rules):
        for i in range(data.chunks):
            batch = sharding.global_batch(data.chunk(i, keys), mesh, data.batch_size, rules)
            w, l_ = jax.device_get(score(ref, batch))
            out_w.append(w), out_l.append(l_)
    data.arrays[columns[0]] = np.concatenate(out_w).astype(np.float32)
    data.arrays[columns[1]] = np.concatenate(out_l).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ task
def preference_task(
    model_cfg: lm.LMConfig,
    policy_params,
    data: PairData,
    *,
    kind,
    hparams: Mapping[str, Any],
    precompute_ref_logps: bool = False,
    lora: peft.LoraConfig | None = None,
    rng: jax.Array | None = None,
    mesh=None,
    rules=None,
    ref_logps_fn: Callable = reference_logps,
    data_stats: Mapping[str, int] | None = None,
) -> loop.Task:
    """The `loop.Task` that trains `policy_params` (or LoRA adapters on them) on `data` with a preference loss.

    `kind` is a paired kind (or list) of `prefopt.KINDS` on pair data (`encode_pairs`' arrays), or "kto" on unpaired
    rows (`encode_kto`'s arrays; `hparams` = beta, desirable_weight, undesirable_weight): each KTO step scores its rows
    and, without gradient, its mismatched KL rows under the policy and the reference, for `prefopt.kto_loss`. The
    reference is `policy_params` as given (frozen). `ref_logps_fn(params, cfg, tokens_BT, mask_BT) -> [B]`
    scores the reference (replace it to count or forbid reference passes). `precompute_ref_logps` needs `mesh` and
    `rules` (those of `loop.train`'s config) and adds the cached columns to `data`. `data_stats` (e.g. the dropped
    row counts of `encode_pairs`) are logged as constant `data/<name>` metrics.
    """
    kto = kind == KTO or tuple(kind) == (KTO,)
    if kto:
        kinds_, h, uses_ref = (KTO,), kto_hparams(**hparams), True
        if "tokens" not in data.arrays:
            raise ValueError(f"kind = {KTO!r} trains on unpaired rows; expected `encode_kto` arrays in data")
    else:
        kinds_ = prefopt.kinds_of(kind)
        h = {k: v for k, v in prefopt.check_hparams(kinds_, hparams).items() if v is not None}
        uses_ref = prefopt.needs_reference(kinds_)
        if "chosen_tokens" not in data.arrays:
            raise ValueError(f"kind = {kind!r} trains on pairs; expected `encode_pairs` arrays in data")
    cached = uses_ref and precompute_ref_logps
    if lora is not None:
        adapted = peft.add_adapters(
            policy_params, lora, rng if rng is not None else jax.random.key(0), model_cfg=model_cfg
        )
    if cached:
        if mesh is None or rules is None:
            raise ValueError("precompute_ref_logps needs the training mesh and rules (mesh=, rules=)")
        ref = adapted if lora is not None else policy_params
        precompute_reference(data, ref, model_cfg, mesh, rules, ref_logps_fn)
    keys = (KTO_KEYS + (KTO_REF_KEYS if cached else ())) if kto else (PAIR_KEYS + (REF_KEYS if cached else ()))
    consts = {f"data/{k}": float(v) for k, v in (data_stats or {}).items() if k.startswith("dropped")}

    def kto_loss_fn(params, batch, frozen=None):
        policy = peft.set_adapters(frozen["adapted"], params) if lora is not None else params
        logps, lengths, logits_sum = policy_stats(policy, model_cfg, batch["tokens"], batch["mask"])
        # z0's policy side carries no gradient (kto_loss detaches it): a separate forward with no backward pass
        kl_logps = policy_stats(jax.lax.stop_gradient(policy), model_cfg, batch["kl_tokens"], batch["kl_mask"])[0]
        if cached:
            ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        else:
            ref_params = frozen["adapted"] if lora is not None else frozen["ref"]
            ref, ref_kl = jnp.split(ref_logps_fn(ref_params, model_cfg, *_both(batch)), 2)
        loss_B, metrics = prefopt.kto_loss(logps, ref, batch["desirable"], kl_logps, ref_kl, **h)
        return jnp.mean(loss_B), metrics | kto_logits(batch["desirable"], lengths, logits_sum) | {
            k: jnp.float32(v) for k, v in consts.items()
        }

    def loss_fn(params, batch, frozen=None):
        policy = peft.set_adapters(frozen["adapted"], params) if lora is not None else params
        tokens, mask = _both(batch)
        logps, lengths, logits_sum = policy_stats(policy, model_cfg, tokens, mask)
        refs = (None, None)
        if cached:
            refs = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
        elif uses_ref:
            ref = frozen["adapted"] if lora is not None else frozen["ref"]
            refs = tuple(jnp.split(ref_logps_fn(ref, model_cfg, tokens, mask), 2))
        (lw, ll), (nw, nl), (sw, sl) = (jnp.split(x, 2) for x in (logps, lengths, logits_sum))
        loss_B, metrics = prefopt.preference_loss(
            kinds_,
            lw,
            ll,
            *refs,
            chosen_len_B=nw,
            rejected_len_B=nl,
            chosen_logits_sum_B=sw,
            rejected_logits_sum_B=sl,
            **h,
        )
        # summed log-probs for every kind (reference-free kinds log length-averaged `logps/*`, as TRL does)
        sums = {"sum_logps/chosen": jnp.mean(lw), "sum_logps/rejected": jnp.mean(ll)}
        return jnp.mean(loss_B), metrics | sums | {k: jnp.float32(v) for k, v in consts.items()}

    T = data.arrays["tokens" if kto else "chosen_tokens"].shape[1]
    if kto:  # per row: the policy's fwd+bwd, its KL rows' fwd, and the reference's fwd of both
        passes = 4.0 + (2.0 if not cached else 0.0)
        flops = lm.flops_per_token(model_cfg, T, training=False) * T * passes
        loss_fn = kto_loss_fn
    else:  # per pair: fwd+bwd of the policy on both sides, + the reference's fwd
        passes = 3.0 + (1.0 if uses_ref and not cached else 0.0)
        flops = lm.flops_per_token(model_cfg, T, training=False) * 2 * T * passes
    batches = lambda start, rows=None: data.batches(start, keys, rows)  # noqa: E731
    if lora is not None:
        adapters = peft.adapter_params(adapted)
        return loop.Task(
            init_params=lambda _: adapters,
            logical_axes=jax.tree.map(lambda _: P(), adapters),
            loss_fn=loss_fn,
            batches=batches,
            flops_per_example=flops,
            frozen={"adapted": adapted},
        )
    frozen = {"ref": policy_params} if uses_ref and not cached else None
    return loop.Task(
        init_params=lambda _: policy_params,
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=loss_fn,
        batches=batches,
        flops_per_example=flops,
        frozen=frozen,
        frozen_logical_axes=None if frozen is None else {"ref": lm.logical_axes(model_cfg)},
    )


def kto_logits(desirable_B, len_B, logits_sum_B) -> dict[str, jax.Array]:
    """TRL's KTO `logits/chosen`, `logits/rejected`: the vocab-mean logit averaged over the completion tokens of the
    desirable (undesirable) rows; 0 for a group absent from the batch."""
    d_B = desirable_B.astype(jnp.float32)
    out = {}
    for name, w_B in (("chosen", d_B), ("rejected", 1.0 - d_B)):
        tokens = jnp.sum(w_B * len_B)
        out[f"logits/{name}"] = jnp.where(tokens > 0, jnp.sum(w_B * logits_sum_B) / jnp.maximum(tokens, 1.0), 0.0)
    return out


def trained_policy(task: loop.Task, params):
    """Plain LM params of a trained task's state params (adapters merged into the base for a LoRA task)."""
    if isinstance(task.frozen, dict) and "adapted" in task.frozen:
        return peft.merge(peft.set_adapters(task.frozen["adapted"], params))
    return params


# --------------------------------------------------------------------------------------------------- stages
def sft_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The train_lm config of the SFT stage (same model, task knobs, mesh and seed)."""
    c = common.lm_experiment(seed=config.seed)
    c.model, c.task, c.train, c.mesh = config.model, config.task, config.sft, config.mesh
    c.eval.update(problems_per_k=config.eval.problems_per_k, batch_size=config.eval.batch_size)
    return c


def sft_policy(config: ml_collections.ConfigDict, workdir: str):
    """The starting policy: `config.sft.steps` of SFT in `workdir/sft` (resumed if done), or a random init."""
    from experiments import train_lm

    model_cfg = lm.LMConfig.from_config(config.model)
    if config.sft.steps == 0:
        return lm.init(model_cfg, jax.random.key(config.seed))
    c = sft_config(config)
    _, task = train_lm.make_task(c)
    return jax.device_get(loop.train(c, os.path.join(workdir, "sft"), task).params)


def policy_pairs(config: ml_collections.ConfigDict, params, split: str, n: int):
    """(clean pairs, stats) of `config.pairs.source = "policy"`: `n` problems of `split`, each paired as gold trace vs
    the first wrong of `config.pairs.samples` completions of `params` (problems the policy always solves give none)."""
    rng = np.random.default_rng([task_data.split_seed(config.seed, split), 0x5A3F])
    problems = arithmetic.sample_problems(rng, n, **task_knobs(config))
    key = jax.random.fold_in(jax.random.key(config.seed), task_data.SPLITS.index(split))
    pc = config.pairs
    return prefopt.sampled_pairs(
        params,
        lm.LMConfig.from_config(config.model),
        problems,
        samples=pc.samples,
        temperature=pc.temperature,
        rng=key,
        batch_size=config.eval.batch_size,
        chosen="gold",
    )


def make_pairs(
    config: ml_collections.ConfigDict, split: str, n: int, *, unpaired: bool = False, policy=None, sampled=None
):
    """(encoded arrays, stats) of the config's pairs on `split` (held-out pairs are clean); `unpaired`: the same pairs
    as 2n KTO rows (chosen desirable, rejected undesirable; `prefopt.kto_rows`, `encode_kto`). Source "policy" pairs
    are sampled from `policy` (or given as `sampled`, `policy_pairs`' output) before flips and length skew."""
    noisy = split == "train"
    flip, skew = (config.pairs.flip_rate if noisy else 0.0), config.pairs.length_skew
    if config.pairs.source == "policy":
        clean, clean_stats = sampled if sampled is not None else policy_pairs(config, policy, split, n)
        pairs, stats = prefopt.perturb_pairs(clean, config.seed, flip_rate=flip, length_skew=skew)
        stats = clean_stats | stats
    else:
        pairs, stats = prefopt.arithmetic_pairs(
            config.seed, n, split=split, flip_rate=flip, length_skew=skew, **task_knobs(config)
        )
    if unpaired:
        arrays, counts = prefopt.encode_kto(prefopt.kto_rows(pairs), "arith", config.train.seq_len)
    else:
        arrays, counts = prefopt.encode_pairs(pairs, "arith", config.train.seq_len)
    return arrays, stats | counts


def greedy_eval(params, model_cfg, config) -> dict[str, Any]:
    """Exact match by K (greedy, held-out; one `generate` call for every K) and the mean number of characters a
    completion has beyond the gold solution (length bias)."""
    k_lo, k_hi = arithmetic.make_knobs(**task_knobs(config)).steps_range
    problems = {
        k: policy_eval.eval_problems(config.seed, k, config.eval.problems_per_k, **task_knobs(config))
        for k in range(k_lo, k_hi + 1)
    }
    flat = [p for k in problems for p in problems[k]]
    prompts = [policy_eval.data.encode_prompt(p) for p in flat]
    max_new = arithmetic.solution_length(k_hi, flat[0].modulus) + 1 + abs(config.pairs.length_skew) + 8
    out = inference.generate(params, model_cfg, prompts, max_new_tokens=max_new)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [tok.decode(tokens[i, : lengths[i]]) for i in range(len(flat))]
    by_k, i = {}, 0
    for k, ps in problems.items():
        by_k[k] = policy_eval.grade(ps, texts[i : i + len(ps)])
        i += len(ps)
    gold = [arithmetic.solution_length(p.num_steps, p.modulus) for p in flat]
    extra = [len(t) - g for t, g in zip(texts, gold)]
    return {"accuracy_by_k": by_k, "extra_chars": float(np.mean(extra))}


def pair_eval(params, ref_params, model_cfg, arrays, kind, h) -> dict[str, float]:
    """Held-out pair metrics (TRL's names) of the policy against the reference."""
    batch = {k: jnp.asarray(arrays[k]) for k in PAIR_KEYS}
    f = jax.jit(lambda p, b: policy_stats(p, model_cfg, *_both(b)))
    logps, lengths, _ = f(params, batch)
    (lw, ll), (nw, nl) = (jnp.split(x, 2) for x in (logps, lengths))
    refs = (None, None)
    if prefopt.needs_reference(kind):  # reference-free kinds are scored without a reference pass here too
        ref = jax.jit(lambda p, b: reference_logps(p, model_cfg, *_both(b)))(ref_params, batch)
        refs = tuple(jnp.split(ref, 2))
    _, m = prefopt.preference_loss(kind, lw, ll, *refs, chosen_len_B=nw, rejected_len_B=nl, **h)
    return {k: float(v) for k, v in m.items()}


def run(config: ml_collections.ConfigDict, workdir: str, *, start_params=None, sft_eval=None, sampled=None) -> dict:
    """SFT (or init), pairs, preference training on the loop (resumable), evaluation; returns the results dict.

    `start_params` (plain LM params) replaces the SFT stage and `sft_eval` its evaluation, and `sampled` ({split:
    `policy_pairs(config, start_params, split, n)`}) the policy's sampled pairs (a study shares them between runs).
    """
    model_cfg = validate(config)
    start = sft_policy(config, workdir) if start_params is None else start_params
    kto = kinds(config) == (KTO,)
    sampled = sampled or {}
    arrays, stats = make_pairs(
        config, "train", config.pairs.n, unpaired=kto, policy=start, sampled=sampled.get("train")
    )
    data = PairData.make(arrays, config.train.batch_size, config.seed)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    h = loss_hparams(config)
    p = config.pref
    lora = peft.LoraConfig(rank=p.lora_rank, alpha=p.lora_alpha) if p.lora_rank > 0 else None
    task = preference_task(
        model_cfg,
        start,
        data,
        kind=kinds(config),
        hparams=h,
        precompute_ref_logps=p.precompute_ref_logps,
        lora=lora,
        rng=jax.random.key(config.seed + 1),
        mesh=mesh,
        rules=rules,
        data_stats=stats,
    )
    state = loop.train(config, workdir, task)
    params = trained_policy(task, jax.device_get(state.params))
    eval_arrays, _ = make_pairs(config, "eval", config.pairs.eval_n, policy=start, sampled=sampled.get("eval"))
    # KTO's held-out pairs are scored by its implicit reward β·(logπ − logπ_ref), as DPO's are
    eval_kind, hk = (("sigmoid",), {"beta": h["beta"]}) if kto else (kinds(config), h)
    hk = {k: v for k, v in hk.items() if v is not None}
    results = {
        "step": int(state.step),
        "kind": list(kinds(config)),
        "data": stats,
        "sft": greedy_eval(start, model_cfg, config) if sft_eval is None else sft_eval,
        "policy": greedy_eval(params, model_cfg, config),
        "heldout_pairs": pair_eval(params, start, model_cfg, eval_arrays, eval_kind, hk),
    }
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
        with open(os.path.join(workdir, "results", "preference.json"), "w") as f:
            json.dump(results, f, indent=1)
        em = lambda r: np.mean([v["exact_match"] for v in r["accuracy_by_k"].values()])  # noqa: E731
        print(
            f"{'+'.join(kinds(config))}: exact match {em(results['sft']):.3f} (SFT) -> {em(results['policy']):.3f}; "
            f"held-out reward accuracy {results['heldout_pairs']['rewards/accuracies']:.3f}"
        )
    return dict(results, params=params)
