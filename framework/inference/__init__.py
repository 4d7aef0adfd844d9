"""Inference: batched jit-compiled generation over a KV cache, its cache-free reference, and sampling functions.

from framework.inference import generate
out = generate(params, cfg, [prompt_a, prompt_b], max_new_tokens=32, temperature=0.8, top_p=0.95,
               rng=jax.random.key(0))
out.tokens, out.logprobs, out.lengths   # [B, N] int32, [B, N] float32 (unmodified model), [B] int32
"""

from framework.inference import sampling
from framework.inference.generate import GenerateOutput, bucket_length, generate
from framework.inference.reference import reference_generate

__all__ = ["GenerateOutput", "bucket_length", "generate", "reference_generate", "sampling"]
