"""The LoRA family as weight pytrees that `lm.Linear` runs directly: LoRA, rsLoRA, DoRA, PiSSA init, QLoRA.

Glossary: K input features, N output features, r rank, L stacked layers.

  params = add_adapters(base_params, LoraConfig(rank=8, alpha=16), rng, model_cfg=cfg)
  adapters = adapter_params(params)                     # the only trainable leaves: {"a", "b"[, "m"]} per kernel
  loss = lambda ad: task_loss(set_adapters(params, ad))
  merged = merge(params)                                # plain params for inference

A targeted kernel (regex over '/'-joined param paths) becomes a `LoraWeight`: the frozen base (float kernel, or a
`QuantizedWeight` for QLoRA), A [K, r], B [r, N] and, for DoRA, the magnitude m [1, N].  In the 2-D matmul form
W [K, N] of the kernel:
- LoRA: W' = W + s·A B with s = alpha / r; rsLoRA: s = alpha / sqrt(r).  A ~ U(±1/sqrt(K)), B = 0.
- DoRA (Liu et al. 2024): W' = m · V / ||V||_col with V = W + s·A B and m initialised to ||W||_col (the norm is
  differentiated through, as in the paper's full form).
- PiSSA (Meng et al. 2024): A, B from the top-r SVD of W (s·A B = U_r S_r V_rᵀ), base = the residual W - s·A B.
- QLoRA (Dettmers et al. 2023): the base (the PiSSA residual if combined) is NF4-quantised, optionally double-quantised.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from framework.quant import methods as quant_methods
from framework.quant import qtensor
from framework.quant.qtensor import QuantizedWeight

DEFAULT_TARGETS = quant_methods.DEFAULT_TARGETS
ADAPTER_KEYS = ("a", "b", "m")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling rule, variant flags, targets and (QLoRA) the base quantisation."""

    rank: int = 8
    alpha: float = 16.0
    scaling: str = "lora"  # "lora": alpha / r; "rslora": alpha / sqrt(r)
    dora: bool = False
    init: str = "lora"  # "lora" (A random, B zero) or "pissa" (principal singular vectors)
    targets: str = DEFAULT_TARGETS
    base_format: str | None = None  # None (float base) or "nf4" / "int4" / "int8" (QLoRA: "nf4")
    double_quant: bool = False

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1; got {self.rank}")
        if self.scaling not in ("lora", "rslora"):
            raise ValueError(f"LoraConfig.scaling must be 'lora' or 'rslora'; got {self.scaling!r}")
        if self.init not in ("lora", "pissa"):
            raise ValueError(f"LoraConfig.init must be 'lora' or 'pissa'; got {self.init!r}")
        if self.base_format is not None:
            qtensor.check_format(self.base_format, None, None, self.double_quant)
        re.compile(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank if self.scaling == "lora" else math.sqrt(self.rank))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen base kernel plus low-rank adapters; `matmul` is what lm.Linear calls."""

    base: Any
    a: jax.Array
    b: jax.Array
    m: jax.Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))  # per-layer shape

    def delta(self) -> jax.Array:
        """s · A B in fp32, [..., K, N]."""
        return self.scale * jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))

    def dense(self) -> jax.Array:
        """The effective fp32 matrix W' [..., K, N]."""
        K = self.a.shape[-2]
        v = _dense_base(self.base, K, self.a.shape[:-2]) + self.delta()
        if self.m is None:
            return v
        return self.m * v / jnp.linalg.norm(v, axis=-2, keepdims=True)

    def matmul(self, x_MK, dtype=None):
        dtype = dtype or x_MK.dtype
        x = x_MK.astype(dtype)
        if self.m is not None:  # DoRA needs the column norms of the full adapted matrix
            return jnp.dot(x, self.dense().astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
        if isinstance(self.base, QuantizedWeight):
            y = self.base.matmul(x, dtype)
        else:
            y = x @ self.base.reshape(x.shape[-1], -1).astype(dtype)
        low = (x @ self.a.astype(dtype)) @ self.b.astype(dtype)
        return (y.astype(jnp.float32) + self.scale * low.astype(jnp.float32)).astype(dtype)


def _dense_base(base, K: int, lead: tuple[int, ...]):
    if isinstance(base, QuantizedWeight):
        return base.dequantize()
    return base.reshape(*lead, K, -1).astype(jnp.float32)


def _is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def _is_weight(x) -> bool:
    return isinstance(x, (LoraWeight, QuantizedWeight))


def add_adapters(params: dict[str, Any], cfg: LoraConfig, rng: jax.Array, *, model_cfg) -> dict[str, Any]:
    """Params with every target kernel wrapped in a LoraWeight (base frozen by convention: train `adapter_params`)."""
    layout = quant_methods.linear_layout(model_cfg)
    pattern = re.compile(cfg.targets)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_weight)
    names = [quant_methods.path_str(p) for p, _ in flat]
    targets = [n for n in names if pattern.fullmatch(n) and n in layout]
    if not targets:
        raise ValueError(f"no Linear kernel matches LoRA targets {cfg.targets!r}; kernels are {sorted(layout)}")
    keys = dict(zip(targets, jax.random.split(rng, len(targets))))
    out = []
    for name, (_, leaf) in zip(names, flat):
        if name not in keys:
            out.append(leaf)
            continue
        if _is_weight(leaf):
            raise ValueError(f"{name} is already a {type(leaf).__name__}; add adapters to float kernels")
        n_in, n_stack = layout[name]
        out.append(_wrap(leaf, n_in, n_stack, cfg, keys[name]))
    return jax.tree_util.tree_unflatten(treedef, out)


def _wrap(kernel, n_in: int, n_stack: int, cfg: LoraConfig, key) -> LoraWeight:
    lead = kernel.shape[:n_stack]
    per_layer = kernel.shape[n_stack:]
    K, N = math.prod(per_layer[:n_in]), math.prod(per_layer[n_in:])
    w = kernel.reshape(*lead, K, N).astype(jnp.float32)
    r, s = int(cfg.rank), cfg.scale
    if r > min(K, N):
        raise ValueError(f"LoRA rank {r} exceeds min(K={K}, N={N}) of a kernel of shape {kernel.shape}")
    if cfg.init == "pissa":
        u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(sv[..., :r] / s)
        a = u[..., :r] * root[..., None, :]
        b = root[..., :, None] * vt[..., :r, :]
        w = w - s * (a @ b)
    else:
        bound = 1.0 / math.sqrt(K)
        a = jax.random.uniform(key, (*lead, K, r), jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, r, N), jnp.float32)
    m = jnp.linalg.norm(w + s * (a @ b), axis=-2, keepdims=True) if cfg.dora else None
    if cfg.base_format is not None:
        mats = w.reshape(-1, K, N)
        qws = [
            qtensor.quantize_matrix(mats[i], cfg.base_format, double_quant=cfg.double_quant) for i in range(len(mats))
        ]
        base = qtensor.stack(qws) if lead else qws[0]
        if cfg.dora:  # magnitude of the matrix the adapters actually start from
            m = jnp.linalg.norm(base.dequantize() + s * (a @ b), axis=-2, keepdims=True)
    else:
        base = w.reshape(kernel.shape).astype(kernel.dtype)
    a, b = a.astype(kernel.dtype), b.astype(kernel.dtype)
    return LoraWeight(base=base, a=a, b=b, m=m, scale=s, kernel_shape=tuple(per_layer))


# ------------------------------------------------------------------------------------ trainable subsets
def adapter_params(params) -> dict[str, Any]:
    """The trainable leaves only: the params tree pruned to {"a", "b"[, "m"]} dicts at every LoraWeight."""

    def prune(node):
        if _is_lora(node):
            return {"a": node.a, "b": node.b} | ({"m": node.m} if node.m is not None else {})
        if isinstance(node, dict):
            kept = {k: prune(v) for k, v in node.items()}
            return {k: v for k, v in kept.items() if v is not None} or None
        return None

    out = prune(params)
    if not out:
        raise ValueError("params hold no LoraWeight: call add_adapters first")
    return out


def set_adapters(params, adapters) -> dict[str, Any]:
    """`params` with the adapter leaves taken from `adapters` (the output of `adapter_params`, e.g. after training)."""

    def put(node, ad, path):
        if _is_lora(node):
            if set(ad) != {"a", "b"} | ({"m"} if node.m is not None else set()):
                raise ValueError(f"adapters at {path} have keys {sorted(ad)}; expected those of adapter_params")
            return dataclasses.replace(node, a=ad["a"], b=ad["b"], m=ad.get("m"))
        if isinstance(node, dict):
            return {k: put(v, ad[k], f"{path}/{k}") if k in ad else v for k, v in node.items()}
        raise ValueError(f"adapters hold {path}, which is not a LoraWeight in params")

    return put(params, adapters, "")


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------- merge / unmerge
def merge(params) -> dict[str, Any]:
    """Plain float params: every LoraWeight replaced by its effective kernel (QLoRA: dequantised base + delta)."""

    def fold(x):
        if not _is_lora(x):
            return x
        lead = x.a.shape[:-2]
        dtype = x.a.dtype
        return x.dense().reshape(*lead, *x.kernel_shape).astype(dtype)

    return jax.tree.map(fold, params, is_leaf=_is_weight)


def unmerge(merged, adapted) -> dict[str, Any]:
    """Inverse of `merge` for float-base LoRA / rsLoRA / PiSSA: base = merged - s·A B, adapters from `adapted`."""

    def split(kernel, x):
        if not _is_lora(x):
            return kernel
        if x.m is not None or isinstance(x.base, QuantizedWeight):
            raise ValueError("unmerge needs a float base without DoRA magnitude (DoRA/QLoRA merges are one-way)")
        base = (kernel.reshape(x.delta().shape).astype(jnp.float32) - x.delta()).reshape(x.base.shape)
        return dataclasses.replace(x, base=base.astype(x.base.dtype))

    return jax.tree.map(split, merged, adapted, is_leaf=_is_weight)
