"""Inference: batched jit-compiled generation over a KV cache, its cache-free reference, KV caches and sampling.

from framework.inference import generate
out = generate(params, cfg, [prompt_a, prompt_b], max_new_tokens=32, temperature=0.8, top_p=0.95,
               rng=jax.random.key(0))                      # kv_layout="paged", kv_dtype="int8" also work
out.tokens, out.logprobs, out.lengths   # [B, N] int32, [B, N] float32 (unmodified model), [B] int32
out.processed_logprobs                  # [B, N] float32 under the distribution the tokens were drawn from
# After a row's stop: tokens hold `pad_value` (default the model's pad id, or -1 for a model without one, e.g. Llama);
# out.lengths marks each row's end, so no pad token is ever needed.

Hooks (static: each distinct setup compiles once): `logits_processors=(fn(logits_BV, tokens_BS, lengths_B), ...)`,
`sampler=fn(logits_BV, tokens_BS, lengths_B, keys_B)`, `interventions={"blocks.1.resid_post": fn}`. `rng` may be
one key or one key per row: a row's sample never depends on the other rows.

kv_cache_bytes(cfg, batch, seq_len, "bfloat16", "dense")   # what a cache of that shape allocates
"""

from framework.inference import kv_cache, sampling
from framework.inference.generate import GenerateOutput, bucket_length, generate
from framework.inference.kv_cache import KVCache, init_cache, kv_cache_bytes
from framework.inference.reference import reference_generate

__all__ = [
    "GenerateOutput",
    "KVCache",
    "bucket_length",
    "generate",
    "init_cache",
    "kv_cache",
    "kv_cache_bytes",
    "reference_generate",
    "sampling",
]
