"""Stream embeddings and per-stream output heads over slices of the flat vocabulary.

A stream may only hold ids from some vocabulary ranges (its `spans`). Its head predicts over
exactly those ids, in a *local* index space 0..V_k-1 (span after span), so a speech head never
spends a row on text and sampling masks come for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slm.errors import ConfigError
from slm.model.lora import LoraSpec, add_updates, adapters
from slm.model.matmul import dense_rows
from slm.types import Spans, StreamSpec


def to_local(ids: jax.Array, spans: Spans) -> jax.Array:
    """Flat ids -> local head indices; ids outside the spans map to -1."""
    local = jnp.full(ids.shape, -1, jnp.int32)
    offset = 0
    for start, stop in spans:
        inside = (ids >= start) & (ids < stop)
        local = jnp.where(inside, ids - start + offset, local)
        offset += stop - start
    return local


def to_flat(local: jax.Array, spans: Spans) -> jax.Array:
    """Local head indices -> flat ids (inverse of `to_local` on valid indices)."""
    flat = jnp.zeros(local.shape, jnp.int32)
    offset = 0
    for start, stop in spans:
        inside = (local >= offset) & (local < offset + stop - start)
        flat = jnp.where(inside, local - offset + start, flat)
        offset += stop - start
    return flat


def _normal(rngs: nnx.Rngs, shape: tuple, scale: float, dtype: str) -> jax.Array:
    return jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)) * scale


class StreamEmbedding(nnx.Module):
    """One table over the flat vocabulary plus a learned vector per stream, combined per step.

    A shared table keeps tied heads and vocabulary expansion simple; the stream vector tells
    apart the same id in two streams. Negative ids mean "no input" and contribute nothing
    (Moshi's zero-embedding sentinel). `scale` multiplies the combined embedding (Gemma scales
    by sqrt(d_model)); tied heads still read the unscaled table, as Gemma's do.
    """

    def __init__(self, vocab_size: int, num_streams: int, d_model: int, combine: str,
                 rngs: nnx.Rngs, param_dtype: str = "float32", scale: float = 1.0):
        if combine not in ("sum", "mean"):
            raise ConfigError(f"stream_combine={combine!r}; choose 'sum' or 'mean'")
        self.combine, self.scale = combine, scale
        self.table = nnx.Param(
            _normal(rngs, (vocab_size, d_model), 1.0, param_dtype), out_sharding=("vocab", "embed")
        )
        self.stream = nnx.Param(
            _normal(rngs, (num_streams, d_model), 0.02, param_dtype), out_sharding=("streams", "embed")
        )

    def __call__(self, tokens_bkt: jax.Array, dtype: jnp.dtype) -> jax.Array:
        present_bkt = tokens_bkt >= 0
        rows_bktd = jnp.take(self.table[...], jnp.maximum(tokens_bkt, 0), axis=0)
        rows_bktd = rows_bktd + self.stream[...][None, :, None, :]
        x_btd = jnp.sum(jnp.where(present_bkt[..., None], rows_bktd, 0), axis=1)
        if self.combine == "mean":
            x_btd = x_btd / tokens_bkt.shape[1]
        if self.scale != 1.0:
            x_btd = x_btd * jnp.asarray(self.scale, x_btd.dtype)
        return x_btd.astype(dtype)


class TemporalHeads(nnx.Module):
    """All temporal-stream heads as one matmul, split per stream afterwards.

    Tied heads read their rows from the embedding table; untied heads own a `[D, sum V_k]` matrix.
    """

    def __init__(self, streams: tuple[StreamSpec, ...], d_model: int, tied: bool,
                 rngs: nnx.Rngs, param_dtype: str = "float32", lora: LoraSpec | None = None):
        self.streams = streams
        self.tied = tied
        total = sum(s.size for s in streams)
        if not tied:
            self.w = nnx.Param(
                _normal(rngs, (d_model, total), d_model**-0.5, param_dtype),
                out_sharding=("embed", "vocab"),
            )
        self.lora_spec = lora
        self.lora = adapters(lora, {"heads": (((d_model,), ("embed",)), ((total,), ("vocab",)))},
                             rngs, param_dtype)

    def __call__(self, h_btd: jax.Array, table: jax.Array,
                 dropout_key: jax.Array | None = None) -> list[jax.Array]:
        """Logits per temporal stream, `[B, T, V_k]` in float32."""
        if self.tied:  # contract the table's rows as stored: a transposed copy per call would
            # move as many bytes as the matmul reads, which a decode step cannot afford
            rows = [table[start:stop] for s in self.streams for start, stop in s.spans]
            w_vd = jnp.concatenate(rows, axis=0).astype(h_btd.dtype)
            logits_btv = dense_rows(h_btd, w_vd)
        else:
            logits_btv = jnp.einsum("btd,dv->btv", h_btd, self.w[...].astype(h_btd.dtype))
        (logits_btv,) = add_updates(self.lora, self.lora_spec, ("heads",), (logits_btv,), h_btd,
                                    key=dropout_key)
        logits_btv = logits_btv.astype(jnp.float32)
        bounds, start = [], 0
        for s in self.streams:
            bounds.append((start, start + s.size))
            start += s.size
        return [logits_btv[..., a:b] for a, b in bounds]
