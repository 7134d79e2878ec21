"""Whisper's audio encoder and its log-mel front end, as transformers' `WhisperEncoder`.

`log_mel` computes what `WhisperFeatureExtractor` computes (centred 400-sample Hann frames every
160 samples, power spectrum, Slaney mel filters up to 8 kHz, log10 floored at 1e-10, at most
8 decades below the clip's peak, (x + 4) / 4), in JAX so it runs inside the jitted `encode`.
The encoder is two convolutions (the second halves the frame rate to 50 Hz), position
embeddings as stored in the checkpoint, pre-LN transformer layers whose key projection has no
bias, and a final layer norm.

transformers pads every input to 30 s and refuses any other length (exactly
`2 * max_source_positions` mel frames). slm encodes shorter inputs too, using the first
positions only: a 5 s clip costs 5 s of compute and yields 250 frames. They differ from the
first 250 frames of the clip padded to 30 s, where every frame also attends to the padding, so
parity with transformers is at the full length; `log_mel` of a clip padded to 30 s is the
extractor's default output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slm.errors import AudioError
from slm.model.encoders.hf_weights import HFConfig, Tensor, kernel, norm, vector
from slm.model.encoders.transformer import (ACTIVATIONS, Conv, EncoderOutput, LayerNorm,
                                            SpeechEncoder, Stack, TransformerSpec, stack_tensors,
                                            waves)


@functools.lru_cache(maxsize=8)
def mel_filters(num_mel_bins: int, sample_rate: int, n_fft: int) -> np.ndarray:
    """`[n_fft // 2 + 1, num_mel_bins]` Slaney-scale, area-normalised triangles from 0 to 8 kHz
    (the bank `WhisperFeatureExtractor` builds, in float64 then float32 as it is applied)."""
    def to_mel(hz):  # linear below 1 kHz, logarithmic above
        log_part = 15.0 + np.log(np.maximum(hz, 1.0) / 1000.0) * (27.0 / np.log(6.4))
        return np.where(hz >= 1000.0, log_part, 3.0 * hz / 200.0)

    def to_hz(mel):
        return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)),
                        200.0 * mel / 3.0)

    edges = to_hz(np.linspace(to_mel(np.float64(0.0)), to_mel(np.float64(8000.0)),
                              num_mel_bins + 2))
    bins = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    triangles = np.maximum(0.0, np.minimum(down, up))
    return (triangles * (2.0 / (edges[2:] - edges[:-2]))).astype(np.float32)


def log_mel(wave_bn: jax.Array, num_mel_bins: int, sample_rate: int = 16000, n_fft: int = 400,
            hop: int = 160) -> jax.Array:
    """`[B, samples]` -> `[B, samples // hop, num_mel_bins]` Whisper features (time-major)."""
    half = n_fft // 2
    padded_bn = jnp.pad(wave_bn, ((0, 0), (half, half)), mode="reflect")
    frames = wave_bn.shape[1] // hop  # of 1 + samples // hop centred frames, HF drops the last
    index_tk = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    window_k = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    spectrum_btf = jnp.fft.rfft(padded_bn[:, index_tk] * window_k, axis=-1)
    power_btf = jnp.square(jnp.abs(spectrum_btf))
    mel_btm = power_btf @ mel_filters(num_mel_bins, sample_rate, n_fft)
    log_btm = jnp.log10(jnp.maximum(mel_btm, 1e-10))
    log_btm = jnp.maximum(log_btm, log_btm.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_btm + 4.0) / 4.0


@dataclasses.dataclass(frozen=True)
class WhisperSpec:
    num_mel_bins: int
    max_positions: int  # max_source_positions: output frames of 30 s, the longest input
    stack: TransformerSpec
    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160


def sinusoids(length: int, channels: int) -> jax.Array:
    """Whisper's position table (what checkpoints store; used when not loading one)."""
    rates = jnp.exp(-math.log(10000) / (channels // 2 - 1) * jnp.arange(channels // 2))
    angles = jnp.arange(length)[:, None] * rates[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


class WhisperEncoder(SpeechEncoder):
    """Whisper's encoder on log-mel features `[B, frames, num_mel_bins]` (time-major; HF's
    `input_features` transposed); `encode` also takes 16 kHz waves."""

    ARCHITECTURES: ClassVar[dict[str, dict[str, str]]] = {"whisper": {
        "WhisperForConditionalGeneration": "model.encoder.", "WhisperModel": "encoder.",
        "WhisperForAudioClassification": "encoder."}}

    def __init__(self, spec: WhisperSpec, rngs: nnx.Rngs):
        self.spec = spec
        d = spec.stack.d_model
        self.conv1 = Conv(spec.num_mel_bins, d, 3, rngs, padding=1)
        self.conv2 = Conv(d, d, 3, rngs, stride=2, padding=1)
        # a Variable, not a Param: HF freezes the table, so optimizers over Params leave it
        self.positions = nnx.Variable(sinusoids(spec.max_positions, d),
                                      out_sharding=(None, "embed"))
        self.stack = Stack(spec.stack, rngs)
        self.norm = LayerNorm(d, spec.stack.norm_eps)

    @property
    def dim(self) -> int:
        return self.spec.stack.d_model

    @property
    def frame_rate(self) -> float:
        return self.spec.sample_rate / (2 * self.spec.hop)

    def model_inputs(self, x: jax.Array) -> jax.Array:
        """Features `[B, frames, num_mel_bins]` pass through; waves become features."""
        spec = self.spec
        if x.ndim == 3:
            if x.shape[-1] != spec.num_mel_bins:
                raise AudioError(f"features have {x.shape[-1]} mel bins; this Whisper encoder "
                                 f"takes num_mel_bins={spec.num_mel_bins} ([B, frames, mels])")
            return x
        return log_mel(waves(x, max(spec.n_fft // 2 + 1, spec.hop)), spec.num_mel_bins,
                       spec.sample_rate, spec.n_fft, spec.hop)

    def __call__(self, mel_btm: jax.Array) -> EncoderOutput:
        x_btd = jax.nn.gelu(self.conv1(mel_btm), approximate=False)
        x_btd = jax.nn.gelu(self.conv2(x_btd), approximate=False)
        frames, most = x_btd.shape[1], self.spec.max_positions
        if frames > most:
            raise AudioError(f"{mel_btm.shape[1]} mel frames make {frames} encoder frames, more "
                             f"than max_source_positions={most} "
                             f"({most * 2 * self.spec.hop / self.spec.sample_rate:g} s); "
                             "encode longer audio in chunks")
        out_btd, inputs_lbtd = self.stack(x_btd + self.positions[...][:frames])
        last_btd = self.norm(out_btd)
        return EncoderOutput(jnp.concatenate([inputs_lbtd, last_btd[None]]), last_btd)

    @classmethod
    def spec_from_hf(cls, hf: HFConfig) -> WhisperSpec:
        d, heads = hf.get("d_model"), hf.get("encoder_attention_heads")
        if d % heads:
            raise hf.fail("encoder_attention_heads", f"({heads}) does not divide d_model ({d})",
                          "fix config.json")
        mels = hf.get("num_mel_bins")
        if hf.get("feature_size", mels, preprocessor=True) != mels:
            raise hf.fail("feature_size", f"differs from config.json's num_mel_bins={mels}",
                          "the two files describe different models", preprocessor=True)
        hf.choice("dither", (0.0,), 0.0, preprocessor=True)
        stack = TransformerSpec(
            d_model=d, num_layers=hf.get("encoder_layers"), num_heads=heads,
            mlp_dim=hf.get("encoder_ffn_dim"), norm_eps=1e-5,
            activation=hf.choice("activation_function", tuple(ACTIVATIONS), "gelu"),
            pre_norm=True, key_bias=False)
        return WhisperSpec(
            num_mel_bins=mels, max_positions=hf.get("max_source_positions"), stack=stack,
            sample_rate=hf.get("sampling_rate", 16000, preprocessor=True),
            n_fft=hf.get("n_fft", 400, preprocessor=True),
            hop=hf.get("hop_length", 160, preprocessor=True))

    def hf_tensors(self) -> dict[tuple, Tensor]:
        spec, d = self.spec, self.dim
        return {
            ("conv1", "w"): kernel(("conv1.weight",), d, spec.num_mel_bins, 3),
            ("conv1", "b"): vector("conv1.bias", d),
            ("conv2", "w"): kernel(("conv2.weight",), d, d, 3),
            ("conv2", "b"): vector("conv2.bias", d),
            ("positions",): Tensor(("embed_positions.weight",), (spec.max_positions, d)),
            **norm(("norm",), "layer_norm", d),
        } | stack_tensors(spec.stack, "layers.{i}.", "self_attn", "self_attn_layer_norm",
                          "fc1", "fc2")
