"""HuBERT and WavLM (one encoder), and the transformer pieces Whisper's encoder shares.

HuBERT and WavLM are one network: strided convolutions over the waveform (group norm after the
first for `feat_extract_norm="group"`, layer norm after each for `"layer"`), a projection, a
grouped weight-norm convolution as positional embedding, and a transformer that is post-LN
(`do_stable_layer_norm=False`) or pre-LN (`True`). WavLM adds a gated relative position bias:
one bucketed table (HF keeps it in layer 0) that every layer scales per head and query by a gate
computed from its own input. `Wav2VecEncoder` computes both, as transformers' `HubertModel` and
`WavLMModel` do in eval mode.

Layers are stacked on a leading `layers` axis and run by `lax.scan`, as slm's decoder, so a
24-layer encoder compiles one layer; the scan also yields every layer's input, which is what
HF's `output_hidden_states=True` returns.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from slm.errors import AudioError
from slm.model.decoder import ACTIVATION
from slm.model.encoders.hf_weights import HFConfig, Tensor, kernel, matrix, norm, vector
from slm.parallel.rules import constrain

ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "relu": jax.nn.relu}


def _weight(rngs: nnx.Rngs, shape: tuple, names: tuple, fan_in: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape) * fan_in**-0.5, out_sharding=names)


def _zeros(shape: tuple, names: tuple) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape), out_sharding=names)


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
        self.bias = _zeros((dim,), ("norm",))

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
        self.w = _weight(rngs, (kernel, c_in, c_out), (None, "embed", "mlp"), kernel * c_in)
        self.b = _zeros((c_out,), ("mlp",)) if bias else None

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
        self.wq, self.wk, self.wv = (_weight(rngs, (d, n, h), ("embed", "heads", "head_dim"), d)
                                     for _ in range(3))
        self.bq, self.bv = (_zeros((n, h), ("heads", "head_dim")) for _ in range(2))
        self.bk = _zeros((n, h), ("heads", "head_dim")) if spec.key_bias else None
        self.wo = _weight(rngs, (n, h, d), ("heads", "head_dim", "embed"), d)
        self.bo = _zeros((d,), ("norm",))
        if spec.gated_bias:
            self.gate_w = _weight(rngs, (h, 8), ("head_dim", None), h)
            self.gate_b = _zeros((8,), (None,))
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
        self.w1, self.b1 = _weight(rngs, (d, f), ("embed", "mlp"), d), _zeros((f,), ("mlp",))
        self.w2, self.b2 = _weight(rngs, (f, d), ("mlp", "embed"), f), _zeros((d,), ("norm",))

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


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """WavLM's (T5-style) bucket of every (query, key) offset, in HF's float32 arithmetic so
    offsets on a bucket edge land where HF puts them: exact below `max_exact`, log-spaced up to
    `max_distance`, one half of the buckets for keys after the query."""
    half = num_buckets // 2
    max_exact = half // 2
    offset_ts = np.arange(length)[None, :] - np.arange(length)[:, None]
    distance_ts = np.abs(offset_ts)
    scaled = np.log(np.maximum(distance_ts, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large_ts = np.minimum((max_exact + scaled).astype(np.int64), half - 1)
    return (offset_ts > 0) * half + np.where(distance_ts < max_exact, distance_ts, large_ts)


@dataclasses.dataclass(frozen=True)
class Wav2VecSpec:
    convs: tuple[tuple[int, int, int], ...]  # (channels, kernel, stride) of each convolution
    conv_bias: bool
    conv_norm: str  # "group": after the first convolution only; "layer": after each
    conv_activation: str
    proj_norm: bool  # HuBERT's feat_proj_layer_norm; WavLM always normalises
    pos_kernel: int
    pos_groups: int
    stack: TransformerSpec
    rel_pos: tuple[int, int] | None = None  # WavLM: (num_buckets, max_bucket_distance)
    sample_rate: int = 16000
    normalize: bool = False  # the feature extractor's do_normalize: zero mean, unit variance


class ConvBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, norm: str | None,
                 spec: Wav2VecSpec, rngs: nnx.Rngs):
        self.activation = spec.conv_activation
        self.conv = Conv(c_in, c_out, kernel, rngs, stride=stride, bias=spec.conv_bias)
        self.norm = None if norm is None else LayerNorm(c_out, 1e-5, 1 if norm == "group" else -1)

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        x_btc = self.conv(x_btc)
        return ACTIVATIONS[self.activation](x_btc if self.norm is None else self.norm(x_btc))


class PositionalConv(nnx.Module):
    """A grouped convolution whose output is added to its input: the relative position signal
    of HuBERT/WavLM. Weight-normalised per kernel tap (torch's weight_norm with dim=2), kept as
    direction `v` and magnitude `g` so training updates them as HF does."""

    def __init__(self, d: int, kernel: int, groups: int, rngs: nnx.Rngs):
        self.kernel, self.groups = kernel, groups
        v = jax.random.normal(rngs.params(), (kernel, d // groups, d))
        self.v = nnx.Param(v, out_sharding=(None, "embed", "mlp"))
        self.g = nnx.Param(jnp.sqrt(jnp.square(v).sum((1, 2))), out_sharding=(None,))
        self.b = _zeros((d,), ("mlp",))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        v = self.v[...]
        w = v * (self.g[...] * lax.rsqrt(jnp.square(v).sum((1, 2))))[:, None, None]
        y_btd = conv1d(x_btd, w, padding=self.kernel // 2, groups=self.groups) + self.b[...]
        y_btd = y_btd[:, :x_btd.shape[1]]  # an even kernel makes one frame too many
        return jax.nn.gelu(y_btd, approximate=False)


class Wav2VecEncoder(SpeechEncoder):
    """HuBERT or WavLM on waves `[B, samples]`. There are no padding masks, so the rows of a
    batch share a length: zeros padding a shorter clip would reach its frames through the
    group norm and the attention."""

    ARCHITECTURES: ClassVar[dict[str, dict[str, str]]] = {
        "hubert": {"HubertModel": "", "HubertForCTC": "hubert.",
                   "HubertForSequenceClassification": "hubert."},
        "wavlm": {"WavLMModel": "", "WavLMForCTC": "wavlm.",
                  "WavLMForSequenceClassification": "wavlm.",
                  "WavLMForAudioFrameClassification": "wavlm.", "WavLMForXVector": "wavlm."},
    }

    def __init__(self, spec: Wav2VecSpec, rngs: nnx.Rngs):
        self.spec = spec
        d = spec.stack.d_model
        channels = [1] + [c for c, _, _ in spec.convs]
        norms = [spec.conv_norm if spec.conv_norm == "layer" or j == 0 else None
                 for j in range(len(spec.convs))]
        self.convs = nnx.List([ConvBlock(channels[j], c, k, s, norms[j], spec, rngs)
                               for j, (c, k, s) in enumerate(spec.convs)])
        self.proj_norm = LayerNorm(channels[-1], spec.stack.norm_eps) if spec.proj_norm else None
        self.proj_w = _weight(rngs, (channels[-1], d), ("mlp", "embed"), channels[-1])
        self.proj_b = _zeros((d,), ("norm",))
        self.pos_conv = PositionalConv(d, spec.pos_kernel, spec.pos_groups, rngs)
        self.norm = LayerNorm(d, spec.stack.norm_eps)
        self.rel_table = (None if spec.rel_pos is None else nnx.Param(
            jax.random.normal(rngs.params(), (spec.rel_pos[0], spec.stack.num_heads)),
            out_sharding=(None, "heads")))
        self.stack = Stack(spec.stack, rngs)

    @property
    def dim(self) -> int:
        return self.spec.stack.d_model

    @property
    def frame_rate(self) -> float:
        return self.spec.sample_rate / math.prod(s for _, _, s in self.spec.convs)

    @property
    def receptive_field(self) -> int:
        """Samples under one output frame of the convolutions."""
        field, hop = 1, 1
        for _, kernel, stride in self.spec.convs:
            field, hop = field + (kernel - 1) * hop, hop * stride
        return field

    def model_inputs(self, x: jax.Array) -> jax.Array:
        wave_bn = waves(x, self.receptive_field)
        if not self.spec.normalize:
            return wave_bn
        mean = wave_bn.mean(-1, keepdims=True)
        return (wave_bn - mean) * lax.rsqrt(wave_bn.var(-1, keepdims=True) + 1e-7)

    def __call__(self, wave_bn: jax.Array) -> EncoderOutput:
        x_btc = wave_bn[..., None]
        for block in self.convs:
            x_btc = block(x_btc)
        if self.proj_norm is not None:
            x_btc = self.proj_norm(x_btc)
        x_btd = x_btc @ self.proj_w[...] + self.proj_b[...]
        x_btd = x_btd + self.pos_conv(x_btd)
        bias_nts = None
        if self.rel_table is not None:
            buckets_ts = relative_buckets(x_btd.shape[1], *self.spec.rel_pos)
            bias_nts = self.rel_table[...][buckets_ts].transpose(2, 0, 1)
        pre_norm = self.spec.stack.pre_norm
        out_btd, inputs_lbtd = self.stack(x_btd if pre_norm else self.norm(x_btd), bias_nts)
        hidden_lbtd = jnp.concatenate([inputs_lbtd, out_btd[None]])
        return EncoderOutput(hidden_lbtd, self.norm(out_btd) if pre_norm else out_btd)

    @classmethod
    def spec_from_hf(cls, hf: HFConfig) -> Wav2VecSpec:
        wavlm = hf.get("model_type") == "wavlm"
        if hf.get("conv_pos_batch_norm", False):
            raise hf.fail("conv_pos_batch_norm", "is true", "slm implements the weight-norm "
                          "positional convolution only (conv_pos_batch_norm=false)")
        for field in ("adapter_attn_dim", "add_adapter"):
            if hf.get(field, None):
                raise hf.fail(field, f"is {hf.get(field)!r}", "slm does not implement adapter "
                              "layers; use the checkpoint without adapters")
        conv = [hf.get(f"conv_{field}") for field in ("dim", "kernel", "stride")]
        layers = hf.get("num_feat_extract_layers", len(conv[0]))
        if any(len(values) != layers for values in conv):
            raise hf.fail("conv_dim", "conv_kernel and conv_stride do not each have "
                          f"num_feat_extract_layers={layers} entries", "fix config.json")
        d, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
        if d % heads:
            raise hf.fail("num_attention_heads", f"({heads}) does not divide hidden_size ({d})",
                          "fix config.json")
        stack = TransformerSpec(
            d_model=d, num_layers=hf.get("num_hidden_layers"), num_heads=heads,
            mlp_dim=hf.get("intermediate_size"), norm_eps=hf.get("layer_norm_eps", 1e-5),
            activation=hf.choice("hidden_act", tuple(ACTIVATIONS), "gelu"),
            pre_norm=hf.choice("do_stable_layer_norm", (False, True), False), key_bias=True,
            gated_bias=wavlm)
        return Wav2VecSpec(
            convs=tuple(zip(*conv)), conv_bias=hf.choice("conv_bias", (False, True), False),
            conv_norm=hf.choice("feat_extract_norm", ("group", "layer")),
            conv_activation=hf.choice("feat_extract_activation", tuple(ACTIVATIONS), "gelu"),
            proj_norm=wavlm or hf.choice("feat_proj_layer_norm", (True, False), True),
            pos_kernel=hf.get("num_conv_pos_embeddings"),
            pos_groups=hf.get("num_conv_pos_embedding_groups"), stack=stack,
            rel_pos=((hf.get("num_buckets", 320), hf.get("max_bucket_distance", 800)) if wavlm
                     else None),
            sample_rate=hf.get("sampling_rate", 16000, preprocessor=True),
            normalize=hf.choice("do_normalize", (False, True), False, preprocessor=True))

    def hf_tensors(self) -> dict[tuple, Tensor]:
        spec, d = self.spec, self.dim
        channels = [1] + [c for c, _, _ in spec.convs]
        tensors = {}
        for j, (block, (c, k, _)) in enumerate(zip(self.convs, spec.convs)):
            hf = f"feature_extractor.conv_layers.{j}."
            tensors[("convs", j, "conv", "w")] = kernel((hf + "conv.weight",), c, channels[j], k)
            if spec.conv_bias:
                tensors[("convs", j, "conv", "b")] = vector(hf + "conv.bias", c)
            if block.norm is not None:
                tensors |= norm(("convs", j, "norm"), hf + "layer_norm", c)
        if spec.proj_norm:
            tensors |= norm(("proj_norm",), "feature_projection.layer_norm", channels[-1])
        pos, k = "encoder.pos_conv_embed.conv.", spec.pos_kernel
        tensors |= {
            ("proj_w",): matrix("feature_projection.projection.weight", d, channels[-1]),
            ("proj_b",): vector("feature_projection.projection.bias", d),
            ("pos_conv", "v"): kernel((pos + "parametrizations.weight.original1", pos + "weight_v"),
                                      d, d // spec.pos_groups, k),
            ("pos_conv", "g"): Tensor((pos + "parametrizations.weight.original0", pos + "weight_g"),
                                      (1, 1, k), lambda g: g.reshape(k)),
            ("pos_conv", "b"): vector(pos + "bias", d),
            **norm(("norm",), "encoder.layer_norm", d)}
        if spec.rel_pos is not None:
            tensors[("rel_table",)] = Tensor(("encoder.layers.0.attention.rel_attn_embed.weight",),
                                             (spec.rel_pos[0], spec.stack.num_heads))
        return tensors | stack_tensors(spec.stack, "encoder.layers.{i}.", "attention",
                                       "layer_norm", "feed_forward.intermediate_dense",
                                       "feed_forward.output_dense")
