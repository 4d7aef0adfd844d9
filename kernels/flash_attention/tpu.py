"""Flash attention forward and backward as Pallas kernels in the TPU (Mosaic) style; tested in TPU interpret mode.

Dimension letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K, D head dim.
Block letters: Q = block_q rows of queries, C = block_k columns of keys.

Unlike `gpu.py` (one program per q block with an in-kernel loop), the kv loop is the innermost, "arbitrary" grid
axis and the online-softmax state lives in VMEM scratch (m, l: [Q, 1] fp32; acc: [Q, D] fp32), initialised at the
first kv step and written out at the last.  Fully masked blocks are skipped twice over: their compute is guarded by
`pl.when`, and the kv index map clamps the block index into the visible range, so a skipped step re-uses the block
already in VMEM and issues no DMA.  Arrays use the [B, H, T, D] layout (last two block dims (Q, D) as Mosaic wants);
segment ids are [B, T, 1] (q) and [B, 1, S] (kv) so every block's last two dims are legal on TPU.
The mask and score maths (`gpu.block_mask`, `gpu.probs_and_dscores`, block ranges) are shared with `gpu.py`.
The backward mirrors it: dq with grid (B, H, T/Q, S/C) and dk/dv with grid (B, H, S/C, T/Q), per query head (fp32),
summed over the G query heads of a kv head by `api.py`.
A prefix-LM mask (`has_prefix`) scalar-prefetches the prefix lengths [B] into SMEM: the index maps read the row's P
to clamp into the widened block ranges, and the kernels read it for the mask (the first ref of every kernel).
NOT yet run on a TPU: the layout rules are validated by `api.py`, but Mosaic compilation is untested here.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.flash_attention import gpu
from kernels.flash_attention.gpu import KernelConfig, kv_block_range, q_block_range


def _clamp(idx, lo, hi):
    """Block index clamped into [lo, hi - 1] (into lo when the range is empty): skipped steps fetch nothing new."""
    return jnp.maximum(jnp.minimum(idx, hi - 1), lo)


def _interpret(cfg: KernelConfig):
    if not cfg.interpret:
        return False
    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def _segs(refs, has_segments):
    """(q_seg [Q], kv_seg [C]) from the [Q, 1] and [1, C] blocks, or (None, None)."""
    if not has_segments:
        return None, None
    return refs[0][...][:, 0], refs[1][...][0, :]


def _prefix(refs, cfg: KernelConfig):
    """(this row's prefix length or None, the remaining refs): the scalar-prefetched lengths come first."""
    if not cfg.has_prefix:
        return None, refs
    return refs[0][pl.program_id(0)], refs[1:]


def _prefix_of(b, pref):
    """Row b's prefix length inside an index map (`pref`: the scalar-prefetch refs, empty without a prefix)."""
    return pref[0][b] if pref else None


def _pallas_call(kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes, cfg: KernelConfig, name, prefix_B):
    """pallas_call over TPU grids whose last axis is sequential; with a prefix, the lengths are scalar-prefetched."""
    common = dict(
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(cfg),
        name=name,
    )
    if prefix_B is None:
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch_shapes, **common
        )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch_shapes
    )
    return functools.partial(pl.pallas_call(kernel, grid_spec=grid_spec, **common), prefix_B)


def _fwd_kernel(*refs, cfg: KernelConfig, nk: int):
    prefix, refs = _prefix(refs, cfg)
    n_seg = 2 if cfg.has_segments else 0
    q_ref, k_ref, v_ref = refs[:3]
    seg_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[3 : 3 + n_seg], refs[3 + n_seg :]
    i, j = pl.program_id(2), pl.program_id(3)
    lo, hi = kv_block_range(i, cfg, nk, prefix)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, gpu.NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        s_QC, _ = gpu.scores(q_ref[...], k_ref[...], cfg)
        mask_QC = gpu.block_mask(i * cfg.block_q, j * cfg.block_k, *_segs(seg_refs, cfg.has_segments), cfg, prefix)
        if mask_QC is not None:
            s_QC = jnp.where(mask_QC, s_QC, gpu.NEG)
        m_Q1 = m_ref[...]
        m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QC, axis=1, keepdims=True))
        alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
        p_QC = jnp.exp(s_QC - m_new_Q1)
        if mask_QC is not None:
            p_QC = jnp.where(mask_QC, p_QC, 0.0)
        l_ref[...] = alpha_Q1 * l_ref[...] + jnp.sum(p_QC, axis=1, keepdims=True)
        acc_ref[...] = alpha_Q1 * acc_ref[...] + gpu.dot(p_QC.astype(v_ref.dtype), v_ref[...])
        m_ref[...] = m_new_Q1

    @pl.when(j == nk - 1)
    def _finish():
        l_Q1 = l_ref[...]
        empty_Q1 = l_Q1 == 0.0
        l_safe_Q1 = jnp.where(empty_Q1, 1.0, l_Q1)
        o_ref[...] = (acc_ref[...] / l_safe_Q1).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty_Q1, jnp.inf, m_ref[...] + jnp.log(l_safe_Q1))


def _to_bhtd(x_BTHD):
    return jnp.swapaxes(x_BTHD, 1, 2)


def _seg_inputs(segs):
    if segs is None:
        return ()
    q_seg_BT, kv_seg_BS = segs
    return q_seg_BT[:, :, None], kv_seg_BS[:, None, :]


def flash_forward(q_BTHD, k_BSKD, v_BSKD, segs, cfg: KernelConfig, prefix_B=None):
    """Forward kernel on padded inputs: returns (o [B, T, H, D], lse [B, H, T] fp32); `prefix_B` [B] int32 when
    `cfg.has_prefix`."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G, Q, C, nq, nk = H // K, cfg.block_q, cfg.block_k, T // cfg.block_q, S // cfg.block_k

    # Index maps take the scalar-prefetch refs after the grid indices when there is a prefix (`pref`).
    def kv_map(b, h, i, j, *pref):
        lo, hi = kv_block_range(i, cfg, nk, _prefix_of(b, pref))
        return b, h // G, _clamp(j, lo, hi), 0

    def kv_seg_map(b, h, i, j, *pref):
        return b, 0, kv_map(b, h, i, j, *pref)[2]

    q_spec = pl.BlockSpec((None, None, Q, D), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, C, D), kv_map)
    seg_specs = []
    if cfg.has_segments:
        seg_specs = [
            pl.BlockSpec((None, Q, 1), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 1, C), kv_seg_map),
        ]
    o_BHTD, lse_BHT1 = _pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid=(B, H, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, Q, 1), lambda b, h, i, j, *_: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, D), q_BTHD.dtype), jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32)],
        scratch_shapes=[
            pltpu.VMEM((Q, 1), jnp.float32),
            pltpu.VMEM((Q, 1), jnp.float32),
            pltpu.VMEM((Q, D), jnp.float32),
        ],
        cfg=cfg,
        name="flash_attention_fwd_tpu",
        prefix_B=prefix_B,
    )(_to_bhtd(q_BTHD), _to_bhtd(k_BSKD), _to_bhtd(v_BSKD), *_seg_inputs(segs))
    return _to_bhtd(o_BHTD), lse_BHT1[..., 0]


def _dq_kernel(*refs, cfg: KernelConfig, nk: int):
    prefix, refs = _prefix(refs, cfg)
    n_seg = 2 if cfg.has_segments else 0
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    seg_refs, (dq_ref, dq_acc_ref) = refs[6 : 6 + n_seg], refs[6 + n_seg :]
    i, j = pl.program_id(2), pl.program_id(3)
    lo, hi = kv_block_range(i, cfg, nk, prefix)

    @pl.when(j == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        mask_QC = gpu.block_mask(i * cfg.block_q, j * cfg.block_k, *_segs(seg_refs, cfg.has_segments), cfg, prefix)
        k_CD = k_ref[...]
        _, ds_QC = gpu.probs_and_dscores(
            q_ref[...], k_CD, v_ref[...], do_ref[...], lse_ref[...][:, 0], delta_ref[...][:, 0], mask_QC, cfg
        )
        dq_acc_ref[...] += gpu.dot(ds_QC.astype(k_CD.dtype), k_CD)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: KernelConfig, nq: int):
    prefix, refs = _prefix(refs, cfg)
    n_seg = 2 if cfg.has_segments else 0
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    seg_refs, (dk_ref, dv_ref, dk_acc_ref, dv_acc_ref) = refs[6 : 6 + n_seg], refs[6 + n_seg :]
    j, i = pl.program_id(2), pl.program_id(3)
    lo, hi = q_block_range(j, cfg, nq, prefix)

    @pl.when(i == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        mask_QC = gpu.block_mask(i * cfg.block_q, j * cfg.block_k, *_segs(seg_refs, cfg.has_segments), cfg, prefix)
        q_QD, do_QD = q_ref[...], do_ref[...]
        p_QC, ds_QC = gpu.probs_and_dscores(
            q_QD, k_ref[...], v_ref[...], do_QD, lse_ref[...][:, 0], delta_ref[...][:, 0], mask_QC, cfg
        )
        dv_acc_ref[...] += gpu.dot_tn(p_QC.astype(do_QD.dtype), do_QD)
        dk_acc_ref[...] += gpu.dot_tn(ds_QC.astype(q_QD.dtype), q_QD)

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[...] = dk_acc_ref[...] * cfg.sm_scale
        dv_ref[...] = dv_acc_ref[...]


def flash_backward(q_BTHD, k_BSKD, v_BSKD, segs, o_BTHD, lse_BHT, do_BTHD, cfg: KernelConfig, prefix_B=None):
    """Backward kernels on padded inputs: returns dq [B, T, H, D] and per-query-head fp32 dk, dv [B, S, H, D]."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G, Q, C, nq, nk = H // K, cfg.block_q, cfg.block_k, T // cfg.block_q, S // cfg.block_k
    delta_BHT1 = jnp.einsum("bthd,bthd->bht", o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))[..., None]
    args = (*(_to_bhtd(x) for x in (q_BTHD, k_BSKD, v_BSKD, do_BTHD)), lse_BHT[..., None], delta_BHT1)
    args = (*args, *_seg_inputs(segs))

    # dq: grid (B, H, q block i, kv block j); kv blocks outside the visible range are clamped (no new DMA).
    def kv_map(b, h, i, j, *pref):
        return b, h // G, _clamp(j, *kv_block_range(i, cfg, nk, _prefix_of(b, pref))), 0

    q_blk = pl.BlockSpec((None, None, Q, D), lambda b, h, i, j, *_: (b, h, i, 0))
    row_blk = pl.BlockSpec((None, None, Q, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    seg_specs = []
    if cfg.has_segments:
        seg_specs = [
            pl.BlockSpec((None, Q, 1), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 1, C), lambda b, h, i, j, *pref: (b, 0, kv_map(b, h, i, j, *pref)[2])),
        ]
    kv_blk = pl.BlockSpec((None, None, C, D), kv_map)
    dq_BHTD = _pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid=(B, H, nq, nk),
        in_specs=[q_blk, kv_blk, kv_blk, q_blk, row_blk, row_blk, *seg_specs],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct((B, H, T, D), q_BTHD.dtype),
        scratch_shapes=[pltpu.VMEM((Q, D), jnp.float32)],
        cfg=cfg,
        name="flash_attention_dq_tpu",
        prefix_B=prefix_B,
    )(*args)

    # dk/dv: grid (B, H, kv block j, q block i), per query head.
    def q_map(b, h, j, i, *pref):
        return b, h, _clamp(i, *q_block_range(j, cfg, nq, _prefix_of(b, pref))), 0

    q_blk = pl.BlockSpec((None, None, Q, D), q_map)
    row_blk = pl.BlockSpec((None, None, Q, 1), q_map)
    kv_blk = pl.BlockSpec((None, None, C, D), lambda b, h, j, i, *_: (b, h // G, j, 0))
    seg_specs = []
    if cfg.has_segments:
        seg_specs = [
            pl.BlockSpec((None, Q, 1), lambda b, h, j, i, *pref: (b, q_map(b, h, j, i, *pref)[2], 0)),
            pl.BlockSpec((None, 1, C), lambda b, h, j, i, *_: (b, 0, j)),
        ]
    dkv_blk = pl.BlockSpec((None, None, C, D), lambda b, h, j, i, *_: (b, h, j, 0))
    dkv_shape = jax.ShapeDtypeStruct((B, H, S, D), jnp.float32)
    dk_BHSD, dv_BHSD = _pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq),
        grid=(B, H, nk, nq),
        in_specs=[q_blk, kv_blk, kv_blk, q_blk, row_blk, row_blk, *seg_specs],
        out_specs=[dkv_blk, dkv_blk],
        out_shape=[dkv_shape, dkv_shape],
        scratch_shapes=[pltpu.VMEM((C, D), jnp.float32), pltpu.VMEM((C, D), jnp.float32)],
        cfg=cfg,
        name="flash_attention_dkv_tpu",
        prefix_B=prefix_B,
    )(*args)
    return _to_bhtd(dq_BHTD), _to_bhtd(dk_BHSD), _to_bhtd(dv_BHSD)
