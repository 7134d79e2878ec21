"""Fixed-size key/value caches, so every decode step has the same shapes and compiles once.

Keys are stored `[B, Kv, S, H]` and values `[B, Kv, H, S]`: attention is one batch of products
per (row, head) pair, summing over `H` for `q * K` and over `S` for `p * V`. With the pairs on
the leading axes and each summed axis minor, XLA reads the cache where it lies (no transposed
or reshaped copy of it on every decode step) and updates it in place. Rows and heads stay two
axes so that a mesh splits them as the rest of the model: rows as the batch (`data`), heads as
the key/value heads (`tensor`), each device then holding the cache its own heads read.

One attention code path serves every backend: a decode step is one query per row, so there is
no query tile for a flash kernel to work on, and the step is bound by reading the cache, which
these products do once, in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec

from slm.parallel.rules import constrain

KEY_AXES = ("batch", "kv_heads", None, "head_dim")  # logical names, as slm.parallel.rules
VALUE_AXES = ("batch", "kv_heads", "head_dim", None)


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

    def axes(self) -> "LayerCache":
        """The logical names of this cache's axes (PartitionSpecs of names, see
        `slm.parallel.rules.tree_shardings`); a stacked cache's leading axis is `layers`."""
        lead = ("layers",) * (self.k.ndim - len(KEY_AXES))
        return LayerCache(k=PartitionSpec(*lead, *KEY_AXES), v=PartitionSpec(*lead, *VALUE_AXES))

    def write(self, k_btkh: jax.Array, v_btkh: jax.Array, index: jax.Array | int) -> "LayerCache":
        """Store new keys/values at positions [index, index + T) of one layer's cache."""
        k_bkth = jnp.transpose(k_btkh, (0, 2, 1, 3)).astype(self.k.dtype)
        v_bkht = jnp.transpose(v_btkh, (0, 2, 3, 1)).astype(self.v.dtype)
        return LayerCache(
            k=constrain(lax.dynamic_update_slice_in_dim(self.k, k_bkth, index, axis=2), KEY_AXES),
            v=constrain(lax.dynamic_update_slice_in_dim(self.v, v_bkht, index, axis=3), VALUE_AXES))

    def attend(self, q_btnh: jax.Array, index: jax.Array | int,
               start_b: jax.Array | None = None) -> jax.Array:
        """Attention of T queries at positions [index, index + T) over one layer's cache, each
        seeing the positions up to its own and none before its row's `start_b` (left padding);
        query head n reads key/value head n // (N / Kv)."""
        b, t, n, h = q_btnh.shape
        kv, s = self.k.shape[1], self.k.shape[2]
        g = n // kv
        q_bkmh = jnp.transpose(q_btnh.reshape(b, t, kv, g, h), (0, 2, 3, 1, 4))
        q_bkmh = q_bkmh.reshape(b, kv, g * t, h).astype(self.k.dtype)
        scores = jnp.einsum("bkmh,bksh->bkms", q_bkmh, self.k,
                            preferred_element_type=jnp.float32) * h**-0.5
        slots = jnp.arange(s)
        visible_bts = (slots[None, None, :] <= (index + jnp.arange(t))[None, :, None])
        if start_b is not None:
            visible_bts = visible_bts & (slots[None, None, :] >= start_b[:, None, None])
        scores = jnp.where(visible_bts[:, None, None], scores.reshape(b, kv, g, t, s),
                           jnp.finfo(jnp.float32).min).reshape(b, kv, g * t, s)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.v.dtype)
        out_bkmh = jnp.einsum("bkms,bkhs->bkmh", probs, self.v)
        out_btkgh = jnp.transpose(out_bkmh.reshape(b, kv, g, t, h), (0, 3, 1, 2, 4))
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
