"""Paged decode attention as a Pallas kernel in the GPU (Triton) style; CPU-interpretable.

Grid (B, K): one program per (sequence, kv head). It keeps the G query heads that share the kv head resident and loops
over the sequence's ceil(length / C) pages only (a dynamic trip count: pages past the length are never touched),
reading each page's index from the page table and its [C, D] keys/values for this kv head straight from the pool.
GQA costs no extra reads: the page is loaded once for all G heads. int8 pages are dequantised in registers.
NOT yet compiled on a GPU here (no GPU in this environment); the Triton shape rules are checked by `api.py`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.dce import droppable
from kernels.decode_attention.common import NEG, DecodeConfig, dequant, finish, page_update


def _kernel(lens_ref, pt_ref, q_ref, k_ref, v_ref, *rest, cfg: DecodeConfig):
    if cfg.quantized:
        ks_ref, vs_ref, o_ref = rest
    else:
        (o_ref,), ks_ref, vs_ref = rest, None, None
    b, kh = pl.program_id(0), pl.program_id(1)
    C = cfg.page_size
    length = jnp.minimum(lens_ref[b], cfg.pages_per_seq * C)
    q_GD = q_ref[...].astype(jnp.float32)
    G, D = q_GD.shape

    def body(i, carry):
        page = pt_ref[b, i]
        k_CD = dequant(k_ref[page, :, kh, :], None if ks_ref is None else ks_ref[page, :, kh])
        v_CD = dequant(v_ref[page, :, kh, :], None if vs_ref is None else vs_ref[page, :, kh])
        return page_update(q_GD, k_CD, v_CD, i * C, length, *carry, cfg, use_dot=G >= 16)

    init = (jnp.full((G, 1), NEG, jnp.float32), jnp.zeros((G, 1), jnp.float32), jnp.zeros((G, D), jnp.float32))
    # A sliding window starts at the page holding position length - window: earlier pages are never read.
    first = 0 if cfg.window is None else jnp.maximum(length - cfg.window, 0) // C
    _, l_G1, acc_GD = jax.lax.fori_loop(first, (length + C - 1) // C, body, init)
    o_ref[...] = finish(l_G1, acc_GD).astype(o_ref.dtype)


@droppable("cfg")
def paged_decode(q_BKGD, k_pages, v_pages, k_scales, v_scales, page_table_BN, lengths_B, cfg: DecodeConfig):
    """q [B, K, G, D]; pages [P, C, K, D] (+ scales [P, C, K] when quantised) -> o [B, K, G, D]."""
    B, K, G, D = q_BKGD.shape
    q_spec = pl.BlockSpec((None, None, G, D), lambda b, h: (b, h, 0, 0))
    args = [lengths_B, page_table_BN, q_BKGD, k_pages, v_pages]
    whole = pl.no_block_spec  # the whole array, indexed inside the kernel
    in_specs = [whole, whole, q_spec, whole, whole]
    if cfg.quantized:
        args += [k_scales, v_scales]
        in_specs += [whole, whole]
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(B, K),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BKGD.shape, q_BKGD.dtype),
        interpret=cfg.interpret,
    )(*args)
