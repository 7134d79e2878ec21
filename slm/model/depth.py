"""Depth decoder: predicts the Q codebooks of one step in order, coarse to fine.

As Moshi's depformer and the RQ-Transformer: depth step q sees a per-step projection of the
temporal output plus the embedding of the token one level coarser (step 0: the conditioning
stream's token, e.g. the semantic unit). Every linear layer has its own weights per step,
which also stands in for positions. Training runs all steps of all frames at once on
`[B*T, Q, D]`; decoding runs one step at a time over a Q-long cache.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from slm.model.cache import LayerCache
from slm.model.decoder import DecoderStack, StackSpec
from slm.model.heads import to_local
from slm.model.lora import Adapter, add_updates, adapters, dropout, site_key
from slm.types import Spans


class DepthDecoder(nnx.Module):
    def __init__(self, spec: StackSpec, d_temporal: int, input_spans: tuple[Spans, ...],
                 codebook_size: int, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        steps, d, dtype = spec.steps, spec.d_model, jnp.dtype(spec.param_dtype)
        if steps is None or len(input_spans) != steps:
            raise ValueError("the depth decoder needs one input span set per codebook step")
        self.input_spans, self.dtype = input_spans, jnp.dtype(dtype)
        sizes = [sum(b - a for a, b in spans) for spans in input_spans]
        self.input_offsets = tuple(itertools.accumulate(sizes[:-1], initial=0))
        normal = lambda shape, scale: jax.random.normal(rngs.params(), shape, dtype) * scale
        self.in_proj = nnx.Param(
            normal((steps, d_temporal, d), d_temporal**-0.5),
            out_sharding=("depth_step", "embed", "depth_embed"),
        )
        self.embed = nnx.Param(normal((sum(sizes), d), 1.0), out_sharding=("vocab", "embed"))
        self.stack = DecoderStack(spec, rngs, scan=False)
        self.head = nnx.Param(
            normal((steps, d, codebook_size), d**-0.5), out_sharding=("depth_step", "embed", "vocab")
        )
        self.lora_spec = spec.lora
        self.lora = adapters(spec.lora, {
            "in": (((d_temporal,), ("embed",)), ((d,), ("depth_embed",))),
            "head": (((d,), ("embed",)), ((codebook_size,), ("vocab",))),
        }, rngs, spec.param_dtype, steps)

    def _adapter(self, name: str) -> Adapter | None:
        return None if self.lora is None else self.lora.get(name)

    def _embed_prev(self, prev_token: jax.Array, step: int) -> jax.Array:
        """Embedding of the coarser token; ids outside its ranges (e.g. -1, "no input") give 0."""
        local = to_local(prev_token, self.input_spans[step])
        rows = jnp.take(self.embed[...], jnp.maximum(local, 0) + self.input_offsets[step], axis=0)
        return jnp.where((local >= 0)[..., None], rows, 0)

    def __call__(self, h_btd: jax.Array, prev_tokens_btq: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits `[B, T, Q, C]` for all steps of all frames."""
        b, t, q = prev_tokens_btq.shape
        x_btqe = jnp.einsum("btd,qde->btqe", h_btd, self.in_proj[...].astype(h_btd.dtype))
        if (adapter := self._adapter("in")) is not None:  # every step reads the same h_btd
            h_btd = dropout(h_btd, self.lora_spec.dropout, site_key(dropout_key, 0))
            xa_btqr = jnp.einsum("btd,qdr->btqr", h_btd, adapter.flat_a(h_btd.dtype))
            x_btqe = x_btqe + jnp.einsum("btqr,qre->btqe", xa_btqr * self.lora_spec.scale,
                                         adapter.b[...].astype(h_btd.dtype))
        prev_btqe = jnp.stack(
            [self._embed_prev(prev_tokens_btq[:, :, s], s) for s in range(q)], axis=2
        )
        x_nqe = (x_btqe + prev_btqe.astype(x_btqe.dtype)).reshape(b * t, q, -1)
        h_nqe, _ = self.stack(x_nqe, jnp.zeros((b * t, q), jnp.int32), step=0,
                              dropout_key=site_key(dropout_key, 1))
        logits_nqc = jnp.einsum("nqe,qec->nqc", h_nqe, self.head[...].astype(h_nqe.dtype))
        (logits_nqc,) = add_updates(self.lora, self.lora_spec, ("head",), (logits_nqc,), h_nqe,
                                    0, site_key(dropout_key, 2))
        return logits_nqc.reshape(b, t, q, -1).astype(jnp.float32)

    def step(self, h_bd: jax.Array, prev_token_b: jax.Array, step: int,
             cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """Logits `[B, C]` of codebook `step`, given the token of step-1 (cache holds steps < step)."""
        x_be = h_bd @ self.in_proj[step].astype(h_bd.dtype)
        if (adapter := self._adapter("in")) is not None:
            x_be = x_be + adapter.at(h_bd, step, self.lora_spec.scale)
        x_b1e = (x_be + self._embed_prev(prev_token_b, step).astype(x_be.dtype))[:, None]
        positions = jnp.zeros(x_b1e.shape[:2], jnp.int32)
        h_b1e, cache = self.stack(x_b1e, positions, cache, index=step, step=step)
        logits_bc = h_b1e[:, 0] @ self.head[step].astype(h_b1e.dtype)
        if (adapter := self._adapter("head")) is not None:
            logits_bc = logits_bc + adapter.at(h_b1e[:, 0], step, self.lora_spec.scale)
        return logits_bc.astype(jnp.float32), cache

    def init_cache(self, batch: int) -> LayerCache:
        spec = self.stack.spec
        return LayerCache.zeros(spec.num_layers, batch, spec.steps, spec.num_kv_heads,
                                spec.head_dim, self.dtype)
