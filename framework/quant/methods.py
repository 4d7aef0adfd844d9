"""Post-training quantisation of a Lumen LM's params: round-to-nearest, AWQ and GPTQ.

Glossary: n calibration tokens, K input features, N output features, G group size, L stacked layers.

  qparams = quantize(params, QuantConfig(fmt="int4", group_size=64), "gptq", calib_batches, model_cfg=cfg)
  qparams = quantize(params, QuantConfig(fmt="int8"), "rtn")   # model_cfg inferred from the params' shapes
  logits = lm.apply(qparams, tokens, cfg)        # lm.Linear runs QuantizedWeight.matmul
  dense = dequantize(qparams)                    # float params of the same layout (e.g. for hf.save_hf_checkpoint)

Target kernels are chosen by a regex over '/'-joined param paths (default: every attention/MLP projection; the
embedding and lm_head stay in float, as in GPTQ/AWQ practice).  Each kernel is flattened to its 2-D matmul form
[K, N] (the `lm.Linear` contraction) and each stacked layer is quantised on its own.
- RTN: `qtensor.quantize_matrix`.
- AWQ (Lin et al. 2023): per input channel k, s_k = mean|x_k|^a / normaliser; quantise diag(s) W and multiply the
  activations by 1/s at run time (`in_scale`; AWQ folds 1/s into the previous op, a cheap [M, K] multiply here);
  a is grid-searched per matrix to minimise ||X W - X Ŵ||² on the calibration inputs (a = 0 is RTN, so the search
  never does worse on them).  Then (`awq_clip`, int4/NF4) AWQ's clipping search: each group's range shrunk by the
  ratio in [0.5, 1] that minimises its share of the output error, kept only if the whole matrix's calibration error
  drops.  Unlike the paper, a is searched per matrix on that matrix's own output (the paper shares one scale over
  q/k/v and scores it on the attention block's output, and skips clipping for q/k): with no downstream term, a
  lower per-matrix error need not mean a lower model loss (docs/results/quantization.md: measured).
- GPTQ (Frantar et al. 2022): H = XᵀX / n + damp·mean(diag H)·I; rows of W (input features) are quantised in order,
  each row's error pushed onto the rows not yet quantised through the upper Cholesky factor of H⁻¹; group scales
  are fitted to the already-updated weights when a group starts.  Calibration inputs are those of the float model
  (not the sequentially quantised one), and no act-order.
- SmoothQuant (Xiao et al. 2023; W8A8 only): s_k = max|x_k|^a / max|W_k,:|^(1-a), W' = diag(s) W quantised per
  channel, activations multiplied by 1/s and quantised per token at run time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from framework.models import lm
from framework.quant import qtensor
from framework.quant.qtensor import QuantizedWeight

METHODS = ("rtn", "awq", "gptq", "smoothquant")
DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantise and how: format, bits, group size, targets, the matmul impl, and method knobs."""

    fmt: str = "int4"
    bits: int | None = None
    group_size: int | None = None
    double_quant: bool = False
    act_quant: bool = False
    targets: str = DEFAULT_TARGETS
    impl: str = "xla"
    max_calib_tokens: int = 4096
    awq_grid: int = 20
    awq_clip: bool = True
    gptq_damp: float = 0.01
    smooth_alpha: float = 0.5

    def __post_init__(self):
        fmt, bits, group = qtensor.check_format(self.fmt, self.bits, self.group_size, self.double_quant, self.act_quant)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group)
        re.compile(self.targets)
        if self.impl not in qtensor.qmm.IMPLS:
            raise ValueError(f"QuantConfig.impl={self.impl!r}: expected one of {qtensor.qmm.IMPLS}")
        if self.awq_grid < 1 or self.max_calib_tokens < 1 or not self.gptq_damp > 0:
            raise ValueError(f"awq_grid, max_calib_tokens must be >= 1 and gptq_damp > 0; got {self}")


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def infer_model_cfg(params) -> lm.LMConfig:
    """The LMConfig that `quantize` uses when no `model_cfg` is given, read off the (stacked) params' shapes.

    Exact for everything the params determine: vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff,
    tie_embeddings (no lm_head), qkv_bias, post_norms, param_dtype; so the Linear layout (which kernels, how each
    flattens to [K, N]) is right for any Lumen LM.  What no weight shape records stays at the LMConfig defaults
    (Lumen's Llama settings): rope_theta, norm_eps, mlp_activation, norm_plus_one, scale_embeddings, sliding windows,
    softcaps, query_pre_attn_scalar, pad_id.  Only AWQ/GPTQ's calibration forward pass reads those; a model that
    differs there (HF-imported Gemma/Mistral, a non-default rope_theta) needs its real `model_cfg`, or the
    calibration activations are those of a different model (the result still runs, with worse-chosen scales).
    """
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    try:
        layers = params["layers"]
        V, D = params["embed"]["embedding"].shape
        q, k = layers["attn"]["q_proj"]["kernel"], layers["attn"]["k_proj"]["kernel"]
        gate = layers["mlp"]["gate_proj"]["kernel"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"cannot infer the model config from params (missing {e}): it needs the stacked layout (lm.init's, "
            "'layers' with attn/q_proj, k_proj and mlp/gate_proj, and embed/embedding); pass model_cfg"
        ) from None
    if any(is_q(x) for x in (q, k, gate)):
        raise ValueError("cannot infer head counts from already quantised q/k/gate projections; pass model_cfg")
    L, _, H, Dh = q.shape
    dtype = str(jnp.dtype(params["embed"]["embedding"].dtype))
    return lm.LMConfig(
        vocab_size=V,
        d_model=D,
        n_layers=L,
        n_heads=H,
        n_kv_heads=k.shape[2],
        head_dim=Dh,
        d_ff=gate.shape[-1],
        tie_embeddings="lm_head" not in params,
        qkv_bias="bias" in layers["attn"]["q_proj"],
        post_norms="post_attn_norm" in layers,
        param_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
    )


def linear_layout(model_cfg: lm.LMConfig) -> dict[str, tuple[int, int]]:
    """{'layers/attn/q_proj/kernel': (n_in, n_stack_dims)} for every lm.Linear: how to flatten each kernel to 2-D."""
    model_cfg = lm.LMConfig.from_config(model_cfg)
    found: dict[str, tuple[int, int]] = {}

    def icpt(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if isinstance(mod, lm.Linear) and ctx.method_name == "__call__":
            x_subs, k_subs = mod.eqn.split("->")[0].split(",")
            found["/".join(mod.path) + "/kernel"] = (sum(c in x_subs for c in k_subs), int(mod.path[0] == "layers"))
        return next_fun(*args, **kwargs)

    tokens = jnp.zeros((1, 1), jnp.int32)
    with nn.intercept_methods(icpt):
        jax.eval_shape(lambda: lm.Decoder(model_cfg).init(jax.random.key(0), tokens, tokens, None))
    return found


def collect_inputs(
    params, model_cfg, batches: Iterable, paths: Iterable[str], max_tokens: int
) -> dict[str, np.ndarray]:
    """Inputs of the named Linear kernels on calibration token batches: {path: [L?, n, K] float32 numpy}."""
    model_cfg = lm.LMConfig.from_config(model_cfg)
    wanted = {p.rsplit("/", 1)[0] for p in paths}

    def icpt(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if isinstance(mod, lm.Linear) and ctx.method_name == "__call__" and "/".join(mod.path) in wanted:
            n_in = sum(c in mod.eqn.split("->")[0].split(",")[0] for c in mod.eqn.split(",")[1].split("->")[0])
            x = args[0]
            mod.sow("intermediates", "linear_in", x.reshape(-1, int(np.prod(x.shape[x.ndim - n_in :]))))
        return next_fun(*args, **kwargs)

    @jax.jit
    def run(tokens_BT, pos_BT, seg_BT):
        with nn.intercept_methods(icpt):
            _, state = lm.Decoder(model_cfg).apply(
                {"params": params}, tokens_BT, pos_BT, None, seg_BT, mutable=["intermediates"]
            )
        return state["intermediates"]

    chunks: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    n = 0
    for batch in batches:
        tokens, pos, seg = _calib_batch(batch)
        keep = calibration_mask(batch, np.asarray(tokens), model_cfg).reshape(-1)
        inter = run(tokens, pos, seg)
        for p in paths:
            node = inter
            for key in p.split("/")[:-1]:
                node = node[key]
            chunks[p].append(np.asarray(node["linear_in"][0], np.float32)[..., keep, :])
        n += int(keep.sum())
        if n >= max_tokens:
            break
    if n == 0:
        raise ValueError(
            "calib_batches yielded no unmasked token (every position was masked: 'mask' 0, 'segment_ids' 0, or the "
            f"model's pad id {model_cfg.pad_id})"
        )
    return {p: np.concatenate(c, axis=-2)[..., :max_tokens, :] for p, c in chunks.items()}


def calibration_mask(batch, tokens_BT: np.ndarray, model_cfg: lm.LMConfig) -> np.ndarray:
    """bool [B, T]: the positions calibration uses. Only masked positions are dropped: a dict's "mask" (1 = real
    token) decides when given; otherwise packed "segment_ids" 0 and the model's own pad id (when it has one) mark
    padding (a plain [B, T] array of a model without a pad keeps every position: ids 0 and 1 are content there)."""
    if isinstance(batch, dict) and batch.get("mask") is not None:
        mask = np.asarray(batch["mask"])
        if mask.shape != tokens_BT.shape:
            raise ValueError(f"calibration batch 'mask' has shape {mask.shape}; expected the tokens' {tokens_BT.shape}")
        return mask.astype(bool)
    keep = np.ones(tokens_BT.shape, bool) if model_cfg.pad_id is None else tokens_BT != model_cfg.pad_id
    if isinstance(batch, dict) and batch.get("segment_ids") is not None:
        keep &= np.asarray(batch["segment_ids"]) != 0
    return keep


def _calib_batch(batch):
    """(tokens, positions, segment_ids | None) of a calibration batch: an int array [B, T] or a dict with "tokens"
    and optionally "positions"/"segment_ids" (packed rows, as `framework.tasks.data` yields them)."""
    if isinstance(batch, dict):
        if "tokens" not in batch:
            raise ValueError(f"calibration batch dicts need a 'tokens' key; got keys {sorted(batch)}")
        tokens, pos, seg = batch["tokens"], batch.get("positions"), batch.get("segment_ids")
    else:
        tokens, pos, seg = batch, None, None
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"calibration batches must be int token arrays [B, T]; got {tokens.dtype}{tokens.shape}")
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if pos is None else jnp.asarray(pos, jnp.int32)
    return tokens, pos, None if seg is None else jnp.asarray(seg, jnp.int32)


# --------------------------------------------------------------------------------------------- methods
def _output_error(qw: QuantizedWeight, w_KN, x_nK) -> float:
    """Mean squared error of the layer output on the calibration inputs: mean((x Ŵ - x W)²)."""
    return float(jnp.mean((x_nK @ qw.dequantize() - x_nK @ w_KN) ** 2))


def _awq(w_KN, x_nK, cfg: QuantConfig) -> QuantizedWeight:
    """Activation-aware per-input-channel scaling (exponent grid search), then AWQ's clipping search (see module
    docstring); keeps whichever of {scaled, scaled + clipped} has the lower calibration output error."""
    w = jnp.asarray(w_KN, jnp.float32)
    x = jnp.asarray(x_nK, jnp.float32)
    act = jnp.maximum(jnp.mean(jnp.abs(x), axis=0), 1e-8)
    kw = dict(bits=cfg.bits, group_size=cfg.group_size, double_quant=cfg.double_quant, impl=cfg.impl)
    best = None
    for a in np.linspace(0.0, 1.0, cfg.awq_grid + 1):
        s = act**a
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        qw = qtensor.quantize_matrix(w * s[:, None], cfg.fmt, act_quant=cfg.act_quant, **kw)
        qw = dataclasses.replace(qw, in_scale=(1.0 / s)[None, :])
        if cfg.act_quant:  # W8A8: the error the activations' own int8 rounding adds is the same for every a
            err = _output_error(qw, w, x)
        else:
            err = float(jnp.mean((qw.matmul(x) - x @ w) ** 2))
        if best is None or err < best[0]:
            best = (err, qw, s)
    err, qw, s = best
    if cfg.awq_clip and cfg.fmt != "int8":
        clipped = _awq_clip(w * s[:, None], x / s[None, :], cfg)
        clipped = dataclasses.replace(clipped, in_scale=(1.0 / s)[None, :])
        if _output_error(clipped, w, x) < _output_error(qw, w, x):
            qw = clipped
    return qw


_AWQ_SHRINK = tuple(np.linspace(1.0, 0.5, 11))  # the clipping ratios AWQ searches, widest first


def _awq_clip(w_KN, x_nK, cfg: QuantConfig, shrink=_AWQ_SHRINK) -> QuantizedWeight:
    """AWQ's weight-clipping search: per (group, output column), the range [min, max] (NF4: absmax) shrunk by the
    ratio r that minimises that group's share of the output error, E_x[(x_g · (w_g - q_r(w_g)))²] = dᵀ C_g d with
    C_g = x_gᵀ x_g / n (cross-group terms ignored, as in AWQ's per-group search)."""
    K, N = w_KN.shape
    G = cfg.group_size
    K_pad = qtensor.padded_rows(K, cfg.fmt, G)
    w_gGN = jnp.pad(w_KN, ((0, K_pad - K), (0, 0))).reshape(K_pad // G, G, N)
    x_nK = jnp.pad(x_nK, ((0, 0), (0, K_pad - K)))
    x_ngG = x_nK.reshape(x_nK.shape[0], K_pad // G, G)
    C_gGG = jnp.einsum("nga,ngb->gab", x_ngG, x_ngG) / x_nK.shape[0]
    best_err = best = None
    for r in shrink:
        scale, zero = _clipped_group_params(w_gGN, cfg.fmt, cfg.bits, float(r))
        codes = qtensor.encode(w_gGN, scale, zero, cfg.fmt, cfg.bits)
        d_gGN = w_gGN - qtensor.decode(codes, scale, zero, cfg.fmt)
        err_gN = jnp.einsum("gan,gab,gbn->gn", d_gGN, C_gGG, d_gGN)
        if best is None:
            best_err, best = err_gN, (scale, zero, codes)
        else:
            take = err_gN < best_err
            best_err = jnp.where(take, err_gN, best_err)
            best = tuple(
                None if b is None else jnp.where(take[:, None, :], n, b) for b, n in zip(best, (scale, zero, codes))
            )
    scale, zero, codes = best
    return qtensor.from_codes(
        codes.reshape(K_pad, N),
        scale[:, 0, :],
        None if zero is None else zero[:, 0, :],
        fmt=cfg.fmt,
        bits=cfg.bits,
        group_size=G,
        in_features=K,
        double_quant=cfg.double_quant,
        impl=cfg.impl,
    )


def _clipped_group_params(w_gGN, fmt: str, bits: int, r: float):
    """`qtensor.group_params` of each group [g, G, N] with its range shrunk by r: (scale, zero | None) [g, 1, N]."""
    if fmt == "nf4":
        return jnp.maximum(r * jnp.max(jnp.abs(w_gGN), axis=1, keepdims=True), 1e-12), None
    lo = jnp.minimum(r * jnp.min(w_gGN, axis=1, keepdims=True), 0.0)
    hi = jnp.maximum(r * jnp.max(w_gGN, axis=1, keepdims=True), 0.0)
    scale = jnp.maximum(hi - lo, 1e-12) / (2**bits - 1)
    return scale, jnp.round(-lo / scale)


def _np_group(w_GN, fmt: str, bits: int):
    """numpy float64 twin of `qtensor.group_params` (GPTQ's inner loop stays off the jax dispatcher)."""
    if fmt == "int8":
        return np.maximum(np.max(np.abs(w_GN), axis=0, keepdims=True), 1e-12) / 127.0, None
    if fmt == "nf4":
        return np.maximum(np.max(np.abs(w_GN), axis=0, keepdims=True), 1e-12), None
    lo = np.minimum(np.min(w_GN, axis=0, keepdims=True), 0.0)
    hi = np.maximum(np.max(w_GN, axis=0, keepdims=True), 0.0)
    scale = np.maximum(hi - lo, 1e-12) / (2**bits - 1)
    return scale, np.round(-lo / scale)


def _np_round_trip(w_N, scale, zero, fmt: str, bits: int):
    """(codes, dequantised) of one row under (scale, zero): numpy twin of `qtensor.encode`/`decode`."""
    if fmt == "int8":
        c = np.clip(np.round(w_N / scale), -127, 127)
        return c, c * scale
    if fmt == "nf4":
        levels = np.asarray(qtensor.NF4_LEVELS)
        c = np.argmin(np.abs((w_N / scale)[..., None] - levels), axis=-1)
        return c, levels[c] * scale
    c = np.clip(np.round(w_N / scale) + zero, 0, 2**bits - 1)
    return c, (c - zero) * scale


def _gptq(w_KN, x_nK, cfg: QuantConfig) -> QuantizedWeight:
    """GPTQ: row-by-row quantisation with Hessian-weighted error compensation (numpy float64)."""
    w = np.asarray(w_KN, np.float64)
    x = np.asarray(x_nK, np.float64)
    K, N = w.shape
    fmt, bits = cfg.fmt, cfg.bits
    G = K if fmt == "int8" else cfg.group_size
    K_pad = qtensor.padded_rows(K, fmt, G)
    H = np.eye(K_pad)
    H[:K, :K] = x.T @ x / x.shape[0]
    W = np.zeros((K_pad, N))
    W[:K] = w
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H += cfg.gptq_damp * np.mean(np.diag(H)) * np.eye(K_pad)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    codes = np.zeros((K_pad, N))
    scales, zeros = [], []
    for i in range(K_pad):
        if i % G == 0:  # int8: one group of K rows, fitted to the original weights
            scale, zero = _np_group(W[i : i + G], fmt, bits)
            scales.append(scale)
            zeros.append(zero)
        codes[i], q = _np_round_trip(W[i], scale[0], None if zero is None else zero[0], fmt, bits)
        err = (W[i] - q) / U[i, i]
        W[i:] -= np.outer(U[i, i:], err)
    scales_a = jnp.asarray(np.concatenate(scales, 0), jnp.float32)
    zeros_a = jnp.asarray(np.concatenate(zeros, 0), jnp.float32) if fmt == "int4" else None
    return qtensor.from_codes(
        jnp.asarray(codes.astype(np.int32)),
        scales_a,
        zeros_a,
        fmt=fmt,
        bits=bits,
        group_size=0 if fmt == "int8" else G,
        in_features=K,
        double_quant=cfg.double_quant,
        impl=cfg.impl,
        act_quant=cfg.act_quant,
    )


def _rtn(w_KN, x_nK, cfg: QuantConfig) -> QuantizedWeight:
    return qtensor.quantize_matrix(
        w_KN,
        cfg.fmt,
        bits=cfg.bits,
        group_size=cfg.group_size,
        double_quant=cfg.double_quant,
        impl=cfg.impl,
        act_quant=cfg.act_quant,
    )


def _smoothquant(w_KN, x_nK, cfg: QuantConfig) -> QuantizedWeight:
    """SmoothQuant for W8A8: s_k = max|x_k|^a / max|w_k|^(1-a) moves activation outliers into the weights."""
    if not (cfg.fmt == "int8" and cfg.act_quant):
        raise ValueError(f"smoothquant is for W8A8: QuantConfig(fmt='int8', act_quant=True); got {cfg.fmt!r}")
    w = jnp.asarray(w_KN, jnp.float32)
    a = cfg.smooth_alpha
    amax_x = jnp.maximum(jnp.max(jnp.abs(jnp.asarray(x_nK, jnp.float32)), axis=0), 1e-5)
    amax_w = jnp.maximum(jnp.max(jnp.abs(w), axis=1), 1e-5)
    s = jnp.maximum(amax_x**a / amax_w ** (1 - a), 1e-5)
    qw = _rtn(w * s[:, None], None, cfg)
    return dataclasses.replace(qw, in_scale=(1.0 / s)[None, :])


_METHODS = {"rtn": _rtn, "awq": _awq, "gptq": _gptq, "smoothquant": _smoothquant}


def quantize_linear(w_KN, cfg: QuantConfig, method: str = "rtn", x_nK=None) -> QuantizedWeight:
    """Quantises one [K, N] matrix with `method`; AWQ and GPTQ need its calibration inputs x [n, K]."""
    if method not in METHODS:
        raise ValueError(f"quantisation method {method!r}: expected one of {METHODS}")
    if method != "rtn" and x_nK is None:
        raise ValueError(f"method {method!r} needs calibration inputs (calib_batches)")
    return _METHODS[method](w_KN, x_nK, cfg)


def quantize(
    params: dict[str, Any],
    cfg: QuantConfig,
    method: str = "rtn",
    calib_batches: Iterable | None = None,
    *,
    model_cfg: lm.LMConfig | Any = None,
) -> dict[str, Any]:
    """Params with every target kernel replaced by a QuantizedWeight (stacked per layer); others untouched.

    `calib_batches` (AWQ/GPTQ): int token arrays [B, T], or dicts with "tokens" and optionally "mask" (1 = real
    token), "positions" and "segment_ids" (packed rows); only masked positions are skipped (`calibration_mask`: the
    mask, else segment 0, else the model's own pad id if it has one); at most `cfg.max_calib_tokens` tokens are used.
    `model_cfg` (LMConfig or its dict): omitted, it is inferred from the params' shapes (`infer_model_cfg`): exact
    for RTN on any Lumen LM and for AWQ/GPTQ on models with the default non-shape hyperparameters (rope_theta,
    norm_eps, activation, ...); pass it for any other model so that calibration runs the model as it is.
    """
    if method not in METHODS:
        raise ValueError(f"quantisation method {method!r}: expected one of {METHODS}")
    if method != "rtn" and calib_batches is None:
        raise ValueError(f"method {method!r} needs calib_batches (int token arrays [B, T])")
    model_cfg = infer_model_cfg(params) if model_cfg is None else lm.LMConfig.from_config(model_cfg)
    layout = linear_layout(model_cfg)
    pattern = re.compile(cfg.targets)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    targets = [
        path_str(p)
        for p, leaf in flat
        if pattern.fullmatch(path_str(p)) and path_str(p) in layout and not isinstance(leaf, QuantizedWeight)
    ]
    if not targets:
        raise ValueError(f"no Linear kernel matches targets {cfg.targets!r}; kernels are {sorted(layout)}")
    inputs = collect_inputs(params, model_cfg, calib_batches, targets, cfg.max_calib_tokens) if method != "rtn" else {}
    out = []
    for p, leaf in flat:
        name = path_str(p)
        if name not in targets:
            out.append(leaf)
            continue
        n_in, n_stack = layout[name]
        lead = leaf.shape[:n_stack]
        K = int(np.prod(leaf.shape[n_stack : n_stack + n_in]))
        mats = leaf.reshape(-1, K, int(np.prod(leaf.shape[n_stack + n_in :])))
        xs = inputs.get(name)
        xs = None if xs is None else xs.reshape(-1, *xs.shape[-2:])
        qws = [quantize_linear(mats[i], cfg, method, None if xs is None else xs[i]) for i in range(mats.shape[0])]
        qw = qtensor.stack(qws) if lead else qws[0]
        out.append(dataclasses.replace(qw, kernel_shape=tuple(leaf.shape[n_stack:])))
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize(params, *, dtype=None) -> dict[str, Any]:
    """Float params of the same layout: every QuantizedWeight replaced by the matrix it stands for.

    Each weight comes back in its `lm.Linear` kernel shape (per layer, stacked layers kept) as `quantize` recorded
    it, in `dtype` (default float32, which holds the dequantised values exactly); AWQ/SmoothQuant input scales are
    folded in. The result runs, and exports (`hf.save_hf_checkpoint`), as a float model whose weights equal the
    quantised ones. W8A8 weights (act_quant) are refused: their per-token activation rounding has no float form.
    """
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)
    out = []
    for path, leaf in flat:
        if not is_q(leaf):
            out.append(leaf)
            continue
        if leaf.act_quant:
            raise ValueError(
                f"dequantize: {path_str(path)} is W8A8 (act_quant=True): activations are quantised per token at run "
                "time, which no float weight reproduces"
            )
        out.append(leaf.dequantize_kernel().astype(dtype or jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def weight_bytes(params) -> dict[str, float]:
    """{'storage': bytes held, 'ideal': bytes at nominal bit widths} over every matmul kernel and quantised weight."""
    storage = ideal = 0.0
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    for leaf in leaves:
        if isinstance(leaf, QuantizedWeight):
            storage += leaf.storage_bytes()
            ideal += leaf.ideal_bytes()
    return dict(storage=storage, ideal=ideal)
