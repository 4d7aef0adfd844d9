"""Device mesh from config and the logical-axis rules that map model axis names onto it.

Model code names logical axes (`batch`, `seq`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`latents`, `layers`); one rules table maps them to mesh axes (`data`, `fsdp`, `tensor`). Data parallelism, FSDP
and tensor parallelism are then config changes: the mesh sizes (and, if needed, the rules).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("latents", "tensor"),
    ("layers", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves `{data, fsdp, tensor}` sizes (one may be -1 = fill) against the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one of mesh.{{data,fsdp,tensor}} may be -1, got {dict(zip(MESH_AXES, sizes))}")
    bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh sizes must be positive or -1: {bad}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by the fixed axes' product {known}")
        sizes[MESH_AXES.index(fill[0])] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {n} available")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int]) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over all devices, in Auto mode (pjit-style propagation)."""
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(mesh_shape(mesh_cfg), MESH_AXES, axis_types=auto)


def logical_to_mesh_spec(
    logical: P, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> P:
    """Maps a logical PartitionSpec to a mesh one; a dim that the mesh axes do not divide stays replicated."""
    table = dict(rules)
    out, used = [], set()
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree, from its logical specs and its (abstract) arrays."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
        logical_tree,
        shapes_tree,
        is_leaf=lambda s: isinstance(s, P),
    )


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dim over the `batch` rule's mesh axes, the rest replicated."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """Places a host batch (numpy) onto the mesh, split along the batch axis."""
    return {k: jax.device_put(v, batch_sharding(mesh, np.ndim(v), rules)) for k, v in batch.items()}


def rules_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Context for `nn.with_logical_constraint` inside jitted model code."""
    return nn.logical_axis_rules(tuple((k, v) for k, v in rules))
