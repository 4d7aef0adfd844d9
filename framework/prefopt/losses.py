"""The DPO family as pure functions of per-sequence log-probs: losses and the metrics TRL logs, under TRL's names.

Glossary: B batch (pairs, or unpaired rows for KTO).

Inputs are sequence-summed completion log-probs (what `training.loss.sequence_logprobs` returns) of the policy and,
for the kinds that need one, of the frozen reference; lengths are completion token counts. Notation used in the
docstrings below (matching TRL's DPOTrainer / CPOTrainer / ORPOTrainer / KTOTrainer):

    c = logπ(y_w) − logπ_ref(y_w),  r = logπ(y_l) − logπ_ref(y_l)     (chosen / rejected log-ratios)
    Δ = c − r,  ℓ(x) = −log σ(x),  r̄_w = logπ(y_w) / |y_w|,  r̄_l = logπ(y_l) / |y_l|

`preference_loss(kind, ...)` returns (loss_B, metrics): `loss_B.mean()` is the training loss TRL computes for the
same inputs (for a list of kinds, Σ_k weight_k · mean(loss_k), as TRL's `loss_type=[...]` with `loss_weights`).
Metrics are scalars: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
`logps/rejected`, `logits/chosen`, `logits/rejected` (the last two when per-sequence logit sums are given), plus
`nll_loss`, `log_odds_ratio`, `log_odds_chosen` for ORPO. With reference log-probs the rewards are β·c and β·r and
`logps/*` are of the summed log-probs (DPOTrainer); without them (SimPO, ORPO: TRL's CPO and ORPO trainers) the
rewards are β·r̄ and `logps/*` are of the length-averaged log-probs, as TRL logs them.

Inputs are validated before any tracing: an unknown kind, β ≤ 0, ε outside [0, 0.5), a missing reference or length,
mismatched shapes, non-finite log-probs and lengths < 1 raise a ValueError naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log_sigmoid = jax.nn.log_sigmoid

# Every paired kind. Reference-free kinds never need (and the trainer never computes) reference log-probs.
KINDS = (
    "sigmoid",
    "cdpo",
    "robust",
    "hinge",
    "ipo",
    "simpo",
    "orpo",
    "alphadpo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
REFERENCE_FREE = ("simpo", "orpo", "sft")
NEEDS_LENGTHS = ("ipo", "simpo", "orpo", "alphadpo", "sigmoid_norm", "sft")
USES_EPSILON = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")
HPARAMS = ("beta", "epsilon", "gamma", "alpha", "tau", "weights", "chosen_nll")


def _ell(x):
    """ℓ(x) = −log σ(x)."""
    return -log_sigmoid(x)


def _smoothed(x, eps):
    """(1−ε)ℓ(x) + εℓ(−x): the conservative (label-smoothed) logistic loss."""
    return (1.0 - eps) * _ell(x) + eps * _ell(-x)


def _log1mexp(x):
    """log(1 − exp(x)) for x < 0, branching at −ln 2 to avoid cancellation."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


# ------------------------------------------------------------------------------------------------- the kinds
def sigmoid(c, r, *, beta, **_):
    """DPO (Rafailov et al. 2023): ℓ(βΔ)."""
    return _ell(beta * (c - r))


def cdpo(c, r, *, beta, epsilon, **_):
    """Conservative DPO (label smoothing ε): (1−ε)ℓ(βΔ) + εℓ(−βΔ)."""
    return _smoothed(beta * (c - r), epsilon)


def robust(c, r, *, beta, epsilon, **_):
    """rDPO (Chowdhury et al. 2024), unbiased under flip rate ε: [(1−ε)ℓ(βΔ) − εℓ(−βΔ)] / (1−2ε)."""
    x = beta * (c - r)
    return ((1.0 - epsilon) * _ell(x) - epsilon * _ell(-x)) / (1.0 - 2.0 * epsilon)


def hinge(c, r, *, beta, **_):
    """SLiC hinge: relu(1 − βΔ)."""
    return jax.nn.relu(1.0 - beta * (c - r))


def ipo(c, r, *, beta, len_w, len_l, **_):
    """IPO (Azar et al. 2023): (Δ̄ − 1/(2β))², Δ̄ = c/|y_w| − r/|y_l| (each log-ratio divided by its length, as TRL)."""
    return (c / len_w - r / len_l - 1.0 / (2.0 * beta)) ** 2


def simpo(c, r, *, beta, gamma, epsilon, logp_w, logp_l, len_w, len_l, **_):
    """SimPO (Meng et al. 2024), reference-free: (1−ε)ℓ(u) + εℓ(−u), u = β(r̄_w − r̄_l) − γ (TRL's CPO 'simpo')."""
    return _smoothed(beta * (logp_w / len_w - logp_l / len_l) - gamma, epsilon)


def _log_odds(logp_w, logp_l, len_w, len_l):
    """log-odds(y_w) − log-odds(y_l) on length-averaged log-probs, odds = p/(1−p) via log1mexp."""
    a_w, a_l = logp_w / len_w, logp_l / len_l
    return (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))


def orpo(c, r, *, beta, logp_w, logp_l, len_w, len_l, chosen_nll=None, **_):
    """ORPO (Hong et al. 2024), reference-free: NLL_w − λ·log σ(log-odds_w − log-odds_l), λ = β.

    NLL_w is `chosen_nll` if given (TRL: the token-mean cross-entropy of the chosen sequences), else the token-mean
    over the chosen completions, −Σ logπ(y_w) / Σ|y_w|.
    """
    nll = -jnp.sum(logp_w) / jnp.sum(len_w) if chosen_nll is None else jnp.asarray(chosen_nll, jnp.float32)
    return nll - beta * log_sigmoid(_log_odds(logp_w, logp_l, len_w, len_l))


def alphadpo(c, r, *, beta, gamma, alpha, logp_w, logp_l, len_w, len_l, **_):
    """AlphaDPO (Wu et al. 2024): ℓ(β[(r̄_w − r̄_l) − α·sg(z)] − γ), SimPO with an adaptive reference margin.

    z standardises (over the batch, population std + 1e-6) the length-averaged policy-minus-reference margin
    c/|y_w| − r/|y_l|; sg is stop-gradient. α = 0 is SimPO.
    """
    m = c / len_w - r / len_l
    z = jax.lax.stop_gradient((m - jnp.mean(m)) / (jnp.std(m) + 1e-6))
    return _ell(beta * (logp_w / len_w - logp_l / len_l - alpha * z) - gamma)


def exo_pair(c, r, *, beta, epsilon, **_):
    """EXO (Ji et al. 2024): KL(q‖p) over {w, l}, q = (σ(βΔ), σ(−βΔ)), p = (1−ε, ε)."""
    x = beta * (c - r)
    qw, ql = jax.nn.sigmoid(x), jax.nn.sigmoid(-x)
    return qw * (log_sigmoid(x) - jnp.log1p(-epsilon)) + ql * (log_sigmoid(-x) - jnp.log(epsilon))


def nca_pair(c, r, *, beta, **_):
    """NCA (Chen et al. 2024): ℓ(βc) + ½ℓ(−βc) + ½ℓ(−βr)."""
    return _ell(beta * c) + 0.5 * _ell(-beta * c) + 0.5 * _ell(-beta * r)


def bco_pair(c, r, *, beta, **_):
    """BCO, paired (Jung et al. 2024): ℓ(βc) + ℓ(−βr)."""
    return _ell(beta * c) + _ell(-beta * r)


def sppo_hard(c, r, *, beta, **_):
    """SPPO, hard labels (Wu et al. 2024): (c − 1/(2β))² + (r + 1/(2β))²."""
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def aot(c, r, *, beta, epsilon, logp_w, logp_l, ref_w, ref_l, **_):
    """AOT paired (Melnyk et al. 2024): (1−ε)ℓ(βd) + εℓ(−βd), d = sort(logπ_w − logπ_l) − sort(ref_w − ref_l)."""
    d = jnp.sort(logp_w - logp_l) - jnp.sort(ref_w - ref_l)
    return _smoothed(beta * d, epsilon)


def aot_unpaired(c, r, *, beta, epsilon, **_):
    """AOT unpaired: (1−ε)ℓ(βd) + εℓ(−βd), d = sort(c) − sort(r)."""
    return _smoothed(beta * (jnp.sort(c) - jnp.sort(r)), epsilon)


def apo_zero(c, r, *, beta, **_):
    """APO-zero (D'Oosterlinck et al. 2024): (1 − σ(βc)) + σ(βr)."""
    return (1.0 - jax.nn.sigmoid(beta * c)) + jax.nn.sigmoid(beta * r)


def apo_down(c, r, *, beta, **_):
    """APO-down: σ(βc) + (1 − σ(βΔ))."""
    return jax.nn.sigmoid(beta * c) + (1.0 - jax.nn.sigmoid(beta * (c - r)))


def discopop(c, r, *, beta, tau, **_):
    """DiscoPOP (Chris Lu et al. 2024): ℓ(x)(1 − σ(x/τ)) + exp(−x)σ(x/τ), x = βΔ."""
    x = beta * (c - r)
    m = jax.nn.sigmoid(x / tau)
    return _ell(x) * (1.0 - m) + jnp.exp(-x) * m


def sigmoid_norm(c, r, *, beta, len_w, len_l, **_):
    """Length-normalised DPO: ℓ(β(c/|y_w| − r/|y_l|))."""
    return _ell(beta * (c / len_w - r / len_l))


def sft(c, r, *, logp_w, len_w, **_):
    """SFT on the chosen completions (RPO/MPO term): −Σ logπ(y_w) / Σ|y_w|, the same value for every row."""
    return jnp.broadcast_to(-jnp.sum(logp_w) / jnp.sum(len_w), logp_w.shape)


_FNS = {name: globals()[name] for name in KINDS}


# ------------------------------------------------------------------------------------------------ validation
def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def kinds_of(kind: str | Sequence[str]) -> tuple[str, ...]:
    """The kinds of a `kind` argument (one name or a list), each checked against KINDS."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds:
        raise ValueError("kind: expected a kind or a non-empty list of kinds; got an empty list")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kind = {k!r} is not a preference loss kind; expected one of {KINDS}")
    return kinds


def needs_reference(kind: str | Sequence[str]) -> bool:
    """Whether any of the kinds uses reference log-probs."""
    return any(k not in REFERENCE_FREE for k in kinds_of(kind))


def check_hparams(kind: str | Sequence[str], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters with defaults filled, each checked (β > 0, ε in [0, 0.5), weights one per kind ...)."""
    kinds = kinds_of(kind)
    unknown = sorted(set(hparams) - set(HPARAMS))
    if unknown:
        raise ValueError(f"unknown preference-loss hyper-parameters {unknown}; expected some of {HPARAMS}")
    h = dict(beta=0.1, epsilon=0.0, gamma=0.5, alpha=0.0, tau=0.05, weights=None, chosen_nll=None) | dict(hparams)
    for name in ("beta", "epsilon", "gamma", "alpha", "tau"):
        v = h[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
            raise ValueError(f"{name} = {v!r}; expected a finite number")
    if not h["beta"] > 0:
        raise ValueError(f"beta = {h['beta']!r}; expected beta > 0")
    if not h["tau"] > 0:
        raise ValueError(f"tau = {h['tau']!r}; expected tau > 0")
    if not 0.0 <= h["epsilon"] < 0.5:
        raise ValueError(f"epsilon = {h['epsilon']!r}; expected the label-flip rate in [0, 0.5)")
    if "exo_pair" in kinds and not h["epsilon"] > 0:
        raise ValueError(f"epsilon = {h['epsilon']!r}; kind 'exo_pair' needs epsilon in (0, 0.5)")
    if h["weights"] is None:
        h["weights"] = (1.0,) * len(kinds)
    w = tuple(float(x) for x in np.atleast_1d(h["weights"]))
    if len(w) != len(kinds) or not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights = {h['weights']!r}; expected {len(kinds)} finite numbers, one per kind {kinds}")
    h["weights"] = w
    return h


def _check_logps(name: str, x, shape):
    if x is None:
        return None
    x = jnp.asarray(x, jnp.float32) if not isinstance(x, jax.core.Tracer) else x
    if x.ndim != 1:
        raise ValueError(f"{name} has shape {x.shape}; expected [B], one value per sequence")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}; expected {shape} like chosen_logps_B")
    if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        bad = int(np.flatnonzero(~np.isfinite(np.asarray(x)))[0])
        raise ValueError(f"{name}[{bad}] = {float(x[bad])}; expected finite log-probs (NaN/inf would be averaged in)")
    return x


def _check_lengths(name: str, x, shape):
    x = _check_logps(name, x, shape)
    if _is_concrete(x) and not bool(jnp.all(x >= 1)):
        bad = int(np.flatnonzero(np.asarray(x) < 1)[0])
        raise ValueError(f"{name}[{bad}] = {float(x[bad])}; expected completion lengths >= 1 token")
    return x


# ---------------------------------------------------------------------------------------------- public API
def preference_loss(
    kind: str | Sequence[str],
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B=None,
    ref_rejected_logps_B=None,
    *,
    chosen_len_B=None,
    rejected_len_B=None,
    chosen_logits_sum_B=None,
    rejected_logits_sum_B=None,
    **hparams,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair preference loss [B] and TRL's metrics for one kind (or a weighted list of kinds) of KINDS.

    Log-probs are sequence sums over the completion; lengths its token counts (needed by ipo, simpo, orpo,
    alphadpo, sigmoid_norm, sft and the logits metrics). `*_logits_sum_B`: Σ over completion tokens of the
    vocab-mean logit (gives `logits/chosen`, `logits/rejected`). Hyper-parameters: beta (β, or ORPO's λ; 0.1),
    epsilon (label smoothing / flip rate ε; 0), gamma (SimPO/AlphaDPO margin γ; 0.5), alpha (AlphaDPO α; 0),
    tau (DiscoPOP τ; 0.05), weights (one per kind; 1), chosen_nll (ORPO's NLL term; default from the inputs).
    Jit-able (kind and hparams static); with concrete inputs the values are checked for NaN/inf and lengths < 1.
    """
    kinds = kinds_of(kind)
    h = check_hparams(kinds, hparams)
    logp_w = _check_logps("chosen_logps_B", chosen_logps_B, None)
    shape = logp_w.shape
    logp_l = _check_logps("rejected_logps_B", rejected_logps_B, shape)
    ref_w = _check_logps("ref_chosen_logps_B", ref_chosen_logps_B, shape)
    ref_l = _check_logps("ref_rejected_logps_B", ref_rejected_logps_B, shape)
    len_w = _check_lengths("chosen_len_B", chosen_len_B, shape)
    len_l = _check_lengths("rejected_len_B", rejected_len_B, shape)
    has_ref = ref_w is not None or ref_l is not None
    if has_ref and (ref_w is None or ref_l is None):
        raise ValueError("ref_chosen_logps_B and ref_rejected_logps_B: give both or neither")
    for k in kinds:
        if k not in REFERENCE_FREE and not has_ref:
            raise ValueError(f"kind {k!r} needs reference log-probs: pass ref_chosen_logps_B and ref_rejected_logps_B")
        if k in NEEDS_LENGTHS and (len_w is None or len_l is None):
            raise ValueError(f"kind {k!r} needs completion lengths: pass chosen_len_B and rejected_len_B")
    if (chosen_logits_sum_B is not None or rejected_logits_sum_B is not None) and (len_w is None or len_l is None):
        raise ValueError("chosen_logits_sum_B/rejected_logits_sum_B need chosen_len_B and rejected_len_B")

    c = logp_w - ref_w if has_ref else logp_w
    r = logp_l - ref_l if has_ref else logp_l
    kw = dict(h, logp_w=logp_w, logp_l=logp_l, ref_w=ref_w, ref_l=ref_l, len_w=len_w, len_l=len_l)
    loss_B = sum(w * _FNS[k](c, r, **kw) for k, w in zip(kinds, h["weights"]))

    beta = h["beta"]
    if has_ref:
        reward_w, reward_l, shown_w, shown_l = beta * c, beta * r, logp_w, logp_l
    else:  # TRL's CPO/ORPO trainers score the length-averaged log-probs
        shown_w, shown_l = (logp_w / len_w, logp_l / len_l) if len_w is not None else (logp_w, logp_l)
        reward_w, reward_l = beta * shown_w, beta * shown_l
    reward_w, reward_l = jax.lax.stop_gradient(reward_w), jax.lax.stop_gradient(reward_l)
    metrics = {
        "rewards/chosen": jnp.mean(reward_w),
        "rewards/rejected": jnp.mean(reward_l),
        "rewards/accuracies": jnp.mean((reward_w > reward_l).astype(jnp.float32)),
        "rewards/margins": jnp.mean(reward_w - reward_l),
        "logps/chosen": jax.lax.stop_gradient(jnp.mean(shown_w)),
        "logps/rejected": jax.lax.stop_gradient(jnp.mean(shown_l)),
    }
    if chosen_logits_sum_B is not None:
        metrics["logits/chosen"] = jax.lax.stop_gradient(jnp.sum(chosen_logits_sum_B) / jnp.sum(len_w))
    if rejected_logits_sum_B is not None:
        metrics["logits/rejected"] = jax.lax.stop_gradient(jnp.sum(rejected_logits_sum_B) / jnp.sum(len_l))
    if "orpo" in kinds:
        lo = jax.lax.stop_gradient(_log_odds(logp_w, logp_l, len_w, len_l))
        nll = -jnp.sum(logp_w) / jnp.sum(len_w) if h["chosen_nll"] is None else jnp.asarray(h["chosen_nll"])
        metrics["nll_loss"] = jax.lax.stop_gradient(nll)
        metrics["log_odds_ratio"] = jnp.mean(log_sigmoid(lo))
        metrics["log_odds_chosen"] = jnp.mean(lo)
    return loss_B, metrics


def kto_loss(
    policy_logps_B,
    ref_logps_B,
    desirable_B,
    kl_policy_logps_B,
    kl_ref_logps_B,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO (Ethayarajh et al. 2024) on unpaired rows: loss [B] (its mean is TRL's loss) and TRL's metrics.

    ρ = logπ(y) − logπ_ref(y); z₀ = max(0, mean(kl_policy − kl_ref)) is the KL estimate from mismatched
    (prompt, completion) pairs of the batch, detached. Desirable rows: λ_D·(1 − σ(β(ρ − z₀))); undesirable rows:
    λ_U·(1 − σ(β(z₀ − ρ))). Metrics: `kl`, and over each group (0 when a group is empty) `rewards/chosen`,
    `rewards/rejected`, `logps/chosen`, `logps/rejected`, `rewards/margins`, plus `count/chosen`, `count/rejected`.
    """
    h = check_hparams("sigmoid", {"beta": beta})
    for name, v in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} = {v!r}; expected a finite number >= 0")
    logp = _check_logps("policy_logps_B", policy_logps_B, None)
    ref = _check_logps("ref_logps_B", ref_logps_B, logp.shape)
    kl_p = _check_logps("kl_policy_logps_B", kl_policy_logps_B, None)
    kl_r = _check_logps("kl_ref_logps_B", kl_ref_logps_B, kl_p.shape)
    desirable = jnp.asarray(desirable_B).astype(bool)
    if desirable.shape != logp.shape:
        raise ValueError(f"desirable_B has shape {desirable.shape}; expected {logp.shape} like policy_logps_B")
    beta = h["beta"]
    kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_p - kl_r), 0.0))
    rho = logp - ref
    loss_B = jnp.where(
        desirable,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - kl))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - rho))),
    )
    rewards = jax.lax.stop_gradient(beta * rho)
    n_w = jnp.sum(desirable.astype(jnp.float32))
    n_l = jnp.sum((~desirable).astype(jnp.float32))

    def group_mean(x, mask, n):
        return jnp.where(n > 0, jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1.0), 0.0)

    rw, rl = group_mean(rewards, desirable, n_w), group_mean(rewards, ~desirable, n_l)
    metrics = {
        "kl": kl,
        "rewards/chosen": rw,
        "rewards/rejected": rl,
        "rewards/margins": jnp.where((n_w > 0) & (n_l > 0), rw - rl, 0.0),
        "logps/chosen": jax.lax.stop_gradient(group_mean(logp, desirable, n_w)),
        "logps/rejected": jax.lax.stop_gradient(group_mean(logp, ~desirable, n_l)),
        "count/chosen": n_w,
        "count/rejected": n_l,
    }
    return loss_B, metrics
