"""Device mesh from config and the logical-axis rules that map model axis names onto it.

Model code names logical axes (`batch`, `seq`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`latents`, `layers`); one rules table maps them to mesh axes (`data`, `fsdp`, `tensor`). Data parallelism, FSDP
and tensor parallelism are then config changes: the mesh sizes (and, if needed, the rules).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def rules_from_config(mesh_cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The rules table of `config.mesh.rules` (logical name -> comma-separated mesh axes, "" = replicated).

    A mesh config without `rules` gets DEFAULT_RULES. Unknown mesh axes or a mesh axis named twice for one logical
    axis are a ValueError naming the entry.
    """
    if "rules" not in mesh_cfg or mesh_cfg["rules"] is None:
        return DEFAULT_RULES
    out = []
    for name, value in dict(mesh_cfg["rules"]).items():
        if not isinstance(value, str):
            raise ValueError(f"mesh.rules.{name} = {value!r}; expected a comma-separated string of {MESH_AXES} or ''")
        axes = tuple(a.strip() for a in value.split(",") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad or len(set(axes)) != len(axes):
            raise ValueError(f"mesh.rules.{name} = {value!r}; expected distinct mesh axes from {MESH_AXES}")
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    if "batch" not in dict(out):
        raise ValueError("mesh.rules has no 'batch' entry (the mesh axes the batch is split along)")
    return tuple(out)


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


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over all devices (or `devices`), in Auto mode (pjit-style
    propagation)."""
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(mesh_shape(mesh_cfg), MESH_AXES, axis_types=auto)
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


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


def unsplit_dims(logical_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES) -> list[str]:
    """Where a rule asks to split a dim over mesh axes of size > 1 that do not divide it (so it stays replicated),
    one line per (logical axis, size, mesh axes), naming a parameter that has it."""
    table, seen = dict(rules), {}
    flat = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=lambda s: isinstance(s, P))[0]
    for (path, spec), x in zip(flat, jax.tree.leaves(shapes_tree)):
        used = set()
        for name, dim in zip(tuple(spec), x.shape):
            axes = table.get(name) if name is not None else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
            n = math.prod(mesh.shape[a] for a in axes)
            if axes and dim % n == 0:
                used.update(axes)
            elif axes:
                where = jax.tree_util.keystr(path)
                msg = f"{name}={dim} is not divisible by mesh {'x'.join(axes)}={n} (e.g. {where}): replicated"
                seen.setdefault((name, dim, axes), msg)
    return list(seen.values())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dim over the `batch` rule's mesh axes, the rest replicated."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """Places a host batch (numpy) onto the mesh, split along the batch axis."""
    return {k: jax.device_put(v, batch_sharding(mesh, np.ndim(v), rules)) for k, v in batch.items()}


def process_rows(mesh: Mesh, batch_size: int, rules=DEFAULT_RULES) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch that this process's devices hold: what it must load, and nothing else."""
    index = batch_sharding(mesh, 1, rules).addressable_devices_indices_map((batch_size,))
    spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in index.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous batch rows {spans} under mesh {dict(mesh.shape)}; "
            "order the mesh so each process's devices are adjacent along the batch axes"
        )
    return lo, hi


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, batch_size: int, rules=DEFAULT_RULES):
    """Assembles global batch arrays from each process's rows (`process_rows`); one process: the whole batch."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        sharding = batch_sharding(mesh, v.ndim, rules)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
    return out


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes of `tree`'s arrays held on each (addressable) device, summed over their shards."""
    out: dict[jax.Device, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@contextlib.contextmanager
def rules_context(mesh: Mesh, rules=DEFAULT_RULES):
    """The mesh and the rules for `nn.with_logical_constraint` inside jitted model code.

    The mesh is entered with `jax.set_mesh`: under the legacy `with mesh:` flax's logical constraints are silently
    dropped on current JAX, which left FSDP all-gathering activations instead of weights.
    """
    set_mesh = getattr(jax, "set_mesh", None)
    with set_mesh(mesh) if set_mesh is not None else mesh, nn.logical_axis_rules(tuple((k, v) for k, v in rules)):
        yield
