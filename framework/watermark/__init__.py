"""Watermarks inside Lumen's jitted decoder, their detectors and attacks on them.

from framework.watermark import KGW, SynthID, Gumbel, detect
kgw = KGW(cfg.vocab_size, gamma=0.25, delta=2.0)                    # a logits processor
out = generate(params, cfg, prompts, max_new_tokens=200, temperature=1.0, rng=key, logits_processors=(kgw,))
tokens, lengths, start = join_generation(prompts, out)
det = detect(kgw, tokens, lengths, start)    # per row: score (z), exact p_value, num_scored, enough
sid = SynthID(cfg.vocab_size, keys=(654, 400, 836, 123), ngram_len=5)    # also a logits processor
gum = Gumbel(cfg.vocab_size, context_width=4)                           # a sampler: generate(..., sampler=gum)

bay = fit_bayesian(sid, marked, clean).calibrate(held_out_clean)    # SynthID's trained Bayesian detector
det = detect_bayesian(bay, tokens, lengths, start)   # per row: score (log-likelihood ratio), posterior, p_value

`compute_g_values` equals `transformers`' SynthID g-values; `detect_windows` finds a watermarked span;
`attacks` edits, mixes and regenerates text.
"""

from framework.watermark import attacks
from framework.watermark.base import Detection
from framework.watermark.bayesian import (
    BayesianDetection,
    BayesianSynthID,
    bayesian_inputs,
    detect_bayesian,
    fit_bayesian,
    fit_bayesian_g,
)
from framework.watermark.detect import WindowDetection, detect, detect_windows, join_generation, token_scores
from framework.watermark.gumbel import Gumbel
from framework.watermark.kgw import KGW
from framework.watermark.synthid import SynthID, compute_g_values, context_repetition_mask, default_weights

__all__ = [
    "BayesianDetection",
    "BayesianSynthID",
    "Detection",
    "Gumbel",
    "KGW",
    "SynthID",
    "WindowDetection",
    "attacks",
    "bayesian_inputs",
    "compute_g_values",
    "context_repetition_mask",
    "default_weights",
    "fit_bayesian",
    "fit_bayesian_g",
    "detect",
    "detect_bayesian",
    "detect_windows",
    "join_generation",
    "token_scores",
]
