"""Golden fixtures for Lumen's SynthID watermark, made by the reference implementation in `transformers`.

COMMAND: /work/main/.venv-parity/bin/python scripts/golden/synthid_goldens.py   (writes tests/assets/synthid/)
RUNTIME: ~20 s on a 2-core CPU (torch CPU).

Writes, all small .npz/.json:
  g_values.npz  for several (keys, ngram_len, sampling_table_size, sampling_table_seed, context_history_size)
                settings: random token ids (with forced repeats), `compute_g_values`, `compute_context_repetition_mask`
                and the table's fraction of ones, per setting (settings in g_values.json), and one call of the
                processor's score update (`update_scores`) on given logits and g-values;
  hf_generated.npz  token ids sampled by a tiny random-weight `LlamaForCausalLM` (vocab 1000) through `generate`
                with `watermarking_config=SynthIDTextWatermarkingConfig(...)` and, as the control, without it;
  pvalues.npz   binomial upper tails summed exactly in rationals and gamma upper tails (Poisson sums), to check
                the detectors' p-values.
"""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, SynthIDTextWatermarkingConfig
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "assets", "synthid")

SETTINGS = [
    dict(
        keys=[654, 400, 836, 123, 340, 443, 597, 160, 57],
        ngram_len=5,
        sampling_table_size=2**16,
        sampling_table_seed=0,
        context_history_size=1024,
    ),
    dict(keys=[1, 2, 3], ngram_len=2, sampling_table_size=2**16, sampling_table_seed=7, context_history_size=8),
    dict(
        keys=[2**40 + 3, -17, 5 * 10**17, 99],
        ngram_len=3,
        sampling_table_size=1000,
        sampling_table_seed=123,
        context_history_size=16,
    ),
    dict(keys=[31337], ngram_len=4, sampling_table_size=12345, sampling_table_seed=2**33 + 1, context_history_size=0),
]
GEN = dict(
    keys=[654, 400, 836, 123, 340, 443, 597, 160, 57, 29, 590, 639, 13, 715, 468, 990, 966, 226, 324, 585],
    ngram_len=5,
    sampling_table_size=2**16,
    sampling_table_seed=0,
    context_history_size=1024,
)


def g_value_fixtures(rng) -> tuple[dict, list]:
    arrays, meta = {}, []
    for i, s in enumerate(SETTINGS):
        tokens = rng.integers(0, 50_000, (3, 40))
        tokens[1, 20:30] = tokens[1, 5:15]  # a repeated stretch: the repetition mask has work to do
        tokens[2, :] = np.tile(tokens[2, :4], 10)  # a periodic row
        proc = SynthIDTextWatermarkLogitsProcessor(device="cpu", **s)
        ids = torch.tensor(tokens, dtype=torch.long)
        arrays[f"tokens_{i}"] = tokens.astype(np.int32)
        arrays[f"g_{i}"] = proc.compute_g_values(ids).numpy().astype(np.int8)
        arrays[f"mask_{i}"] = proc.compute_context_repetition_mask(ids).numpy().astype(np.int8)
        arrays[f"table_rate_{i}"] = np.float64(proc.sampling_table.double().mean().item())
        meta.append(s)
    # The score update of one decode step, on logits with a -inf (top-k'd) entry.
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    scores[:, 7] = -float("inf")
    g = torch.randint(0, 2, (3, 50, 6), generator=torch.Generator().manual_seed(4))
    proc = SynthIDTextWatermarkLogitsProcessor(device="cpu", **SETTINGS[0])
    arrays["update_scores_in"] = scores.numpy().astype(np.float32)
    arrays["update_scores_g"] = g.numpy().astype(np.int8)
    arrays["update_scores_out"] = proc.update_scores(scores.float(), g).numpy()
    return arrays, meta


def hf_generation() -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    prompts = torch.randint(3, 1000, (4, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(
        do_sample=True,
        max_new_tokens=160,
        min_new_tokens=160,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        attention_mask=torch.ones_like(prompts),
        pad_token_id=0,
    )
    torch.manual_seed(2)
    marked = model.generate(prompts, watermarking_config=SynthIDTextWatermarkingConfig(**GEN), **kw)
    torch.manual_seed(2)
    clean = model.generate(prompts, **kw)
    return dict(
        prompts=prompts.numpy().astype(np.int32),
        marked=marked.numpy().astype(np.int32),
        clean=clean.numpy().astype(np.int32),
    )


def binom_sf(k: int, n: int, p: Fraction) -> float:
    """P(X >= k), X ~ Binomial(n, p), summed exactly in rationals."""
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1)))


def gamma_sf(s: float, n: int) -> float:
    """P(Gamma(n, 1) >= s) = P(Poisson(s) < n), summed in log space (float64)."""
    logs = [-s + j * math.log(s) - math.lgamma(j + 1) for j in range(n)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs)


def pvalue_fixtures() -> dict:
    n = np.array([1, 10, 50, 200, 200, 1000, 4000, 4000])
    k = np.array([1, 7, 30, 70, 120, 300, 2200, 2400])
    s = np.array([0.5, 12.0, 70.0, 230.0, 300.0, 1100.0, 4100.0, 4400.0])
    quarter = [binom_sf(int(a), int(b), Fraction(1, 4)) for a, b in zip(k, n)]
    half = [binom_sf(int(a), int(b), Fraction(1, 2)) for a, b in zip(k, n)]
    gam = [gamma_sf(float(a), int(b)) for a, b in zip(s, n)]
    return dict(n=n, k=k, s=s, binom_sf_quarter=np.array(quarter), binom_sf_half=np.array(half), gamma_sf=np.array(gam))


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays, meta = g_value_fixtures(rng)
    np.savez_compressed(os.path.join(OUT, "g_values.npz"), **arrays)
    with open(os.path.join(OUT, "g_values.json"), "w") as f:
        json.dump(
            dict(settings=meta, generation=GEN, transformers=transformers.__version__, torch=torch.__version__),
            f,
            indent=1,
        )
    np.savez_compressed(os.path.join(OUT, "hf_generated.npz"), **hf_generation())
    np.savez_compressed(os.path.join(OUT, "pvalues.npz"), **pvalue_fixtures())
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
