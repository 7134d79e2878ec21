"""The transformer pieces every speech encoder here shares (HuBERT, WavLM, Whisper).

Pre-LN or post-LN layers stacked on a leading `layers` axis and run by `lax.scan`, as slm's
decoder, so a 24-layer encoder compiles one layer; the scan also yields every layer's input,
which is what transformers' `output_hidden_states=True` returns. WavLM's gated relative
position bias is a switch in the attention, not a second attention.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from slm.errors import AudioError
from slm.model.decoder import ACTIVATION
from slm.model.encoders.hf_weights import Tensor, matrix, norm, vector
from slm.model.params import normal, zeros
from slm.parallel.rules import constrain

ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "relu": jax.nn.relu}


class EncoderOutput(NamedTuple):
    hidden_lbtd: jax.Array  # HF's hidden_states stacked: every layer's input, then the output
    last_btd: jax.Array  # HF's last_hidden_state


class SpeechEncoder(nnx.Module):
    """What the registry loads and projectors consume: `encode` (jitted) maps waves (or, for
    Whisper, log-mel features) to `[B, frames, dim]` at `frame_rate` Hz.

    A subclass implements `model_inputs` (what `encode` takes -> what HF's forward takes) and
    `__call__` (HF's forward, -> `EncoderOutput`), and says how transformers stores it:
    `ARCHITECTURES` (model_type -> architecture -> prefix of the encoder's tensors),
    `spec_from_hf(HFConfig)`, and `hf_tensors()` (parameter path -> `hf_weights.Tensor`)."""

    ARCHITECTURES: ClassVar[dict[str, dict[str, str]]]
    dim: int
    frame_rate: float

    def encode(self, wave_or_features) -> jax.Array:
        return _encode(self, jnp.asarray(wave_or_features, jnp.float32))


@nnx.jit
def _encode(encoder: SpeechEncoder, x: jax.Array) -> jax.Array:
    return encoder(encoder.model_inputs(x)).last_btd


def waves(x: jax.Array, min_samples: int) -> jax.Array:
    """`[samples]` or `[batch, samples]` mono waves as `[batch, samples]`, long enough."""
    if x.ndim not in (1, 2):
        raise AudioError(f"waves have shape {x.shape}; expected mono [samples] or [batch, samples]")
    if x.shape[-1] < min_samples:
        raise AudioError(f"{x.shape[-1]} samples are fewer than the encoder's receptive field "
                         f"({min_samples}); pad or drop such short clips")
    return x.reshape(-1, x.shape[-1])


class LayerNorm(nnx.Module):
    """torch's LayerNorm over `axis` (biased variance); over time (axis 1) it is the per-channel
    GroupNorm wav2vec-style first convolutions use. Scale and bias act on the last axis."""

    def __init__(self, dim: int, eps: float, axis: int = -1):
        self.eps, self.axis = eps, axis
        self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=("norm",))
        self.bias = zeros((dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(self.axis, keepdims=True)
        var = jnp.square(x - mean).mean(self.axis, keepdims=True)
        return (x - mean) * lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def conv1d(x_btc: jax.Array, w_kio: jax.Array, stride: int = 1, padding: int = 0,
           groups: int = 1) -> jax.Array:
    """torch's Conv1d on time-major activations; kernels are stored `[K, C_in/groups, C_out]`."""
    return lax.conv_general_dilated(x_btc, w_kio, (stride,), [(padding, padding)],
                                    dimension_numbers=("NWC", "WIO", "NWC"),
                                    feature_group_count=groups)


class Conv(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        self.stride, self.padding = stride, padding
        self.w = normal(rngs, (kernel, c_in, c_out), (None, "embed", "mlp"), kernel * c_in)
        self.b = zeros((c_out,), ("mlp",)) if bias else None

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        y_btc = conv1d(x_btc, self.w[...], self.stride, self.padding)
        return y_btc if self.b is None else y_btc + self.b[...]


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    norm_eps: float
    activation: str  # a key of ACTIVATIONS
    pre_norm: bool  # x + f(norm(x)) (Whisper, stable-LN HuBERT/WavLM), else norm(x + f(x))
    key_bias: bool  # Whisper's k_proj has no bias
    gated_bias: bool = False  # WavLM: a per-query gate on a relative position bias


class Attention(nnx.Module):
    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        d, n = spec.d_model, spec.num_heads
        h = d // n
        self.wq, self.wk, self.wv = (normal(rngs, (d, n, h), ("embed", "heads", "head_dim"), d)
                                     for _ in range(3))
        self.bq, self.bv = (zeros((n, h), ("heads", "head_dim")) for _ in range(2))
        self.bk = zeros((n, h), ("heads", "head_dim")) if spec.key_bias else None
        self.wo = normal(rngs, (n, h, d), ("heads", "head_dim", "embed"), d)
        self.bo = zeros((d,), ("norm",))
        if spec.gated_bias:
            self.gate_w = normal(rngs, (h, 8), ("head_dim", None), h)
            self.gate_b = zeros((8,), (None,))
            self.gate_scale = nnx.Param(jnp.ones((n,)), out_sharding=("heads",))

    def __call__(self, x_btd: jax.Array, bias_nts: jax.Array | None) -> jax.Array:
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...]) + self.bq[...]
        k_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.wk[...])
        if self.bk is not None:
            k_btnh = k_btnh + self.bk[...]
        v_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.wv[...]) + self.bv[...]
        scores_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh * q_btnh.shape[-1] ** -0.5, k_btnh)
        if bias_nts is not None:
            scores_bnts = scores_bnts + self._gate_bnt(x_btd)[..., None] * bias_nts
        probs_bnts = jax.nn.softmax(scores_bnts, axis=-1)
        out_btnh = jnp.einsum("bnts,bsnh->btnh", probs_bnts, v_btnh)
        return jnp.einsum("btnh,nhd->btd", out_btnh, self.wo[...]) + self.bo[...]

    def _gate_bnt(self, x_btd: jax.Array) -> jax.Array:
        """WavLM's gate: each head reads its slice of the input, so how much relative position
        matters varies by content (HF's gru_rel_pos_linear/const, a GRU-like a*(b*c - 1) + 2)."""
        n = self.gate_scale[...].shape[0]
        x_btnh = x_btd.reshape(*x_btd.shape[:2], n, -1)
        proj_btng = jnp.einsum("btnh,hg->btng", x_btnh, self.gate_w[...]) + self.gate_b[...]
        proj_btn2 = proj_btng.reshape(*proj_btng.shape[:3], 2, 4).sum(-1)
        a_btn, b_btn = jnp.moveaxis(jax.nn.sigmoid(proj_btn2), -1, 0)
        gate_btn = a_btn * (b_btn * self.gate_scale[...] - 1.0) + 2.0
        return gate_btn.transpose(0, 2, 1)


class FeedForward(nnx.Module):
    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        d, f = spec.d_model, spec.mlp_dim
        self.activation = spec.activation
        self.w1, self.b1 = normal(rngs, (d, f), ("embed", "mlp"), d), zeros((f,), ("mlp",))
        self.w2, self.b2 = normal(rngs, (f, d), ("mlp", "embed"), f), zeros((d,), ("norm",))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h_btf = ACTIVATIONS[self.activation](x_btd @ self.w1[...] + self.b1[...])
        return h_btf @ self.w2[...] + self.b2[...]


class Layer(nnx.Module):
    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        self.pre_norm = spec.pre_norm
        self.attn_norm = LayerNorm(spec.d_model, spec.norm_eps)
        self.attn = Attention(spec, rngs)
        self.mlp_norm = LayerNorm(spec.d_model, spec.norm_eps)
        self.mlp = FeedForward(spec, rngs)

    def __call__(self, x_btd: jax.Array, bias_nts: jax.Array | None) -> jax.Array:
        if self.pre_norm:
            x_btd = x_btd + self.attn(self.attn_norm(x_btd), bias_nts)
            return x_btd + self.mlp(self.mlp_norm(x_btd))
        x_btd = self.attn_norm(x_btd + self.attn(x_btd, bias_nts))
        return self.mlp_norm(x_btd + self.mlp(x_btd))


class Stack(nnx.Module):
    """`num_layers` layers with stacked parameters, scanned."""

    def __init__(self, spec: TransformerSpec, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=spec.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(layer_rngs: nnx.Rngs) -> Layer:
            return Layer(spec, layer_rngs)

        self.layers = make_layers(rngs)

    def __call__(self, x_btd: jax.Array,
                 bias_nts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The last layer's output, and every layer's input `[layers, B, T, D]`."""
        graphdef, state = nnx.split(self.layers)

        def layer(x, layer_state):
            x = constrain(x, ACTIVATION)
            return nnx.merge(graphdef, layer_state)(x, bias_nts), x

        return lax.scan(layer, x_btd, state)


def stack_tensors(spec: TransformerSpec, layer: str, attn: str, attn_norm: str, fc1: str,
                  fc2: str) -> dict[tuple, Tensor]:
    """HF sources of a `Stack`'s parameters; the names differ by model, the layouts do not."""
    d, n, f = spec.d_model, spec.num_heads, spec.mlp_dim
    h = d // n
    attn = f"{layer}{attn}."
    tensors = {("attn", "wo"): Tensor((attn + "out_proj.weight",), (d, d),
                                      lambda w: w.T.reshape(n, h, d)),
               ("attn", "bo"): vector(attn + "out_proj.bias", d),
               **norm(("attn_norm",), layer + attn_norm, d),
               **norm(("mlp_norm",), layer + "final_layer_norm", d),
               ("mlp", "w1"): matrix(f"{layer}{fc1}.weight", f, d),
               ("mlp", "b1"): vector(f"{layer}{fc1}.bias", f),
               ("mlp", "w2"): matrix(f"{layer}{fc2}.weight", d, f),
               ("mlp", "b2"): vector(f"{layer}{fc2}.bias", d)}
    for x in "qkv":  # HF [n*h, d] -> [d, n, h]
        tensors[("attn", f"w{x}")] = Tensor((f"{attn}{x}_proj.weight",), (d, d),
                                            lambda w: w.T.reshape(d, n, h))
        if x != "k" or spec.key_bias:
            tensors[("attn", f"b{x}")] = Tensor((f"{attn}{x}_proj.bias",), (d,),
                                                lambda b: b.reshape(n, h))
    if spec.gated_bias:
        tensors[("attn", "gate_w")] = matrix(attn + "gru_rel_pos_linear.weight", 8, h)
        tensors[("attn", "gate_b")] = vector(attn + "gru_rel_pos_linear.bias", 8)
        tensors[("attn", "gate_scale")] = Tensor((attn + "gru_rel_pos_const",), (1, n, 1, 1),
                                                 lambda c: c.reshape(n))
    return {("stack", "layers", *path): t for path, t in tensors.items()}
