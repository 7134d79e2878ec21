"""Arrays built on a mesh one device shard at a time, from readers of stored tensors.

`read_sharded` gives every parameter to `jax.make_array_from_callback` with its target
sharding: the callback receives one device's index and a reader slices exactly that region out
of a memory-mapped file. No host ever holds a whole parameter of a sharded model; the largest
host buffer is recorded so tests and the CLI can show it. LLM checkpoints
(`slm.convert.sharded`) and speech encoders (`slm.model.encoders`) load through it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

Reader = Callable[[list[slice]], np.ndarray]  # one shard's region (start/stop slices) -> values


@dataclasses.dataclass
class LoadStats:
    total_bytes: int  # all parameters, as stored on the mesh
    device_bytes: dict[str, int]  # per device: bytes of the parameter shards it holds
    largest_read_bytes: int  # the largest single host buffer built while loading

    @property
    def max_device_bytes(self) -> int:
        return max(self.device_bytes.values())

    def describe(self) -> str:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        return (f"parameters {mib(self.total_bytes)} in all; at most "
                f"{mib(self.max_device_bytes)} on one of {len(self.device_bytes)} devices; "
                f"largest host buffer while reading {mib(self.largest_read_bytes)}")


def device_bytes(tree) -> dict[str, int]:
    """Bytes of the shards each device holds, summed over a tree of arrays."""
    per_device: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return per_device


def read_sharded(readers: dict[tuple, Reader], shapes: dict[tuple, jax.ShapeDtypeStruct],
                 shardings: dict[tuple, jax.sharding.Sharding],
                 progress: Callable = lambda items: items) -> tuple[dict[tuple, jax.Array], int]:
    """Each reader's parameter as a sharded array (flat paths), and the largest host read."""
    largest, flat = 0, {}
    for path, read in progress(list(readers.items())):
        shape, dtype = shapes[path].shape, shapes[path].dtype

        def callback(index, read=read, shape=shape, dtype=dtype):
            nonlocal largest
            region = [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]
            values = np.asarray(read(region), dtype)
            largest = max(largest, values.nbytes)
            return values

        flat[path] = jax.make_array_from_callback(shape, shardings[path], callback)
    return flat, largest
