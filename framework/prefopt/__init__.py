"""Preference optimisation: the DPO family as pure functions of per-sequence log-probs, and preference-pair builders.

  loss_B, metrics = preference_loss("sigmoid", chosen_logps_B, rejected_logps_B, ref_chosen_B, ref_rejected_B, beta=0.1)
  pairs = arithmetic_pairs(seed=0, n=512, flip_rate=0.1)     # chosen: the gold trace; rejected: one corrupted step
  batch = encode_pairs(pairs, tokenizer="arith", seq_len=64)  # chosen_/rejected_ tokens and completion masks

The trainer is the experiment `experiments/preference.py` (a `loop.Task` on the one training loop).
"""

from framework.prefopt.losses import (
    KINDS,
    NEEDS_LENGTHS,
    REFERENCE_FREE,
    check_hparams,
    kinds_of,
    kto_loss,
    needs_reference,
    preference_loss,
)
from framework.prefopt.pairs import (
    Pair,
    arithmetic_pairs,
    corrupt_trace,
    encode_kto,
    encode_pairs,
    kto_rows,
    pair_stats,
    perturb_pairs,
    sampled_pairs,
)

__all__ = [
    "KINDS",
    "Pair",
    "arithmetic_pairs",
    "corrupt_trace",
    "encode_kto",
    "encode_pairs",
    "kto_rows",
    "pair_stats",
    "perturb_pairs",
    "sampled_pairs",
    "NEEDS_LENGTHS",
    "REFERENCE_FREE",
    "check_hparams",
    "kinds_of",
    "kto_loss",
    "needs_reference",
    "preference_loss",
]
