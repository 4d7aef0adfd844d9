"""Paged decode attention as a Pallas kernel in the TPU (Mosaic) style; tested in TPU interpret mode.

Grid (B, N) with the page axis innermost ("arbitrary"). `lengths` and the page table are scalar-prefetched into SMEM
so the kv index maps can read them: step i of sequence b fetches page `page_table[b, i]` — the block index is clamped
to the sequence's last page, so steps past the length re-use the block already in VMEM (no DMA) and their compute is
skipped by `pl.when`. A block holds one page for all K kv heads ([C, K, D]: the last two dims are full, which Mosaic's
tiling accepts for any K, D); the kernel loops over kv heads statically, each folding the page into the online-softmax
state of its G query heads (VMEM scratch m, l: [K, G, 1], acc: [K, G, D], fp32). int8 pages arrive with their
[C, K] scales (C a multiple of 8, checked by `api.py`) and are dequantised in VMEM.
NOT yet compiled on a TPU here: only TPU interpret mode has run it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.dce import droppable
from kernels.decode_attention.common import NEG, DecodeConfig, dequant, finish, page_update


def _kernel(lens_ref, pt_ref, q_ref, k_ref, v_ref, *rest, cfg: DecodeConfig):
    if cfg.quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref, acc_ref = rest
    else:
        (o_ref, m_ref, l_ref, acc_ref), ks_ref, vs_ref = rest, None, None
    b, i = pl.program_id(0), pl.program_id(1)
    C, K = cfg.page_size, q_ref.shape[0]
    length = jnp.minimum(lens_ref[b], cfg.pages_per_seq * C)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i * C < length)
    def _page():
        for kh in range(K):
            k_CD = dequant(k_ref[:, kh, :], None if ks_ref is None else ks_ref[:, kh])
            v_CD = dequant(v_ref[:, kh, :], None if vs_ref is None else vs_ref[:, kh])
            q_GD = q_ref[kh].astype(jnp.float32)
            m, l, acc = page_update(
                q_GD, k_CD, v_CD, i * C, length, m_ref[kh], l_ref[kh], acc_ref[kh], cfg, use_dot=True
            )
            m_ref[kh], l_ref[kh], acc_ref[kh] = m, l, acc

    @pl.when(i == pl.num_programs(1) - 1)
    def _out():
        o_ref[...] = finish(l_ref[...], acc_ref[...]).astype(o_ref.dtype)


@droppable("cfg")
def paged_decode(q_BKGD, k_pages, v_pages, k_scales, v_scales, page_table_BN, lengths_B, cfg: DecodeConfig):
    """q [B, K, G, D]; pages [P, C, K, D] (+ scales [P, C, K] when quantised) -> o [B, K, G, D]."""
    B, K, G, D = q_BKGD.shape
    C, N = cfg.page_size, cfg.pages_per_seq

    def page_of(b, i, lens, pt):
        last = jnp.maximum((jnp.minimum(lens[b], N * C) + C - 1) // C - 1, 0)
        return pt[b, jnp.minimum(i, last)]

    q_spec = pl.BlockSpec((None, K, G, D), lambda b, i, lens, pt: (b, 0, 0, 0))
    kv_spec = pl.BlockSpec((None, C, K, D), lambda b, i, lens, pt: (page_of(b, i, lens, pt), 0, 0, 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q_BKGD, k_pages, v_pages]
    if cfg.quantized:
        scale_spec = pl.BlockSpec((None, C, K), lambda b, i, lens, pt: (page_of(b, i, lens, pt), 0, 0))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales, v_scales]
    interpret = (
        pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan") if cfg.interpret else False
    )
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, N),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((K, G, 1), jnp.float32),
                pltpu.VMEM((K, G, 1), jnp.float32),
                pltpu.VMEM((K, G, D), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q_BKGD.shape, q_BKGD.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(lengths_B, page_table_BN, *args)
