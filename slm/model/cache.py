"""Fixed-size key/value caches, so every decode step has the same shapes and compiles once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax


@struct.dataclass
class LayerCache:
    """Keys and values `[..., B, S, Kv, H]`; a stack's cache has a leading `layers` axis."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype: jnp.dtype = jnp.float32) -> "LayerCache":
        shape = (num_layers, batch, length, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def write(self, k_btkh: jax.Array, v_btkh: jax.Array, index: jax.Array | int) -> "LayerCache":
        """Store new keys/values at positions [index, index + T) of one layer's cache."""
        return LayerCache(
            k=lax.dynamic_update_slice_in_dim(self.k, k_btkh.astype(self.k.dtype), index, axis=1),
            v=lax.dynamic_update_slice_in_dim(self.v, v_btkh.astype(self.v.dtype), index, axis=1),
        )


@struct.dataclass
class DecodeState:
    """Temporal cache plus the next position to write; what a decode step carries."""

    cache: LayerCache
    index: jax.Array  # int32 scalar

    @property
    def capacity(self) -> int:
        return self.cache.k.shape[2]
