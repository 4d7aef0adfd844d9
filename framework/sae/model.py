"""SAE architectures as pure functions of a parameter dict: init, encode, decode and the training losses.

Glossary: B batch (tokens), D input width (d_in), O output width (d_out; = D for an SAE), L latents.

Parameters (a flat dict of arrays):
  W_enc [D, L], b_enc [L], W_dec [L, O], b_dec [O]       every architecture
  log_threshold [L] (float32)                            jumprelu: threshold = exp(log_threshold)
  r_mag [L], b_mag [L]                                   gated: magnitude path W_enc * exp(r_mag) + b_mag
  threshold [] (a buffer, not trained)                   batchtopk: the inference-time threshold
An SAE subtracts b_dec from its input before encoding; a transcoder (d_out or out_hookpoint set) does not, since
its input and output live in different spaces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from framework.sae import defaults

BUFFERS = ("threshold",)  # entries of sae_params that training sets directly instead of by gradient


def _rectangle(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, threshold, bandwidth):
    """z * H(z - threshold); pseudo-gradient for the threshold through a rectangle kernel of width `bandwidth`."""
    return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    z, threshold = res
    dz = (z > threshold).astype(z.dtype) * g
    dthreshold = -(threshold / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return dz, jnp.sum(dthreshold.reshape(-1, threshold.shape[-1]), axis=0).astype(threshold.dtype)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z, threshold, bandwidth):
    """H(z - threshold); no gradient to z, a rectangle-kernel pseudo-gradient to the threshold (the L0 penalty)."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step(z, threshold, bandwidth), (z, threshold)


def _step_bwd(bandwidth, res, g):
    z, threshold = res
    dthreshold = -(1.0 / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return jnp.zeros_like(z), jnp.sum(dthreshold.reshape(-1, threshold.shape[-1]), axis=0).astype(threshold.dtype)


step.defvjp(_step_fwd, _step_bwd)


def geometric_median(x: np.ndarray, *, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to the rows of `x` (Weiszfeld's algorithm, float64)."""
    x = np.asarray(x, np.float64)
    y = x.mean(axis=0)
    for _ in range(iters):
        dist = np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
        w = 1.0 / dist
        y_new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(y_new - y) <= tol * max(1.0, np.linalg.norm(y)):
            return y_new
        y = y_new
    return y


def init_params(cfg, rng: jax.Array, sample_out: np.ndarray | None = None) -> dict[str, jax.Array]:
    """Fresh parameters for `cfg`; `sample_out` (rows of the reconstruction target) sets b_dec when asked to."""
    D, L, O = cfg.d_in, cfg.n_latents, defaults.d_out(cfg)
    k_dec, k_enc = jax.random.split(rng)
    W_dec = jax.random.normal(k_dec, (L, O), jnp.float32)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True) * cfg.decoder_init_norm
    if cfg.tied_init and D == O:
        W_enc = W_dec.T
    else:  # untied (or a transcoder whose widths differ): an independent direction per latent, same scale
        W_enc = jax.random.normal(k_enc, (D, L), jnp.float32)
        W_enc = W_enc / jnp.linalg.norm(W_enc, axis=0, keepdims=True) * cfg.decoder_init_norm
    if cfg.b_dec_init == "zeros" or sample_out is None:
        b_dec = np.zeros(O, np.float32)
    elif cfg.b_dec_init == "mean":
        b_dec = np.asarray(sample_out, np.float64).mean(axis=0)
    else:
        b_dec = geometric_median(sample_out)
    params = {
        "W_enc": W_enc,
        "b_enc": jnp.zeros(L, jnp.float32),
        "W_dec": W_dec,
        "b_dec": jnp.asarray(b_dec, jnp.float32),
    }
    if cfg.arch == "jumprelu":
        params["log_threshold"] = jnp.full(L, np.log(cfg.jumprelu_init_threshold), jnp.float32)
    if cfg.arch == "gated":
        params["r_mag"] = jnp.zeros(L, jnp.float32)
        params["b_mag"] = jnp.zeros(L, jnp.float32)
    if cfg.arch == "batchtopk":
        params["threshold"] = jnp.zeros((), jnp.float32)  # set from the first training batch
    return params


def pre_activations(params, cfg, x_BD: Float[Array, "B D"]) -> Float[Array, "B L"]:
    """Encoder pre-activations (x - b_dec) @ W_enc + b_enc (no b_dec subtraction for transcoders).

    The value is computed as written; b_dec's gradient, -(sum_B dpre) @ W_enc^T, goes through a zero-valued term
    (b_dec - stop_gradient(b_dec)) @ W_enc instead of through the product, which would cost autodiff a dense
    [B, L] x [L, D] product (d(x - b_dec) = dpre @ W_enc^T) only to sum it over the batch.
    """
    if defaults.is_transcoder(cfg):
        return x_BD @ params["W_enc"] + params["b_enc"]
    b_dec = params["b_dec"]
    b_sg = jax.lax.stop_gradient(b_dec)
    return (x_BD - b_sg) @ params["W_enc"] + params["b_enc"] - (b_dec - b_sg) @ params["W_enc"]


# Up to this k, kth_largest runs k max-and-remove passes; above it, lax.top_k (whose cost hardly depends on k).
MAX_PASSES_K = 32


def kth_largest(x_BL, k: int):
    """[B, 1]: each row's k-th largest value counted with multiplicity, i.e. lax.top_k(x, k)[0][:, -1:].

    On XLA:CPU, lax.top_k of a 1024 x 512 batch (k = 16) took 3.6 ms, k = 16 passes of "row max, then drop the values
    >= it" ~1.4 ms (each pass a vectorised fused loop; AMD EPYC, best of 150 calls). Dropping a row's max drops all
    its copies, so with ties among a row's top values the passes give the k-th largest distinct value; such a batch
    (detected: more than k values >= the result, which never happens without ties) falls back to lax.top_k, so the
    result always equals it. Exact float ties are not rare in low-rank activations: on the SAE benchmark's cached
    activations about 4% of batches fell back. No gradient.
    """
    x_BL = jax.lax.stop_gradient(x_BL)
    k = min(k, x_BL.shape[-1])
    if k > MAX_PASSES_K:
        return jax.lax.top_k(x_BL, k)[0][..., -1:]
    rest, m_B1 = x_BL, None
    for i in range(k):
        if i:
            rest = jnp.where(rest >= m_B1, -jnp.inf, rest)
        m_B1 = jnp.max(rest, axis=-1, keepdims=True)
    ties = jnp.any(jnp.sum(x_BL >= m_B1, axis=-1) > k)
    return jax.lax.cond(ties, lambda: jax.lax.top_k(x_BL, k)[0][..., -1:], lambda: m_B1)


def ranking_scores(params, cfg, pre_BL):
    """What TopK, BatchTopK and AuxK rank and threshold: the pre-activations, or with `rank_by_decoder_norm` each
    pre-activation times its latent's decoder-row norm (no gradient through the norm), i.e. the norm of the latent's
    contribution to the reconstruction (SAELens' rescale_acts_by_decoder_norm; selection only: the latents and their
    gradients are unchanged). With an unconstrained decoder the row norms drift apart during training, and ranking
    by the raw pre-activation then keeps latents whose contribution is small over ones whose contribution is large.
    A no-op with normalize_decoder (rows of equal norm rank as the pre-activations do), where it is skipped.
    """
    if not cfg.rank_by_decoder_norm or cfg.normalize_decoder:
        return pre_BL
    return pre_BL * jax.lax.stop_gradient(jnp.linalg.norm(params["W_dec"], axis=1))


def topk_mask(pre_BL, k: int):
    """1 where a latent is among the token's k largest pre-activations and positive, else 0."""
    kth_B1 = kth_largest(pre_BL, k)
    return ((pre_BL >= kth_B1) & (pre_BL > 0)).astype(pre_BL.dtype)


def batch_topk_mask(pre_BL, k: int):
    """(mask, smallest kept value): the k*B largest positive pre-activations of the whole batch."""
    flat = jnp.maximum(pre_BL, 0).reshape(-1)
    vals = jax.lax.top_k(flat, k * pre_BL.shape[0])[0]
    kth = vals[-1]
    mask = ((pre_BL >= kth) & (pre_BL > 0)).astype(pre_BL.dtype)
    kept_min = jnp.min(jnp.where(vals > 0, vals, jnp.inf))
    return mask, jnp.where(jnp.isfinite(kept_min), kept_min, 0.0)


def encode_train(params, cfg, x_BD):
    """(latents [B, L], extras) with training-time behaviour (BatchTopK's batch-level selection)."""
    pre = pre_activations(params, cfg, x_BD)
    extras = {"pre": pre}
    if cfg.arch in ("topk", "batchtopk"):
        extras["score"] = ranking_scores(params, cfg, pre)
    if cfg.arch == "relu":
        f = jax.nn.relu(pre)
    elif cfg.arch == "topk":
        f = pre * jax.lax.stop_gradient(topk_mask(extras["score"], cfg.k))
    elif cfg.arch == "batchtopk":
        mask, kept_min = batch_topk_mask(extras["score"], cfg.k)
        f = pre * jax.lax.stop_gradient(mask)
        extras["batch_threshold"] = jax.lax.stop_gradient(kept_min)
    elif cfg.arch == "jumprelu":
        theta = jnp.exp(params["log_threshold"].astype(jnp.float32))
        f = jumprelu(pre, theta, cfg.jumprelu_bandwidth)
        extras["theta"] = theta
    elif cfg.arch == "gated":
        f = _gated(params, cfg, x_BD, pre)
    else:
        raise ValueError(f"unknown SAE architecture {cfg.arch!r}; expected one of {defaults.ARCHS}")
    return f, extras


def _gated(params, cfg, x_BD, pi_gate):
    if not defaults.is_transcoder(cfg):
        x_BD = x_BD - params["b_dec"]
    pi_mag = x_BD @ (params["W_enc"] * jnp.exp(params["r_mag"])) + params["b_mag"]
    return (pi_gate > 0).astype(pi_mag.dtype) * jax.nn.relu(pi_mag)


def encode(params, cfg, x_BD: Float[Array, "B D"]) -> Float[Array, "B L"]:
    """Latent activations at inference: BatchTopK uses its learned threshold instead of the batch's top k."""
    lead = x_BD.shape[:-1]
    x_BD = jnp.asarray(x_BD, jnp.float32).reshape(-1, x_BD.shape[-1])
    if cfg.arch == "batchtopk":
        pre = pre_activations(params, cfg, x_BD)
        f = jnp.where(ranking_scores(params, cfg, pre) > jnp.maximum(params["threshold"], 0.0), pre, 0.0)
    elif cfg.arch == "jumprelu":
        pre = pre_activations(params, cfg, x_BD)
        f = jnp.where(pre > jnp.exp(params["log_threshold"]), pre, 0.0)
    else:
        f = encode_train(params, cfg, x_BD)[0]
    return f.reshape(*lead, -1)


def decode(params, cfg, f_BL: Float[Array, "B L"]) -> Float[Array, "B O"]:
    """Reconstruction f @ W_dec + b_dec."""
    return f_BL @ params["W_dec"] + params["b_dec"]


def decoder_directions(params, cfg) -> Float[Array, "L O"]:
    """Unit-norm decoder rows: the direction each latent writes (zero rows stay zero)."""
    W = params["W_dec"]
    return W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def losses(params, cfg, x_BD, y_BO, sparsity_scale, dead_L):
    """(total loss, parts) of one batch in the training space (inputs already normalised).

    Reconstruction is the per-token squared error summed over output dims, averaged over tokens. ReLU and Gated add
    l1_coeff * sum_i f_i * ||d_i||; JumpReLU adds l0_coeff * sum_i H(pre_i - theta_i); AuxK (aux_k > 0) adds
    aux_k_coeff * ||e - e_hat||^2 / ||e - mean(e)||^2, e_hat reconstructing the residual e from the top aux_k dead
    latents.
    """
    # TopK trains densely too: latents masked by the k-th largest pre-activation (kth_largest, not lax.top_k) and
    # decoded by a dense [B, L] x [L, O] product. On CPU this beat gathering each token's k encoder columns and decoder
    # rows (sparse products, scatter-add gradients) once the selection no longer needs lax.top_k's indices: 5.0 vs
    # 8.2 ms per step at 512 latents, 13.7 vs 15.7 at 2048 (batch 1024, d 64, k 16, no AuxK; sums of per-op times).
    f, extras = encode_train(params, cfg, x_BD)
    y_hat = decode(params, cfg, f)
    f_sg = jax.lax.stop_gradient(f)
    stats = {"fired": jnp.any(f_sg != 0, axis=0), "l0": jnp.mean(jnp.sum(f_sg != 0, axis=-1, dtype=jnp.float32))}
    err = y_BO - y_hat
    mse = jnp.mean(jnp.sum(err**2, axis=-1))
    dec_norm_L = jnp.linalg.norm(params["W_dec"], axis=1)
    sparsity = jnp.zeros((), jnp.float32)
    if cfg.arch == "relu":
        sparsity = cfg.l1_coeff * jnp.mean(jnp.sum(f * dec_norm_L, axis=-1))
    elif cfg.arch == "gated":
        gate = jax.nn.relu(extras["pre"])
        sparsity = cfg.l1_coeff * jnp.mean(jnp.sum(gate * dec_norm_L, axis=-1))
        frozen = gate @ jax.lax.stop_gradient(params["W_dec"]) + jax.lax.stop_gradient(params["b_dec"])
        sparsity = sparsity + jnp.mean(jnp.sum((y_BO - frozen) ** 2, axis=-1))
    elif cfg.arch == "jumprelu":
        l0_soft = step(extras["pre"], extras["theta"], cfg.jumprelu_bandwidth)
        sparsity = cfg.l0_coeff * jnp.mean(jnp.sum(l0_soft, axis=-1))
    total = mse + sparsity_scale * sparsity
    aux = jnp.zeros((), jnp.float32)
    if cfg.aux_k:
        aux = aux_k_loss(params, cfg, x_BD, jax.lax.stop_gradient(err), extras.get("score", extras["pre"]), dead_L)
        total = total + cfg.aux_k_coeff * aux
    parts = {"loss": total, "mse": mse, "sparsity": sparsity, "aux_loss": aux, "y_hat": y_hat, **stats}
    if "batch_threshold" in extras:
        parts["batch_threshold"] = extras["batch_threshold"]
    return total, parts


def aux_k_loss(params, cfg, x_BD, e_BO, pre_BL, dead_L):
    """||e - e_hat||^2 / ||e - mean(e)||^2 (batch means): e_hat reconstructs the residual e from the aux_k largest
    pre-activations of dead latents (all of them when at most aux_k are dead; 0 when none is).

    `pre_BL` (the encoder pre-activations, or ranking_scores of them) only selects; the selected values are recomputed
    from `params` inside the branch that runs, so no dense [B, L] cotangent crosses the branch. No ReLU (as SAELens;
    OpenAI's code clips with a ReLU): measured on the frontier's 2048-latent TopK, the ReLU left more latents silent on
    all 100k training tokens (8.3% vs 3.5%), since a dead latent whose pre-activation is negative gets no gradient
    through it. Three branches, one run per step: no dead latent (no work); at most aux_k dead (every dead latent is
    selected, no top-k: their encoder columns and decoder rows are gathered, [B, D] x [D, aux_k] x [aux_k, O]); more
    (masked by the aux_k-th largest dead pre-activation, kth_largest, and decoded densely).

    With `aux_k_dead_scale` the loss is weighted by min(n_dead / aux_k, 1), as EleutherAI's sae and SAELens do: a few
    dead latents then get a proportionally small share instead of the full loss. On the SAE bench (2048 latents,
    k=32, aux_k=32, ~7 dead) the unscaled loss left Lumen's held-out FVU at 0.0158 against SAELens' 0.0137; scaled,
    0.0138 (at 512 latents, k=16, where ~4% are dead, 0.0222 -> 0.0220).
    """
    aux_k = min(cfg.aux_k, cfg.n_latents)
    n_dead = jnp.sum(dead_L, dtype=jnp.int32)
    denom = jnp.maximum(jnp.mean(jnp.sum((e_BO - e_BO.mean(axis=0)) ** 2, axis=-1)), 1e-12)
    pre_BL = jax.lax.stop_gradient(pre_BL)

    def loss(e_hat_BO):
        return jnp.mean(jnp.sum((e_BO - e_hat_BO) ** 2, axis=-1)) / denom

    def none(params):
        return jnp.zeros((), jnp.float32)

    def few(params):
        idx_K = jnp.nonzero(dead_L, size=aux_k, fill_value=0)[0]
        cols = {**params, "W_enc": params["W_enc"][:, idx_K], "b_enc": params["b_enc"][idx_K]}
        vals_BK = jnp.where(jnp.arange(aux_k) < n_dead, pre_activations(cols, cfg, x_BD), 0.0)
        scale = n_dead.astype(jnp.float32) / aux_k if cfg.aux_k_dead_scale else 1.0
        return scale * loss(vals_BK @ params["W_dec"][idx_K])

    def many(params):
        keep = dead_L & (pre_BL >= kth_largest(jnp.where(dead_L, pre_BL, -jnp.inf), aux_k))
        return loss(jnp.where(keep, pre_activations(params, cfg, x_BD), 0.0) @ params["W_dec"])

    branch = jnp.where(n_dead == 0, 0, jnp.where(n_dead <= aux_k, 1, 2))
    return jax.lax.switch(branch, (none, few, many), params)
