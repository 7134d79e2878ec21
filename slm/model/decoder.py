"""Llama-style decoder layers: RMSNorm, RoPE, grouped-query attention, a gated MLP.

The same layers serve the temporal decoder (weights shared over time, RoPE) and the depth
decoder (one set of weights per codebook step, no positional embedding, as Moshi's depformer).
Per-step weights carry a leading `depth_step` axis; `_project` picks the rows for the steps
being computed, so full-sequence training and one-step cached decoding run the same code.
A few switches (q/k/v biases, a (1 + scale) norm, the MLP's activation) exist so pretrained
Qwen2 and Gemma checkpoints compute exactly what they computed in their own code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from slm.errors import ConfigError
from slm.parallel.rules import constrain
from slm.model.attention import IMPLEMENTATIONS, causal_attention
from slm.model.cache import LayerCache
from slm.model.lora import LoraSpec, add_updates, adapters, site_key
from slm.model.matmul import dense, dense_side_by_side

Init = Callable[..., jax.Array]

# Gated-MLP activations: SwiGLU (Llama, Qwen2) and GeGLU with the tanh approximation (Gemma).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """Shape of a decoder stack; hashable so it can live in the module graph."""

    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float = 1e-6
    rope_theta: float | None = 10000.0  # None: no positional embedding
    steps: int | None = None  # per-step weights for this many steps (depth decoder)
    param_dtype: str = "float32"
    qkv_bias: bool = False
    norm_plus_one: bool = False
    activation: str = "silu"
    attention: str = "auto"  # the kernel, or auto: by backend (see slm.model.attention)
    lora: LoraSpec | None = None  # adapters on some of the projections (slm.model.lora)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.mlp_activation={self.activation!r}; choose one of "
                              f"{sorted(ACTIVATIONS)}")
        if self.attention not in IMPLEMENTATIONS:
            raise ConfigError(f"model.attention={self.attention!r}; choose one of {IMPLEMENTATIONS}")


def _param(rngs: nnx.Rngs, spec: StackSpec, shape: tuple, names: tuple, fan_in: int) -> nnx.Param:
    """A normal(0, 1/sqrt(fan_in)) weight, with a leading per-step axis for depth stacks."""
    if spec.steps is not None:
        shape, names = (spec.steps, *shape), ("depth_step", *names)
    value = jax.random.normal(rngs.params(), shape, jnp.dtype(spec.param_dtype)) * fan_in**-0.5
    return nnx.Param(value, out_sharding=names)


def _bias(spec: StackSpec, shape: tuple, names: tuple) -> nnx.Param:
    """A zero bias, with the same per-step axis as the weights it follows."""
    if spec.steps is not None:
        shape, names = (spec.steps, *shape), ("depth_step", *names)
    return nnx.Param(jnp.zeros(shape, jnp.dtype(spec.param_dtype)), out_sharding=names)


def _add_bias(y: jax.Array, b: jax.Array, step: int | jax.Array | None) -> jax.Array:
    """`y + b`; for per-step biases, `y`'s axis 1 indexes steps from `step` (as `_project`)."""
    if step is not None:
        b = lax.dynamic_slice_in_dim(b, step, y.shape[1], axis=0)
    return y + b.astype(y.dtype)


def _project(equation: str, x: jax.Array, w: jax.Array, step: int | jax.Array | None) -> jax.Array:
    """einsum of `x`'s last axis with `w`'s first; for per-step weights, `x`'s axis 1 indexes
    steps from `step`."""
    w = w.astype(x.dtype)  # fp32 master weights, compute in the activations' dtype
    if step is None:
        return dense(x, w)[0]
    lhs, out = equation.split("->")
    x_axes, w_axes = lhs.split(",")
    w = lax.dynamic_slice_in_dim(w, step, x.shape[1], axis=0)
    return jnp.einsum(f"{x_axes},{x_axes[1]}{w_axes}->{out}", x, w)


def _project_all(equations: tuple[str, ...], x: jax.Array, ws: tuple[jax.Array, ...],
                 step: int | jax.Array | None,
                 side_by_side_in_decode: bool = False) -> tuple[jax.Array, ...]:
    """`_project` of one input with several weights, sharing the backward pass's transpose of
    `x`; with `side_by_side_in_decode`, a decode step (one position per row) makes them one
    product (see slm.model.matmul)."""
    if step is not None:
        return tuple(_project(e, x, w, step) for e, w in zip(equations, ws))
    ws = tuple(w.astype(x.dtype) for w in ws)
    if side_by_side_in_decode and x.shape[1] == 1:
        return dense_side_by_side(x, *ws)
    return dense(x, *ws)


class RMSNorm(nnx.Module):
    """`plus_one` multiplies by (1 + scale) with scale starting at 0, as Gemma stores its norms."""

    def __init__(self, dim: int, eps: float, param_dtype: str, plus_one: bool = False):
        self.eps, self.plus_one = eps, plus_one
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (x32 * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the rotate-half convention (as HF Llama), so imported weights match.

    Written as `x * cos + roll(x) * sin` with the sign folded into `sin`: two fused elementwise
    passes, where splitting `x` in halves and concatenating the results made XLA:CPU copy the
    activation three times (3x slower, forward and backward)."""
    half = x_btnh.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions_bt[..., None].astype(jnp.float32) * freq  # [B, T, half]
    cos = jnp.concatenate([jnp.cos(angle)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([-jnp.sin(angle), jnp.sin(angle)], axis=-1)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    return (x * cos + jnp.roll(x, half, axis=-1) * sin).astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, spec: StackSpec, rngs: nnx.Rngs):
        d, n, k, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.spec = spec
        self.wq = _param(rngs, spec, (d, n, h), ("embed", "heads", "head_dim"), d)
        self.wk = _param(rngs, spec, (d, k, h), ("embed", "kv_heads", "head_dim"), d)
        self.wv = _param(rngs, spec, (d, k, h), ("embed", "kv_heads", "head_dim"), d)
        self.wo = _param(rngs, spec, (n, h, d), ("heads", "head_dim", "embed"), n * h)
        if spec.qkv_bias:
            self.bq = _bias(spec, (n, h), ("heads", "head_dim"))
            self.bk = _bias(spec, (k, h), ("kv_heads", "head_dim"))
            self.bv = _bias(spec, (k, h), ("kv_heads", "head_dim"))
        embed, heads = ((d,), ("embed",)), ((n, h), ("heads", "head_dim"))
        kv = ((k, h), ("kv_heads", "head_dim"))
        self.lora = adapters(spec.lora, {"q": (embed, heads), "k": (embed, kv), "v": (embed, kv),
                                         "o": (heads, embed)}, rngs, spec.param_dtype, spec.steps)

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        cache: LayerCache | None,
        index: jax.Array | int,
        step: int | jax.Array | None,
        start_b: jax.Array | None = None,
        segments_bt: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """`key`: dropout on the adapters' inputs (training only)."""
        qkv = _project_all(("btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh"), x_btd,
                           (self.wq[...], self.wk[...], self.wv[...]), step,
                           side_by_side_in_decode=True)
        q_btnh, k_btkh, v_btkh = add_updates(self.lora, self.spec.lora, ("q", "k", "v"), qkv,
                                             x_btd, step, site_key(key, 0))
        if self.spec.qkv_bias:
            q_btnh = _add_bias(q_btnh, self.bq[...], step)
            k_btkh = _add_bias(k_btkh, self.bk[...], step)
            v_btkh = _add_bias(v_btkh, self.bv[...], step)
        if self.spec.rope_theta is not None:
            q_btnh = apply_rope(q_btnh, positions_bt, self.spec.rope_theta)
            k_btkh = apply_rope(k_btkh, positions_bt, self.spec.rope_theta)
        if cache is None:
            out_btnh = causal_attention(q_btnh, k_btkh, v_btkh, segments_bt, self.spec.attention)
        else:
            cache = cache.write(k_btkh, v_btkh, index)
            out_btnh = cache.attend(q_btnh, index, start_b)
        # heads merged first, so XLA transposes this activation rather than copy `wo` per call
        wo = self.wo[...]
        out_btf = out_btnh.reshape(*out_btnh.shape[:2], -1)
        y_btd = _project("btf,fd->btd", out_btf, wo.reshape(*wo.shape[:-3], -1, wo.shape[-1]), step)
        (y_btd,) = add_updates(self.lora, self.spec.lora, ("o",), (y_btd,), out_btf, step,
                               site_key(key, 1))
        return y_btd, cache


class SwiGLU(nnx.Module):
    """Gated MLP `down(act(gate(x)) * up(x))`: SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, spec: StackSpec, rngs: nnx.Rngs):
        d, f = spec.d_model, spec.mlp_dim
        self.activation, self.lora_spec = spec.activation, spec.lora
        self.w_gate = _param(rngs, spec, (d, f), ("embed", "mlp"), d)
        self.w_up = _param(rngs, spec, (d, f), ("embed", "mlp"), d)
        self.w_down = _param(rngs, spec, (f, d), ("mlp", "embed"), f)
        embed, mlp = ((d,), ("embed",)), ((f,), ("mlp",))
        self.lora = adapters(spec.lora, {"gate": (embed, mlp), "up": (embed, mlp),
                                         "down": (mlp, embed)}, rngs, spec.param_dtype, spec.steps)

    def __call__(self, x_btd: jax.Array, step: int | jax.Array | None,
                 key: jax.Array | None = None) -> jax.Array:
        gate_up = _project_all(("btd,df->btf", "btd,df->btf"), x_btd,
                               (self.w_gate[...], self.w_up[...]), step)
        gate, up = add_updates(self.lora, self.lora_spec, ("gate", "up"), gate_up, x_btd, step,
                               site_key(key, 0))
        hidden = ACTIVATIONS[self.activation](gate) * up
        y_btd = _project("btf,fd->btd", hidden, self.w_down[...], step)
        (y_btd,) = add_updates(self.lora, self.lora_spec, ("down",), (y_btd,), hidden, step,
                               site_key(key, 1))
        return y_btd


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: StackSpec, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(spec.d_model, spec.norm_eps, spec.param_dtype, spec.norm_plus_one)
        self.attn = Attention(spec, rngs)
        self.mlp_norm = RMSNorm(spec.d_model, spec.norm_eps, spec.param_dtype, spec.norm_plus_one)
        self.mlp = SwiGLU(spec, rngs)

    def __call__(self, x_btd, positions_bt, cache, index, step, start_b=None, segments_bt=None,
                 key=None):
        with jax.named_scope("attention"):  # names in profiler traces
            attn_out, cache = self.attn(self.attn_norm(x_btd), positions_bt, cache, index, step,
                                        start_b, segments_bt, site_key(key, 0))
        x_btd = x_btd + attn_out
        with jax.named_scope("mlp"):
            x_btd = x_btd + self.mlp(self.mlp_norm(x_btd), step, site_key(key, 1))
        return x_btd, cache


ACTIVATION = ("batch", None, None)  # [B, T, D] between layers: split by rows, as the batch

# `model.remat`: what each decoder layer keeps for the backward pass; the rest is recomputed.
# "none" keeps everything (no recomputation); "full" keeps only the layer's input; "dots" every
# matmul output; "dots_no_batch" those without batch dimensions (the projections, not
# attention's scores); "offload" moves those to host memory and back instead of recomputing.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class DecoderStack(nnx.Module):
    """`num_layers` blocks with stacked parameters (leading `layers` axis).

    Parameters are always stacked, so a checkpoint does not depend on `scan`: scanning
    (`lax.scan`, one compiled layer) or unrolling (a Python loop over slices) is a run-time choice.
    """

    def __init__(self, spec: StackSpec, rngs: nnx.Rngs, *, scan: bool = True, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={remat!r}; choose one of {list(REMAT_POLICIES)}")
        self.spec, self.scan, self.remat = spec, scan, remat

        @nnx.split_rngs(splits=spec.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(layer_rngs: nnx.Rngs) -> Block:
            return Block(spec, layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(spec.d_model, spec.norm_eps, spec.param_dtype, spec.norm_plus_one)

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        cache: LayerCache | None = None,
        index: jax.Array | int = 0,
        step: int | jax.Array | None = None,
        layers: tuple | None = None,
        start_b: jax.Array | None = None,
        segments_bt: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """`start_b`: each row's first cache slot (see `LayerCache.attend`). `segments_bt`: the
        example each position of a packed row belongs to; positions see only their own.
        `dropout_key`: LoRA dropout in training, a key per layer drawn from it.

        `layers` (from `split_layers`) runs the layers unrolled on per-layer weights, with
        `cache` a tuple of per-layer caches: decoding does this because XLA on CPU copies a
        layer's slice out of stacked weights before its matmuls, which triples the bytes a
        memory-bound decode step moves."""
        graphdef, layer_state = nnx.split(self.layers)
        keys = (None if dropout_key is None
                else jax.random.split(dropout_key, self.spec.num_layers))

        def layer(x, state_cache_key):
            state, layer_cache, key = state_cache_key
            block = nnx.merge(graphdef, state)
            x, layer_cache = block(constrain(x, ACTIVATION), positions_bt, layer_cache, index, step,
                                   start_b, segments_bt, key)
            return constrain(x, ACTIVATION), layer_cache

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat],
                                   prevent_cse=not self.scan)
        if layers is not None:
            x_btd, cache = _unrolled(layer, x_btd, layers, cache)
        elif self.scan:
            x_btd, cache = lax.scan(layer, x_btd, (layer_state, cache, keys))
        else:
            new_caches = []
            for i in range(self.spec.num_layers):
                x_btd, layer_cache = layer(x_btd, jax.tree.map(lambda a: a[i],
                                                               (layer_state, cache, keys)))
                new_caches.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *xs: jnp.stack(xs), *new_caches)
        return self.final_norm(x_btd), cache

    def split_layers(self) -> tuple:
        """The stacked layer parameters as one state per layer, each in buffers of its own."""
        state = nnx.state(self.layers)
        return tuple(jax.tree.map(lambda a: a[i], state) for i in range(self.spec.num_layers))


def _unrolled(layer, x_btd, layers: tuple, caches: tuple) -> tuple[jax.Array, tuple]:
    new_caches = []
    for state, cache in zip(layers, caches):
        x_btd, cache = layer(x_btd, (state, cache, None))
        new_caches.append(cache)
    return x_btd, tuple(new_caches)
