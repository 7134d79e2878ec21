"""Fixed-size key/value caches, so every decode step has the same shapes and compiles once.

Keys are stored `[B, Kv, S, H]` and values `[B, Kv, H, S]`: a decode step's attention is,
per (row, head) pair, a sum over `H` of `q * K` and a sum over `S` of `p * V`, and with each
summed axis minor XLA reads the cache where it lies instead of transposing a copy of it on
every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax


@struct.dataclass
class LayerCache:
    """Keys `[..., B, Kv, S, H]`, values `[..., B, Kv, H, S]`; a stack's cache has a leading
    `layers` axis."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype: jnp.dtype = jnp.float32) -> "LayerCache":
        return cls(k=jnp.zeros((num_layers, batch, num_kv_heads, length, head_dim), dtype),
                   v=jnp.zeros((num_layers, batch, num_kv_heads, head_dim, length), dtype))

    @classmethod
    def per_layer(cls, num_layers: int, batch: int, length: int, num_kv_heads: int,
                  head_dim: int, dtype: jnp.dtype = jnp.float32) -> tuple["LayerCache", ...]:
        """One cache per layer, for decoding with per-layer weights."""
        return tuple(cls(k=jnp.zeros((batch, num_kv_heads, length, head_dim), dtype),
                         v=jnp.zeros((batch, num_kv_heads, head_dim, length), dtype))
                     for _ in range(num_layers))

    def write(self, k_btkh: jax.Array, v_btkh: jax.Array, index: jax.Array | int) -> "LayerCache":
        """Store new keys/values at positions [index, index + T) of one layer's cache."""
        k_bkth = jnp.swapaxes(k_btkh, 1, 2).astype(self.k.dtype)
        v_bkht = jnp.transpose(v_btkh, (0, 2, 3, 1)).astype(self.v.dtype)
        return LayerCache(k=lax.dynamic_update_slice_in_dim(self.k, k_bkth, index, axis=2),
                          v=lax.dynamic_update_slice_in_dim(self.v, v_bkht, index, axis=3))

    def attend(self, q_btnh: jax.Array, index: jax.Array | int) -> jax.Array:
        """Attention of T queries at positions [index, index + T) over one layer's cache, each
        seeing the positions up to its own; query head n reads key/value head n // (N / Kv)."""
        b, t, n, h = q_btnh.shape
        kv, s = self.k.shape[1], self.k.shape[2]
        q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h).astype(self.k.dtype)
        scores = jnp.einsum("btkgh,bksh->bkgts", q_btkgh, self.k,
                            preferred_element_type=jnp.float32) * h**-0.5
        visible_ts = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]
        scores = jnp.where(visible_ts, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.v.dtype)
        out_btkgh = jnp.einsum("bkgts,bkhs->btkgh", probs, self.v)
        return out_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


@struct.dataclass
class DecodeState:
    """Temporal cache plus the next position to write; what a decode step carries."""

    cache: LayerCache | tuple[LayerCache, ...]  # stacked, or one per layer
    index: jax.Array  # int32 scalar

    @property
    def capacity(self) -> int:
        first = self.cache[0] if isinstance(self.cache, tuple) else self.cache
        return first.k.shape[-2]
