"""Logical axis names -> mesh axes, in one short table, plus the replication guard.

Parameters name their dimensions (`("embed", "mlp")`); only this module knows how those names
land on the mesh. A dimension that a mesh axis does not divide stays unsharded on that axis,
and the guard below reports when too much of the model ends up replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slm.errors import ShardingError

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "depth_embed": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "layers": (),
    "depth_step": (),
    "streams": (),
    "norm": (),
    "lora_rank": ("fsdp",),  # an adapter's other side may have no fsdp-sized axis (b: [r, mlp])
}


def logical_to_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
    """Map each named dimension to the mesh axes of its rule that divide it and are still free."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is not None and name not in RULES:
            raise ShardingError(f"logical axis '{name}' has no rule in slm/parallel/rules.py RULES")
        axes = []
        for axis in RULES.get(name, ()) if name else ():
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in axes)):
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout by logical names, inside functions traced under a mesh (the
    train step sets one). Left to itself the compiler may gather a batch-sharded activation
    whole to meet an FSDP-sharded weight, multiplying activation memory by the mesh size.
    Without a mesh (decoding, one device) this changes nothing."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def tree_shardings(names_tree, shapes_tree, mesh: Mesh):
    """NamedShardings for a tree of logical names (PartitionSpecs of names) and shapes."""
    return jax.tree.map(
        lambda names, shape: NamedSharding(mesh, logical_to_spec(tuple(names), shape.shape, mesh)),
        names_tree, shapes_tree, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_major_shardings(shapes_tree, mesh: Mesh):
    """NamedShardings that split each leaf's first axis as the batch (where the mesh divides
    it) and replicate the rest; scalars are replicated."""
    def rows_first(shape) -> NamedSharding:
        if not shape.ndim:
            return NamedSharding(mesh, PartitionSpec())
        names = ("batch",) + (None,) * (shape.ndim - 1)
        return NamedSharding(mesh, logical_to_spec(names, shape.shape, mesh))

    return jax.tree.map(rows_first, shapes_tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays split over `data` x `fsdp`, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"], *([None] * (ndim - 1))))


def replicated_report(shapes_tree, shardings_tree, mesh: Mesh) -> tuple[float, list[tuple[str, int]]]:
    """Fraction of parameter bytes that are fully replicated although some mesh axis (>1) could
    split one of their dimensions, and the largest such parameters."""
    big_axes = [s for s in mesh.shape.values() if s > 1]
    total, wasted = 0, []
    leaves = jax.tree_util.tree_leaves_with_path(shapes_tree)
    for (path, shape), sharding in zip(leaves, jax.tree.leaves(shardings_tree)):
        nbytes = math.prod(shape.shape) * np.dtype(shape.dtype).itemsize
        total += nbytes
        replicated = all(p is None for p in sharding.spec)
        shardable = any(d % s == 0 for d in shape.shape for s in big_axes)
        if replicated and shardable:
            wasted.append((jax.tree_util.keystr(path), nbytes))
    wasted.sort(key=lambda item: -item[1])
    return (sum(b for _, b in wasted) / total if total else 0.0), wasted


def check_replication(shapes_tree, shardings_tree, mesh: Mesh, max_fraction: float) -> float:
    """Fail a run that would keep more than `max_fraction` of parameter bytes on every device."""
    fraction, wasted = replicated_report(shapes_tree, shardings_tree, mesh)
    if fraction > max_fraction:
        worst = ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in wasted[:5])
        raise ShardingError(
            f"{fraction:.1%} of parameter bytes are replicated on mesh {dict(mesh.shape)} "
            f"(limit mesh.max_replicated_fraction={max_fraction:.1%}); largest: {worst}. "
            "Add a rule for their logical axes in slm/parallel/rules.py or change the mesh."
        )
    return fraction
