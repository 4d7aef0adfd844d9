"""Golden preference-loss fixtures made by real TRL: every DPO `loss_type`, SimPO/cDPO (CPO), ORPO and KTO.

TRL's trainers compute their losses and metrics from per-token log-probs returned by the model. This script calls
TRL's own loss methods unbound (`DPOTrainer._compute_loss`, `KTOTrainer._compute_loss`, `CPOTrainer.cpo_loss`,
`ORPOTrainer.odds_ratio_loss`) on a stand-in `self` holding the trainer's settings, and a stand-in model whose
forward returns, for row b (identified by its first token id), the chosen per-token log-probs: the whole sequence
log-prob at the first completion position and zeros elsewhere (so TRL's token sum is exact), the completion mask of
the row's length, and the row's summed vocab-mean logit at the first completion position. Reference log-probs enter
as TRL's precomputed columns. So the goldens are TRL's arithmetic on known per-sequence log-probs, nothing else.

COMMAND: /work/main/.venv-parity/bin/python scripts/golden/trl_goldens.py --out tests/assets/trl
RUNTIME: ~20 s (importing torch + trl).  EXPECT: tests/assets/trl/{inputs.npz, goldens.json}, ~20 kB.

This script must never import jax or Lumen: it is the independent reference.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import pathlib
import types

import numpy as np
import torch
import trl
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

B = 8  # pairs (16 rows for KTO)
DPO_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Per-sequence log-probs, lengths and logit sums for B pairs and 2B unpaired rows (float32)."""
    rng = np.random.default_rng(seed)
    len_w = rng.integers(3, 30, B).astype(np.float32)
    len_l = rng.integers(3, 30, B).astype(np.float32)
    ref_w = (-len_w * rng.uniform(0.3, 1.5, B)).astype(np.float32)
    ref_l = (-len_l * rng.uniform(0.3, 1.5, B)).astype(np.float32)
    out = dict(
        chosen_logps=(ref_w + rng.normal(0, 3.0, B)).astype(np.float32),
        rejected_logps=(ref_l + rng.normal(0, 3.0, B)).astype(np.float32),
        ref_chosen_logps=ref_w,
        ref_rejected_logps=ref_l,
        chosen_len=len_w,
        rejected_len=len_l,
        chosen_logits_sum=(len_w * rng.normal(0, 1.0, B)).astype(np.float32),
        rejected_logits_sum=(len_l * rng.normal(0, 1.0, B)).astype(np.float32),
        chosen_nll=np.float32(rng.uniform(0.5, 2.0)),
    )
    n = 2 * B
    len_u = rng.integers(3, 30, n).astype(np.float32)
    out.update(
        kto_ref_logps=(-len_u * rng.uniform(0.3, 1.5, n)).astype(np.float32),
        kto_len=len_u,
        kto_desirable=(rng.uniform(size=n) < 0.5).astype(np.int32),
    )
    out["kto_desirable"][:2] = (1, 0)  # both groups present
    out["kto_policy_logps"] = (out["kto_ref_logps"] + rng.normal(0, 3.0, n)).astype(np.float32)
    out["kto_kl_ref_logps"] = (-len_u * rng.uniform(0.3, 1.5, n)).astype(np.float32)
    out["kto_kl_policy_logps"] = (out["kto_kl_ref_logps"] + rng.normal(0.5, 2.0, n)).astype(np.float32)
    return out


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def autocast(self):
        return contextlib.nullcontext()

    def unwrap_model(self, m):
        return m


class _RowModel:
    """Stand-in causal LM: row b (first token id = b) gets `logps[b]` at its first completion position."""

    training = True

    def __init__(self, logps, logits_sum=None, *, seq_len):
        self.logps = torch.as_tensor(logps, dtype=torch.float32)
        self.logits_sum = None if logits_sum is None else torch.as_tensor(logits_sum, dtype=torch.float32)
        self.seq_len = seq_len

    def __call__(self, input_ids, **kw):
        rows = input_ids[:, 0].long()
        n, t = input_ids.shape
        log_probs = torch.zeros(n, t - 1)
        log_probs[:, 0] = self.logps[rows]
        mean_logits = torch.zeros(n, t - 1)
        if self.logits_sum is not None:
            mean_logits[:, 0] = self.logits_sum[rows]
        return types.SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(n, t - 1),
            mean_logits=mean_logits,
            is_top1=torch.zeros(n, t - 1, dtype=torch.bool),
            aux_loss=None,
        )


def _batch(lengths):
    """input_ids [N, 1 + max len] with the row id first (the one prompt token), and the completion mask."""
    lengths = np.asarray(lengths, np.int64)
    n, t = len(lengths), 1 + int(lengths.max())
    ids = torch.zeros(n, t, dtype=torch.long)
    ids[:, 0] = torch.arange(n)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, ln in enumerate(lengths):
        mask[i, 1 : 1 + ln] = 1
    return ids, mask


def _metrics(store) -> dict[str, float]:
    return {
        k: float(v[-1]) for k, v in store["train"].items() if k not in ("entropy", "num_tokens", "mean_token_accuracy")
    }


def dpo_case(x, loss_types, *, beta=0.1, label_smoothing=0.0, weights=None) -> dict:
    """TRL DPOTrainer._compute_loss on the inputs (reference log-probs precomputed)."""
    logps = np.concatenate([x["chosen_logps"], x["rejected_logps"]])
    lengths = np.concatenate([x["chosen_len"], x["rejected_len"]])
    logits_sum = np.concatenate([x["chosen_logits_sum"], x["rejected_logits_sum"]])
    ids, mask = _batch(lengths)
    model = _RowModel(logps, logits_sum, seq_len=ids.shape[1])
    store = collections.defaultdict(lambda: collections.defaultdict(list))
    self = types.SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(weights or [1.0] * len(loss_types)),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        aux_loss_enabled=False,
        _metrics=store,
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
    )
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        completion_mask=mask,
        ref_chosen_logps=torch.as_tensor(x["ref_chosen_logps"]),
        ref_rejected_logps=torch.as_tensor(x["ref_rejected_logps"]),
    )
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return dict(
        trainer="DPOTrainer",
        kind=list(loss_types),
        hparams=dict(beta=beta, epsilon=label_smoothing, weights=self.loss_weights),
        loss=float(loss),
        metrics=_metrics(store),
    )


def cpo_case(x, loss_type, *, beta, gamma=0.5, label_smoothing=0.0, on_logratios=False) -> dict:
    """TRL CPOTrainer.cpo_loss: 'simpo' on length-averaged log-probs; or 'sigmoid' with label smoothing fed the DPO
    log-ratios (`on_logratios`), which is cDPO."""
    if on_logratios:
        w = x["chosen_logps"] - x["ref_chosen_logps"]
        l_ = x["rejected_logps"] - x["ref_rejected_logps"]
    else:
        w, l_ = x["chosen_logps"] / x["chosen_len"], x["rejected_logps"] / x["rejected_len"]
    self = types.SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=label_smoothing,
        accelerator=_Accelerator(),
    )
    losses, cr, rr = CPOTrainer.cpo_loss(self, torch.as_tensor(w), torch.as_tensor(l_))
    metrics = {
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/accuracies": float((cr > rr).float().mean()),
        "rewards/margins": float((cr - rr).mean()),
    }
    if not on_logratios:
        metrics |= {
            "logps/chosen": float(torch.as_tensor(w).mean()),
            "logps/rejected": float(torch.as_tensor(l_).mean()),
        }
    kind = "cdpo" if on_logratios else loss_type
    return dict(
        trainer="CPOTrainer",
        kind=[kind],
        hparams=dict(beta=beta, gamma=gamma, epsilon=label_smoothing),
        loss=float(losses.mean()),
        metrics=metrics,
    )


def orpo_case(x, *, beta=0.1) -> dict:
    """TRL ORPOTrainer.odds_ratio_loss on length-averaged log-probs; loss = chosen NLL − mean(β·log σ(log-odds))."""
    w = torch.as_tensor(x["chosen_logps"] / x["chosen_len"])
    l_ = torch.as_tensor(x["rejected_logps"] / x["rejected_len"])
    self = types.SimpleNamespace(beta=beta, accelerator=_Accelerator())
    losses, cr, rr, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(self, w, l_)
    nll = torch.as_tensor(x["chosen_nll"])
    return dict(
        trainer="ORPOTrainer",
        kind=["orpo"],
        hparams=dict(beta=beta),
        loss=float(nll - losses.mean()),
        metrics={
            "rewards/chosen": float(cr.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/accuracies": float((cr > rr).float().mean()),
            "rewards/margins": float((cr - rr).mean()),
            "logps/chosen": float(w.mean()),
            "logps/rejected": float(l_.mean()),
            "nll_loss": float(nll),
            "log_odds_ratio": float(log_odds_ratio),
            "log_odds_chosen": float(log_odds_chosen),
        },
    )


def kto_case(x, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0) -> dict:
    """TRL KTOTrainer._compute_loss ('kto') on unpaired rows, reference and KL reference log-probs precomputed."""
    n = len(x["kto_policy_logps"])
    ids, mask = _batch(x["kto_len"])
    # Rows 0..n-1 are the completions, rows n..2n-1 the mismatched (KL) completions: one model serves both.
    model = _RowModel(np.concatenate([x["kto_policy_logps"], x["kto_kl_policy_logps"]]), seq_len=ids.shape[1])
    kl_ids = ids.clone()
    kl_ids[:, 0] += n
    store = collections.defaultdict(lambda: collections.defaultdict(list))
    self = types.SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        aux_loss_enabled=False,
        _metrics=store,
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, self)
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        completion_mask=mask,
        KL_input_ids=kl_ids,
        KL_attention_mask=torch.ones_like(kl_ids),
        KL_completion_mask=mask,
        label=torch.as_tensor(x["kto_desirable"]).bool(),
        ref_logps=torch.as_tensor(x["kto_ref_logps"]),
        ref_KL_logps=torch.as_tensor(x["kto_kl_ref_logps"]),
    )
    loss = KTOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    metrics = _metrics(store)
    metrics.pop("logits/chosen", None), metrics.pop("logits/rejected", None)
    return dict(
        trainer="KTOTrainer",
        kind=["kto"],
        hparams=dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight),
        loss=float(loss),
        metrics=metrics,
    )


def cases(x) -> list[dict]:
    out = []
    for t in DPO_TYPES:
        eps = 0.1 if t in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
        out.append(dpo_case(x, [t], beta=0.1, label_smoothing=eps))
    out.append(dpo_case(x, ["sigmoid"], beta=0.5))
    out.append(dpo_case(x, ["robust"], beta=0.3, label_smoothing=0.3))
    out.append(dpo_case(x, ["ipo"], beta=0.02))
    out.append(dpo_case(x, ["sigmoid", "sft"], beta=0.1, weights=[1.0, 0.5]))  # RPO
    out.append(dpo_case(x, ["sigmoid", "bco_pair", "sft"], beta=0.1, weights=[0.8, 0.2, 1.0]))  # MPO
    out.append(cpo_case(x, "simpo", beta=2.0, gamma=0.5))
    out.append(cpo_case(x, "simpo", beta=2.5, gamma=1.0, label_smoothing=0.1))
    out.append(cpo_case(x, "sigmoid", beta=0.1, label_smoothing=0.2, on_logratios=True))
    out.append(orpo_case(x, beta=0.1))
    out.append(orpo_case(x, beta=1.0))
    out.append(kto_case(x, beta=0.1))
    out.append(kto_case(x, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/assets/trl")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs (the committed goldens use 0)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = make_inputs(args.seed)
    np.savez(out / "inputs.npz", **x)
    record = dict(trl=trl.__version__, torch=torch.__version__, batch=B, cases=cases(x))
    (out / "goldens.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {len(record['cases'])} cases (TRL {trl.__version__}) to {out}")


if __name__ == "__main__":
    main()
