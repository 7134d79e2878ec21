"""HuBERT and WavLM: one encoder (its transformer is `slm.model.encoders.transformer`).

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
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from slm.model.encoders.hf_weights import HFConfig, Tensor, kernel, matrix, norm, vector
from slm.model.encoders.transformer import (ACTIVATIONS, Conv, EncoderOutput, LayerNorm,
                                            SpeechEncoder, Stack, TransformerSpec, conv1d,
                                            stack_tensors, waves)
from slm.model.params import normal, zeros


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
        self.b = zeros((d,), ("mlp",))

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
        self.proj_w = normal(rngs, (channels[-1], d), ("mlp", "embed"), channels[-1])
        self.proj_b = zeros((d,), ("norm",))
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
        for _, width, stride in self.spec.convs:
            field, hop = field + (width - 1) * hop, hop * stride
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
