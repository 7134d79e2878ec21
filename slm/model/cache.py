"""Fixed-size key/value caches, so every decode step has the same shapes and compiles once.

Keys are stored `[B * Kv, S, H]` and values `[B * Kv, H, S]`: attention is one batch of
products per (row, head) pair, summing over `H` for `q * K` and over `S` for `p * V`. With the
pairs on one leading axis and each summed axis minor, XLA reads the cache where it lies (no
transposed or reshaped copy of it on every decode step) and updates it in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax


@struct.dataclass
class LayerCache:
    """Keys `[..., B * Kv, S, H]`, values `[..., B * Kv, H, S]`; a stack's cache has a leading
    `layers` axis."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype: jnp.dtype = jnp.float32) -> "LayerCache":
        rows = batch * num_kv_heads
        return cls(k=jnp.zeros((num_layers, rows, length, head_dim), dtype),
                   v=jnp.zeros((num_layers, rows, head_dim, length), dtype))

    @classmethod
    def per_layer(cls, num_layers: int, batch: int, length: int, num_kv_heads: int,
                  head_dim: int, dtype: jnp.dtype = jnp.float32) -> tuple["LayerCache", ...]:
        """One cache per layer, for decoding with per-layer weights."""
        rows = batch * num_kv_heads
        return tuple(cls(k=jnp.zeros((rows, length, head_dim), dtype),
                         v=jnp.zeros((rows, head_dim, length), dtype))
                     for _ in range(num_layers))

    def write(self, k_btkh: jax.Array, v_btkh: jax.Array, index: jax.Array | int) -> "LayerCache":
        """Store new keys/values at positions [index, index + T) of one layer's cache."""
        b, t, kv, h = k_btkh.shape
        k_xth = jnp.swapaxes(k_btkh, 1, 2).reshape(b * kv, t, h).astype(self.k.dtype)
        v_xht = jnp.transpose(v_btkh, (0, 2, 3, 1)).reshape(b * kv, h, t).astype(self.v.dtype)
        return LayerCache(k=lax.dynamic_update_slice_in_dim(self.k, k_xth, index, axis=1),
                          v=lax.dynamic_update_slice_in_dim(self.v, v_xht, index, axis=2))

    def attend(self, q_btnh: jax.Array, index: jax.Array | int,
               start_b: jax.Array | None = None) -> jax.Array:
        """Attention of T queries at positions [index, index + T) over one layer's cache, each
        seeing the positions up to its own and none before its row's `start_b` (left padding);
        query head n reads key/value head n // (N / Kv)."""
        b, t, n, h = q_btnh.shape
        x, s = self.k.shape[0], self.k.shape[1]
        kv, g = x // b, n * b // x
        q_xmh = jnp.transpose(q_btnh.reshape(b, t, kv, g, h), (0, 2, 3, 1, 4))
        q_xmh = q_xmh.reshape(x, g * t, h).astype(self.k.dtype)
        scores = jnp.einsum("xmh,xsh->xms", q_xmh, self.k,
                            preferred_element_type=jnp.float32) * h**-0.5
        slots = jnp.arange(s)
        visible_bts = (slots[None, None, :] <= (index + jnp.arange(t))[None, :, None])
        if start_b is not None:
            visible_bts = visible_bts & (slots[None, None, :] >= start_b[:, None, None])
        scores = jnp.where(visible_bts[:, None, None], scores.reshape(b, kv, g, t, s),
                           jnp.finfo(jnp.float32).min).reshape(x, g * t, s)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.v.dtype)
        out_xmh = jnp.einsum("xms,xhs->xmh", probs, self.v)
        out_btkgh = jnp.transpose(out_xmh.reshape(b, kv, g, t, h), (0, 3, 1, 2, 4))
        return out_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


@struct.dataclass
class DecodeState:
    """Temporal cache plus the next position to write; what a decode step carries."""

    cache: LayerCache | tuple[LayerCache, ...]  # stacked, or one per layer
    index: jax.Array  # int32 scalar
    start: jax.Array  # int32 [B]: each row's first slot; the slots before it are left padding,
    # which lets prompts of different lengths share a batch and one compiled prefill

    @property
    def capacity(self) -> int:
        first = self.cache[0] if isinstance(self.cache, tuple) else self.cache
        return first.k.shape[-2]
