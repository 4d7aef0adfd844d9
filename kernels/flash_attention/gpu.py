"""Flash attention forward and backward as Pallas kernels in the GPU (Triton) style; CPU-interpretable.

Dimension letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K, D head dim.
Block letters: Q = block_q rows of queries, C = block_k columns of keys.

Layout: every kernel sees arrays already padded by `api.py` (T, S to block multiples, D to a power of two >= 16).
- forward: grid (B, H, T/Q); each program keeps its q block resident and loops over kv blocks with an online softmax
  (fp32 running max, sum and accumulator), writing o and the log-sum-exp (LSE, [B, H, T] fp32) for the backward.
- dq: grid (B, H, T/Q), loops over kv blocks.  dk/dv: grid (B, H, S/C), loops over q blocks and writes fp32 dk, dv
  PER QUERY HEAD ([B, S, H, D]); `api.py` sums the G query heads sharing a kv head.  This costs G x the dk/dv memory
  but keeps each program free of cross-program reductions (no atomics), which is the simplest correct GQA design.
GQA never repeats K/V: query head h reads kv head h // G through the BlockSpec index maps.
Fully masked kv (or q) blocks are skipped via loop bounds computed from the block index (`kv_block_range`,
`q_block_range`), not merely masked.  Masking semantics are those of `reference.mask_TS`.
A prefix-LM mask (`has_prefix`) passes the per-row prefix lengths [B] whole; each program reads its row's P and
widens both the in-block mask and the loop bounds: a q block holding a prefix query also visits the kv blocks of
the prefix ahead of it, and a kv block inside the prefix is visited by every q block holding a prefix query.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -1e30  # finite "minus infinity": keeps max/exp arithmetic NaN-free on fully masked rows


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel parameters (hashable: used as a custom_vjp nondiff argument)."""

    sm_scale: float
    causal: bool
    window: int | None
    softcap: float | None
    block_q: int
    block_k: int
    q_offset: int  # S - T of the unpadded lengths: query row i sits at key position i + q_offset
    kv_len: int  # unpadded S; keys at or beyond it are padding and masked
    has_segments: bool
    interpret: bool
    has_prefix: bool = False  # a [B] int32 prefix length per row follows the segment ids among the inputs


def dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a.T @ b with fp32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def kv_block_range(q_block, cfg: KernelConfig, num_kv_blocks: int, prefix=None):
    """[lo, hi) of kv blocks a q block can see; blocks outside are fully masked by causality/window/prefix.

    `prefix`: this row's prefix length P (a traced scalar) under a prefix-LM mask. A block whose first query sits in
    the prefix sees keys up to P - 1 (ahead of it too); the window's lower bound is unchanged (it bounds keys behind).
    """
    lo, hi = 0, num_kv_blocks
    if cfg.causal:
        first_pos = q_block * cfg.block_q + cfg.q_offset
        end_key = jnp.maximum(first_pos + cfg.block_q, 0)  # exclusive bound on visible keys
        if prefix is not None:
            end_key = jnp.where(first_pos < prefix, jnp.maximum(end_key, prefix), end_key)
        hi = jnp.minimum(lax.div(end_key + cfg.block_k - 1, cfg.block_k), num_kv_blocks)
        if cfg.window is not None:
            lo = lax.div(jnp.maximum(first_pos - cfg.window + 1, 0), cfg.block_k)
    return lo, hi


def q_block_range(kv_block, cfg: KernelConfig, num_q_blocks: int, prefix=None):
    """[lo, hi) of q blocks that can see a kv block (`prefix` as in `kv_block_range`).

    A kv block starting inside the prefix is also seen by the first query row when that row is in the prefix (and,
    under a window, no more than window - 1 positions past the block's last key): the range then starts at block 0.
    Its end does not move: a prefix query past the causal range would have to look further back than the window.
    """
    lo, hi = 0, num_q_blocks
    if cfg.causal:
        first_key = kv_block * cfg.block_k
        lo = lax.div(jnp.maximum(first_key - cfg.q_offset, 0), cfg.block_q)
        if prefix is not None:
            seen = (first_key < prefix) & (cfg.q_offset < prefix)
            if cfg.window is not None:
                seen = seen & (cfg.q_offset < first_key + cfg.block_k - 1 + cfg.window)
            lo = jnp.where(seen, 0, lo)
        if cfg.window is not None:
            end_row = jnp.maximum(first_key + cfg.block_k - 1 + cfg.window - cfg.q_offset, 0)  # exclusive
            hi = jnp.minimum(lax.div(end_row + cfg.block_q - 1, cfg.block_q), num_q_blocks)
    return lo, hi


def block_mask(q_start, k_start, q_seg_Q, kv_seg_C, cfg: KernelConfig, prefix=None):
    """[Q, C] visibility of a (q block, kv block) pair, or None when nothing can be masked; `prefix`: the row's
    prefix length under a prefix-LM mask."""
    shape = (cfg.block_q, cfg.block_k)
    rows_QC = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols_QC = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = None

    def _and(a, b):
        return b if a is None else a & b

    if cfg.kv_len % cfg.block_k:
        mask = _and(mask, cols_QC < cfg.kv_len)
    if cfg.causal:
        pos_QC = rows_QC + cfg.q_offset
        causal_QC = cols_QC <= pos_QC
        if prefix is not None:
            causal_QC = causal_QC | ((pos_QC < prefix) & (cols_QC < prefix))
        mask = _and(mask, causal_QC)
        if cfg.window is not None:
            mask = _and(mask, cols_QC > pos_QC - cfg.window)
    if cfg.has_segments:
        mask = _and(mask, q_seg_Q[:, None] == kv_seg_C[None, :])
    return mask


def scores(q_QD, k_CD, cfg: KernelConfig):
    """Scaled (and softcapped) fp32 scores, plus tanh(s/softcap) for the softcap gradient."""
    s_QC = dot_nt(q_QD, k_CD) * cfg.sm_scale
    if cfg.softcap is None:
        return s_QC, None
    t_QC = jnp.tanh(s_QC / cfg.softcap)
    return cfg.softcap * t_QC, t_QC


def _split_refs(refs, n_in, cfg: KernelConfig):
    """(inputs, q_seg_ref, kv_seg_ref, this row's prefix length or None, outputs) from a kernel's refs."""
    ins, rest = refs[:n_in], refs[n_in:]
    q_seg_ref = kv_seg_ref = prefix = None
    if cfg.has_segments:
        (q_seg_ref, kv_seg_ref), rest = rest[:2], rest[2:]
    if cfg.has_prefix:
        prefix, rest = rest[0][pl.program_id(0)], rest[1:]
    return ins, q_seg_ref, kv_seg_ref, prefix, rest


def _fwd_kernel(*refs, cfg: KernelConfig, num_kv_blocks: int):
    (q_ref, k_ref, v_ref), q_seg_ref, kv_seg_ref, prefix, (o_ref, lse_ref) = _split_refs(refs, 3, cfg)
    q_block = pl.program_id(2)
    q_QD = q_ref[...]
    q_seg_Q = q_seg_ref[...] if cfg.has_segments else None
    Q, D = q_QD.shape

    def body(j, carry):
        acc_QD, m_Q, l_Q = carry
        k_slice = pl.ds(j * cfg.block_k, cfg.block_k)
        s_QC, _ = scores(q_QD, k_ref[k_slice, :], cfg)
        kv_seg_C = kv_seg_ref[k_slice] if cfg.has_segments else None
        mask_QC = block_mask(q_block * cfg.block_q, j * cfg.block_k, q_seg_Q, kv_seg_C, cfg, prefix)
        if mask_QC is not None:
            s_QC = jnp.where(mask_QC, s_QC, NEG)
        m_new_Q = jnp.maximum(m_Q, jnp.max(s_QC, axis=1))
        alpha_Q = jnp.exp(m_Q - m_new_Q)
        p_QC = jnp.exp(s_QC - m_new_Q[:, None])
        if mask_QC is not None:
            p_QC = jnp.where(mask_QC, p_QC, 0.0)
        l_new_Q = alpha_Q * l_Q + jnp.sum(p_QC, axis=1)
        v_CD = v_ref[k_slice, :]
        acc_QD = alpha_Q[:, None] * acc_QD + dot(p_QC.astype(v_CD.dtype), v_CD)
        return acc_QD, m_new_Q, l_new_Q

    lo, hi = kv_block_range(q_block, cfg, num_kv_blocks, prefix)
    init = (jnp.zeros((Q, D), jnp.float32), jnp.full((Q,), NEG, jnp.float32), jnp.zeros((Q,), jnp.float32))
    acc_QD, m_Q, l_Q = lax.fori_loop(lo, hi, body, init)
    empty_Q = l_Q == 0.0  # no visible key: output 0, LSE +inf so the backward's p = exp(s - LSE) is 0
    l_safe_Q = jnp.where(empty_Q, 1.0, l_Q)
    o_ref[...] = (acc_QD / l_safe_Q[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty_Q, jnp.inf, m_Q + jnp.log(l_safe_Q))


def probs_and_dscores(q_QD, k_CD, v_CD, do_QD, lse_Q, delta_Q, mask_QC, cfg: KernelConfig):
    """Recomputed probabilities p and dL/d(raw scaled scores) for one block pair."""
    s_QC, t_QC = scores(q_QD, k_CD, cfg)
    p_QC = jnp.exp(s_QC - lse_Q[:, None])
    if mask_QC is not None:
        p_QC = jnp.where(mask_QC, p_QC, 0.0)
    dp_QC = dot_nt(do_QD, v_CD)
    ds_QC = p_QC * (dp_QC - delta_Q[:, None])
    if t_QC is not None:
        ds_QC = ds_QC * (1.0 - t_QC * t_QC)  # d/ds [c tanh(s/c)] = 1 - tanh^2(s/c)
    return p_QC, ds_QC


def _dq_kernel(*refs, cfg: KernelConfig, num_kv_blocks: int):
    ins, q_seg_ref, kv_seg_ref, prefix, (dq_ref,) = _split_refs(refs, 6, cfg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    q_block = pl.program_id(2)
    q_QD, do_QD, lse_Q, delta_Q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg_Q = q_seg_ref[...] if cfg.has_segments else None

    def body(j, dq_QD):
        k_slice = pl.ds(j * cfg.block_k, cfg.block_k)
        k_CD = k_ref[k_slice, :]
        kv_seg_C = kv_seg_ref[k_slice] if cfg.has_segments else None
        mask_QC = block_mask(q_block * cfg.block_q, j * cfg.block_k, q_seg_Q, kv_seg_C, cfg, prefix)
        _, ds_QC = probs_and_dscores(q_QD, k_CD, v_ref[k_slice, :], do_QD, lse_Q, delta_Q, mask_QC, cfg)
        return dq_QD + dot(ds_QC.astype(k_CD.dtype), k_CD)

    lo, hi = kv_block_range(q_block, cfg, num_kv_blocks, prefix)
    dq_QD = lax.fori_loop(lo, hi, body, jnp.zeros(q_QD.shape, jnp.float32))
    dq_ref[...] = (dq_QD * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: KernelConfig, num_q_blocks: int):
    ins, q_seg_ref, kv_seg_ref, prefix, (dk_ref, dv_ref) = _split_refs(refs, 6, cfg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    kv_block = pl.program_id(2)
    k_CD, v_CD = k_ref[...], v_ref[...]
    kv_seg_C = kv_seg_ref[...] if cfg.has_segments else None

    def body(i, carry):
        dk_CD, dv_CD = carry
        q_slice = pl.ds(i * cfg.block_q, cfg.block_q)
        q_QD, do_QD = q_ref[q_slice, :], do_ref[q_slice, :]
        q_seg_Q = q_seg_ref[q_slice] if cfg.has_segments else None
        mask_QC = block_mask(i * cfg.block_q, kv_block * cfg.block_k, q_seg_Q, kv_seg_C, cfg, prefix)
        p_QC, ds_QC = probs_and_dscores(q_QD, k_CD, v_CD, do_QD, lse_ref[q_slice], delta_ref[q_slice], mask_QC, cfg)
        dv_CD = dv_CD + dot_tn(p_QC.astype(do_QD.dtype), do_QD)
        dk_CD = dk_CD + dot_tn(ds_QC.astype(q_QD.dtype), q_QD)
        return dk_CD, dv_CD

    lo, hi = q_block_range(kv_block, cfg, num_q_blocks, prefix)
    zeros_CD = jnp.zeros(k_CD.shape, jnp.float32)
    dk_CD, dv_CD = lax.fori_loop(lo, hi, body, (zeros_CD, zeros_CD))
    dk_ref[...] = (dk_CD * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CD.astype(dv_ref.dtype)


def _compiler_params(cfg: KernelConfig, D: int):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # deprecated lowering, imported only when compiling

    return plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2)


def _seg_specs(cfg: KernelConfig, q_block: int | None, kv_block: int | None, T: int, S: int):
    """BlockSpecs for (q_seg [B, T], kv_seg [B, S]) (a None block size means the whole sequence), then the prefix
    lengths [B] (whole: each program reads its row's entry)."""
    specs = []
    if cfg.has_segments and q_block is None:
        q_all, kv_blk = (None, T), (None, kv_block)
        specs = [pl.BlockSpec(q_all, lambda b, h, j: (b, 0)), pl.BlockSpec(kv_blk, lambda b, h, j: (b, j))]
    elif cfg.has_segments:
        specs = [pl.BlockSpec((None, q_block), lambda b, h, i: (b, i)), pl.BlockSpec((None, S), lambda b, h, i: (b, 0))]
    return specs + ([pl.no_block_spec] if cfg.has_prefix else [])


def _mask_inputs(segs, prefix_B):
    return (*(segs or ()), *(() if prefix_B is None else (prefix_B,)))


def flash_forward(q_BTHD, k_BSKD, v_BSKD, segs, cfg: KernelConfig, prefix_B=None):
    """Forward kernel on padded inputs: returns (o [B, T, H, D], lse [B, H, T] fp32); `prefix_B` [B] int32 when
    `cfg.has_prefix`."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G, Q = H // K, cfg.block_q
    q_spec = pl.BlockSpec((None, Q, None, D), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0))
    o_BTHD, lse_BHT = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, num_kv_blocks=S // cfg.block_k),
        grid=(B, H, T // Q),
        in_specs=[q_spec, kv_spec, kv_spec, *_seg_specs(cfg, Q, None, T, S)],
        out_specs=[q_spec, pl.BlockSpec((None, None, Q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, D),
        name="flash_attention_fwd",
    )(q_BTHD, k_BSKD, v_BSKD, *_mask_inputs(segs, prefix_B))
    return o_BTHD, lse_BHT


def flash_backward(q_BTHD, k_BSKD, v_BSKD, segs, o_BTHD, lse_BHT, do_BTHD, cfg: KernelConfig, prefix_B=None):
    """Backward kernels on padded inputs: returns dq [B, T, H, D] and per-query-head fp32 dk, dv [B, S, H, D]."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G, Q, C = H // K, cfg.block_q, cfg.block_k
    delta_BHT = jnp.einsum("bthd,bthd->bht", o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))
    args = (q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT, *_mask_inputs(segs, prefix_B))

    q_blk = pl.BlockSpec((None, Q, None, D), lambda b, h, i: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0))
    row_blk = pl.BlockSpec((None, None, Q), lambda b, h, i: (b, h, i))
    dq_BTHD = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_kv_blocks=S // C),
        grid=(B, H, T // Q),
        in_specs=[q_blk, kv_all, kv_all, q_blk, row_blk, row_blk, *_seg_specs(cfg, Q, None, T, S)],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, D),
        name="flash_attention_dq",
    )(*args)

    q_all = pl.BlockSpec((None, T, None, D), lambda b, h, j: (b, 0, h, 0))
    kv_blk = pl.BlockSpec((None, C, None, D), lambda b, h, j: (b, j, h // G, 0))
    row_all = pl.BlockSpec((None, None, T), lambda b, h, j: (b, h, 0))
    dkv_blk = pl.BlockSpec((None, C, None, D), lambda b, h, j: (b, j, h, 0))
    dkv_shape = jax.ShapeDtypeStruct((B, S, H, D), jnp.float32)
    dk_BSHD, dv_BSHD = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, num_q_blocks=T // Q),
        grid=(B, H, S // C),
        in_specs=[q_all, kv_blk, kv_blk, q_all, row_all, row_all, *_seg_specs(cfg, None, C, T, S)],
        out_specs=[dkv_blk, dkv_blk],
        out_shape=[dkv_shape, dkv_shape],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, D),
        name="flash_attention_dkv",
    )(*args)
    return dq_BTHD, dk_BSHD, dv_BSHD
