"""Window-level Q-Former.

SALMONN cuts encoder frames into windows of 17 (~0.33 s at 50 Hz) and lets one learned query
per window cross-attend to that window's frames through a 2-layer Q-Former: the output rate is
set by `queries / window`, and every output summarises its window rather than a fixed stack.
Pre-norm residual layers (query self-attention, cross-attention to the frames, GELU MLP);
padding frames of a partial window are masked out of the cross-attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from slm.errors import ConfigError
from slm.model.decoder import RMSNorm
from slm.model.params import normal, zeros
from slm.model.projectors.base import (Projector, check_positive, linear, register_projector)


@dataclasses.dataclass(frozen=True)
class QFormerOptions:
    window: int = 17  # frames per window (SALMONN: 17, ~0.33 s of 50 Hz frames)
    queries: int = 1  # learned queries, i.e. outputs, per window
    layers: int = 2
    hidden: int = 768  # the Q-Former's width (SALMONN: BERT-base)
    heads: int = 12

    def __post_init__(self):
        check_positive(self, "window", "queries", "layers", "hidden", "heads")
        if self.hidden % self.heads:
            raise ConfigError(f"projector.hidden={self.hidden} is not a multiple of "
                              f"projector.heads={self.heads}; pick heads that divide hidden")


def _norm(dim: int) -> RMSNorm:
    return RMSNorm(dim, 1e-6, "float32")


class _Attention(nnx.Module):
    def __init__(self, d_q: int, d_kv: int, heads: int, rngs: nnx.Rngs):
        h = d_q // heads
        self.wq = normal(rngs, (d_q, heads, h), ("embed", "heads", "head_dim"), d_q)
        self.wk = normal(rngs, (d_kv, heads, h), ("embed", "heads", "head_dim"), d_kv)
        self.wv = normal(rngs, (d_kv, heads, h), ("embed", "heads", "head_dim"), d_kv)
        self.wo = normal(rngs, (heads, h, d_q), ("heads", "head_dim", "embed"), d_q)

    def __call__(self, x_bwqd: jax.Array, kv_bwle: jax.Array,
                 mask_bwl: jax.Array | None = None) -> jax.Array:
        wq, wk, wv, wo = (p[...].astype(x_bwqd.dtype) for p in (self.wq, self.wk, self.wv, self.wo))
        q_bwqnh = jnp.einsum("bwqd,dnh->bwqnh", x_bwqd, wq)
        k_bwlnh = jnp.einsum("bwle,enh->bwlnh", kv_bwle, wk)
        v_bwlnh = jnp.einsum("bwle,enh->bwlnh", kv_bwle, wv)
        s_bwnql = jnp.einsum("bwqnh,bwlnh->bwnql", q_bwqnh, k_bwlnh) * q_bwqnh.shape[-1] ** -0.5
        if mask_bwl is not None:
            s_bwnql = jnp.where(mask_bwl[:, :, None, None, :], s_bwnql, jnp.finfo(s_bwnql.dtype).min)
        p_bwnql = jax.nn.softmax(s_bwnql, axis=-1)
        out_bwqnh = jnp.einsum("bwnql,bwlnh->bwqnh", p_bwnql, v_bwlnh)
        return jnp.einsum("bwqnh,nhd->bwqd", out_bwqnh, wo)


class _Layer(nnx.Module):
    def __init__(self, hidden: int, enc_dim: int, heads: int, rngs: nnx.Rngs):
        self.self_norm, self.self_attn = _norm(hidden), _Attention(hidden, hidden, heads, rngs)
        self.cross_norm, self.cross_attn = _norm(hidden), _Attention(hidden, enc_dim, heads, rngs)
        self.mlp_norm = _norm(hidden)
        self.w_up = normal(rngs, (hidden, 4 * hidden), ("embed", "mlp"), hidden)
        self.b_up = zeros((4 * hidden,), ("mlp",))
        self.w_down = normal(rngs, (4 * hidden, hidden), ("mlp", "embed"), 4 * hidden)
        self.b_down = zeros((hidden,), ("embed",))

    def __call__(self, q_bwqd: jax.Array, frames_bwle: jax.Array, mask_bwl: jax.Array):
        x_bwqd = self.self_norm(q_bwqd)
        q_bwqd = q_bwqd + self.self_attn(x_bwqd, x_bwqd)
        q_bwqd = q_bwqd + self.cross_attn(self.cross_norm(q_bwqd), frames_bwle, mask_bwl)
        up_bwqf = jax.nn.gelu(linear(self.mlp_norm(q_bwqd), self.w_up, self.b_up), approximate=False)
        return q_bwqd + linear(up_bwqf, self.w_down, self.b_down)


class WindowQFormer(Projector):
    Options = QFormerOptions
    shown = ("window", "queries", "layers")

    def __init__(self, enc_dim: int, d_model: int, options: QFormerOptions, rngs: nnx.Rngs):
        super().__init__(enc_dim, d_model, options, window=options.window,
                         per_window=options.queries)
        o = options
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (o.queries, o.hidden)) * 0.02,
                                 out_sharding=(None, "embed"))
        self.frame_norm = _norm(enc_dim)
        self.layers = nnx.List([_Layer(o.hidden, enc_dim, o.heads, rngs) for _ in range(o.layers)])
        self.out_norm = _norm(o.hidden)
        self.w_out = normal(rngs, (o.hidden, d_model), ("mlp", "embed"), o.hidden)
        self.b_out = zeros((d_model,), ("embed",))

    def _project(self, x_bfe: jax.Array, mask_bf: jax.Array) -> jax.Array:
        b, f, e = x_bfe.shape
        windows, q = f // self.window, self.per_window
        frames_bwle = self.frame_norm(x_bfe).reshape(b, windows, self.window, e)
        mask_bwl = mask_bf.reshape(b, windows, self.window)
        queries = self.queries[...].astype(x_bfe.dtype)
        q_bwqd = jnp.broadcast_to(queries, (b, windows, *queries.shape))
        for layer in self.layers:
            q_bwqd = layer(q_bwqd, frames_bwle, mask_bwl)
        y_bwqd = linear(self.out_norm(q_bwqd), self.w_out, self.b_out)
        return y_bwqd.reshape(b, windows * q, self.d_model)


register_projector("qformer", WindowQFormer)
