"""Public flash-attention entry point: validation, padding, custom_vjp and the choice of implementation.

Dimension letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K, D head dim.

`impl`:
- "xla": the pure-jnp reference (`reference.py`; materialises [T, S]).
- "interpret": the Pallas kernels of `gpu.py` through Pallas interpret mode (runs anywhere; what CPU tests use).
- "interpret_tpu": the Mosaic-style kernels of `tpu.py` through TPU interpret mode
  (`pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")`).
- "pallas": the compiled kernels: `gpu.py` (Triton lowering) on GPU, `tpu.py` (Mosaic) on TPU; an error elsewhere.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only; no segments/softcap, T == S if causal).
- "splash": JAX's own splash attention kernel (`splash.py`; TPU only), the TPU peer we measure against.
- "splash_interpret": the same splash kernel through Pallas interpret mode (runs anywhere; what CPU tests use).
- "auto": "pallas" on GPU, "xla" elsewhere (TPU too: the Mosaic kernel has only run in interpret mode so far).

Causal alignment when T != S is bottom-right: query i sits at key position i + S - T (KV-cache prefill semantics).
`prefix_len` [B] widens causality to a prefix-LM mask (`reference.py`): "xla", "interpret", "interpret_tpu" and
"pallas" take it (in the kernels' masks and block skipping); "cudnn" and "splash" raise.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.flash_attention import gpu, reference, splash, tpu

IMPLS = ("auto", "xla", "interpret", "interpret_tpu", "pallas", "cudnn", "splash", "splash_interpret")
_KERNELS = {"gpu": gpu, "tpu": tpu}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key block sizes of the Pallas kernels (powers of two >= 16; capped at the padded sequence length)."""

    block_q: int = 128
    block_k: int = 128


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pick_block(requested: int, length: int, name: str) -> int:
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"block_sizes.{name}={requested}: expected a power of two >= 16 (Triton tile rule)")
    return min(requested, max(16, _next_pow2(length)))


def _pad_axis(x, axis: int, new_len: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(kind: str, cfg: gpu.KernelConfig, q_BTHD, k_BSKD, v_BSKD, segs, prefix_B):
    return _KERNELS[kind].flash_forward(q_BTHD, k_BSKD, v_BSKD, segs, cfg, prefix_B)[0]


def _flash_fwd(kind, cfg, q_BTHD, k_BSKD, v_BSKD, segs, prefix_B):
    o_BTHD, lse_BHT = _KERNELS[kind].flash_forward(q_BTHD, k_BSKD, v_BSKD, segs, cfg, prefix_B)
    return o_BTHD, (q_BTHD, k_BSKD, v_BSKD, segs, prefix_B, o_BTHD, lse_BHT)


def _flash_bwd(kind, cfg, res, do_BTHD):
    q_BTHD, k_BSKD, v_BSKD, segs, prefix_B, o_BTHD, lse_BHT = res
    bwd = _KERNELS[kind].flash_backward
    dq_BTHD, dk_BSHD, dv_BSHD = bwd(q_BTHD, k_BSKD, v_BSKD, segs, o_BTHD, lse_BHT, do_BTHD, cfg, prefix_B)
    B, S, K, D = k_BSKD.shape
    G = q_BTHD.shape[2] // K
    # Query heads kh*G .. kh*G+G-1 share kv head kh: reduce their per-head fp32 gradients.
    dk_BSKD = dk_BSHD.reshape(B, S, K, G, D).sum(axis=3).astype(k_BSKD.dtype)
    dv_BSKD = dv_BSHD.reshape(B, S, K, G, D).sum(axis=3).astype(v_BSKD.dtype)
    return dq_BTHD, dk_BSKD, dv_BSKD, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _validate_prefix(prefix_len, B: int, S: int, causal: bool, impl: str):
    """The prefix lengths as int32 [B] clamped to [0, S] (the same mask: positions never reach S), or None."""
    if prefix_len is None:
        return None
    if impl in ("cudnn", "splash", "splash_interpret"):
        raise ValueError(
            f"impl={impl!r} has no prefix-LM mask (prefix_len); use 'pallas' (or 'interpret'/'interpret_tpu'/'xla')"
        )
    if not causal:
        raise ValueError("prefix_len widens a causal mask into a prefix-LM mask; it requires causal=True")
    prefix_len = jnp.asarray(prefix_len)
    if jnp.shape(prefix_len) != (B,) or not jnp.issubdtype(jnp.result_type(prefix_len), jnp.integer):
        raise ValueError(
            f"prefix_len must be integers of shape [B={B}]; got {jnp.result_type(prefix_len)} {jnp.shape(prefix_len)}"
        )
    return jnp.clip(prefix_len, 0, S).astype(jnp.int32)


def _validate(q, k, v, segment_ids, causal, window, softcap, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q [B, T, H, D], k/v [B, S, K, D]; got q{q.shape} k{k.shape} v{v.shape}")
    (B, T, H, D), (Bk, S, K, Dk) = q.shape, k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"k and v must both be [B={B}, S, K, D={D}]; got k{k.shape} v{v.shape}")
    if H % K:
        raise ValueError(f"kv heads K={K} must divide query heads H={H}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q/k/v dtypes must match and be float32/bfloat16/float16; got {q.dtype}/{k.dtype}/{v.dtype}")
    if window is not None:
        if not causal:
            raise ValueError(f"window={window} is a causal sliding window; it requires causal=True")
        if int(window) != window or window < 1:
            raise ValueError(f"window={window}: expected a positive int")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap}: expected a positive float")
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if T != S:
            raise ValueError(
                f"segment_ids [B, T] needs self-attention (T == S); got T={T}, S={S}: pass (q_seg, kv_seg)"
            )
        q_seg = kv_seg = segment_ids
    if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
        raise ValueError(
            f"segment ids must be q [B={B}, T={T}] and kv [B={B}, S={S}]; got {q_seg.shape}, {kv_seg.shape}"
        )
    if not (jnp.issubdtype(q_seg.dtype, jnp.integer) and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
        raise ValueError(f"segment ids must be integers; got {q_seg.dtype}, {kv_seg.dtype}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def flash_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    *,
    causal: bool = True,
    segment_ids: Int[Array, "B T"] | tuple[Int[Array, "B T"], Int[Array, "B S"]] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_sizes: BlockSizes | None = None,
    prefix_len: Int[Array, " B"] | None = None,
) -> Float[Array, "B T H D"]:
    """Multi-/grouped-query attention softmax(q k^T * sm_scale) v with causal/segment/window/prefix masks, softcap.

    q [B, T, H, D]; k, v [B, S, K, D] with K dividing H; segment_ids [B, T] (self-attention) or a (q [B, T],
    kv [B, S]) pair; `window`: each query sees its `window` most recent keys including itself (needs causal);
    `softcap`: scores become softcap * tanh(s / softcap); `prefix_len` [B] (needs causal): a prefix-LM mask, the
    first prefix_len key positions of a row see each other both ways (see `reference.py`).  Rows with no visible key
    return 0.  Output dtype = q dtype.
    """
    segs = _validate(q, k, v, segment_ids, causal, window, softcap, impl)
    B, T, H, D = q.shape
    S = k.shape[1]
    prefix_B = _validate_prefix(prefix_len, B, S, causal, impl)
    sm_scale = D**-0.5 if sm_scale is None else float(sm_scale)
    softcap = None if softcap is None else float(softcap)
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend == "gpu" else "xla"
    if impl == "xla":
        masks = dict(causal=causal, segment_ids=segs, window=window, prefix_len=prefix_B)
        return reference.attention_reference(q, k, v, softcap=softcap, sm_scale=sm_scale, **masks)
    if impl == "cudnn":
        return _cudnn(q, k, v, segs, causal, window, softcap, sm_scale, backend)
    if impl in ("splash", "splash_interpret"):
        if impl == "splash" and backend != "tpu":
            raise ValueError(
                f"impl='splash' needs a TPU backend (this is {backend!r}); use 'splash_interpret' or 'xla'"
            )
        return splash.splash_attention(
            q,
            k,
            v,
            causal=causal,
            segs=segs,
            window=window,
            softcap=softcap,
            sm_scale=sm_scale,
            interpret=impl == "splash_interpret",
        )
    if impl == "pallas" and backend not in ("gpu", "tpu"):
        raise ValueError(f"impl='pallas' needs a GPU or TPU backend (this is {backend!r}); use 'interpret' or 'xla'")
    kind = "tpu" if impl == "interpret_tpu" or (impl == "pallas" and backend == "tpu") else "gpu"

    bs = block_sizes or BlockSizes()
    block_q, block_k = _pick_block(bs.block_q, T, "block_q"), _pick_block(bs.block_k, S, "block_k")
    if impl == "pallas" and kind == "tpu":
        _check_tpu_tiles(block_q, block_k)
    T_pad, S_pad, D_pad = -(-T // block_q) * block_q, -(-S // block_k) * block_k, max(16, _next_pow2(D))
    # Zero-padding D leaves q.k and the first D output columns unchanged; padded rows/keys are masked in-kernel.
    q_p = _pad_axis(_pad_axis(q, 1, T_pad), 3, D_pad)
    k_p = _pad_axis(_pad_axis(k, 1, S_pad), 3, D_pad)
    v_p = _pad_axis(_pad_axis(v, 1, S_pad), 3, D_pad)
    if segs is not None:
        segs = (_pad_axis(segs[0], 1, T_pad, -1), _pad_axis(segs[1], 1, S_pad, -2))
    cfg = gpu.KernelConfig(
        sm_scale=sm_scale,
        causal=bool(causal),
        window=None if window is None else int(window),
        softcap=softcap,
        block_q=block_q,
        block_k=block_k,
        q_offset=S - T,
        kv_len=S,
        has_segments=segs is not None,
        interpret=impl != "pallas",
        has_prefix=prefix_B is not None,
    )
    return _flash(kind, cfg, q_p, k_p, v_p, segs, prefix_B)[:, :T, :, :D]


def _check_tpu_tiles(block_q: int, block_k: int):
    """Mosaic tiling: a block's last two dims are multiples of (8, 128) or the full dims (head dim D is always full)."""
    if block_q % 8 or block_k % 128:
        raise ValueError(
            f"TPU kernel needs block_q % 8 == 0 and block_k % 128 == 0 (kv segment ids sit on lanes); got "
            f"block_q={block_q}, block_k={block_k} (blocks are capped at the padded lengths): use BlockSizes(128, 128) "
            "and sequences of at least 128"
        )


def _cudnn(q, k, v, segs, causal, window, softcap, sm_scale, backend):
    if backend != "gpu":
        raise ValueError(f"impl='cudnn' needs a GPU backend (this is {backend!r}); use 'xla', 'interpret' or 'auto'")
    if segs is not None or softcap is not None:
        raise ValueError("impl='cudnn' does not support segment_ids or softcap here; use impl='pallas'")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("impl='cudnn' with causal=True needs T == S (its causal mask is top-left aligned)")
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=sm_scale, is_causal=causal, local_window_size=local, implementation="cudnn"
    )
