"""`impl="splash"`: JAX's own splash attention (the TPU Pallas kernel in jax.experimental), behind our API.

It is the peer our TPU kernel is measured against, so it takes exactly our arguments: q [B, T, H, D], k/v [B, S, K, D]
with K dividing H (each kv head runs splash's MQA kernel over its G query heads; vmapped over kv heads and batch),
causal (bottom-right aligned when T != S), segment ids, sliding window, softcap, sm_scale (folded into q: splash
applies no scale of its own). Lengths are padded to multiples of 128 (splash's block size); padded queries and keys
get segment ids of their own, so no real token sees them.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

BLOCK = 128


def _pad(x, axis, n, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def splash_attention(q, k, v, *, causal, segs, window, softcap, sm_scale, interpret: bool):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    Tp, Sp = -(-T // BLOCK) * BLOCK, -(-S // BLOCK) * BLOCK
    offset = S - T
    if window is not None:
        base = sm.LocalMask((Tp, Sp), window_size=(window - 1, 0), offset=offset)
    elif causal:
        base = sm.CausalMask((Tp, Sp), offset=offset)
    else:
        base = sm.FullMask((Tp, Sp))
    kernel = sk.make_splash_mqa(
        sm.MultiHeadMask([base] * G),
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )
    if segs is None:
        segs = (jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32))
    q_seg, kv_seg = _pad(segs[0], 1, Tp, -1), _pad(segs[1], 1, Sp, -2)
    q_BKGTD = (_pad(q, 1, Tp) * jnp.asarray(sm_scale, q.dtype)).reshape(B, Tp, K, G, D).transpose(0, 2, 3, 1, 4)
    k_BKSD, v_BKSD = (_pad(x, 1, Sp).transpose(0, 2, 1, 3) for x in (k, v))

    def one_head(q_GTD, k_SD, v_SD, qs, kvs):
        return kernel(q_GTD, k_SD, v_SD, segment_ids=sk.SegmentIds(q=qs, kv=kvs))

    per_kv_head = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))
    o_BKGTD = jax.vmap(per_kv_head)(q_BKGTD, k_BKSD, v_BKSD, q_seg, kv_seg)
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, D)[:, :T].astype(q.dtype)
