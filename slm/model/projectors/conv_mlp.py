"""Strided 1-D convolutions + 2-layer MLP.

SpiralAI's speech LLM downsamples encoder frames with strided convolutions before an MLP;
Qwen-Audio halves Whisper's 50 Hz frames with a stride-2 pooling (here: one stride-2 layer).
Unlike stacking, a kernel wider than its stride lets each output see its neighbours' frames.
`frames_per_output` = stride ** layers, so the rate is fixed by config and checked here.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax import lax

from slm.errors import ConfigError
from slm.model.params import normal, zeros
from slm.model.projectors.base import (ACTIVATIONS, Projector, check_activation, check_positive, linear, register_projector, window_mask)


@dataclasses.dataclass(frozen=True)
class ConvMLPOptions:
    frames_per_output: int = 2  # total downsampling: stride ** (number of conv layers)
    stride: int = 2
    kernel: int = 3  # >= stride, so no frame is skipped
    hidden: int | None = None  # conv channels and the MLP's hidden width; None: d_model
    activation: str = "gelu"

    def __post_init__(self):
        check_positive(self, "frames_per_output", "stride", "kernel", "hidden")
        check_activation(self.activation)
        if self.stride < 2:
            raise ConfigError(f"projector.stride={self.stride}: a conv projector downsamples, so "
                              "stride must be >= 2 (use stack_mlp with k=1 for a plain MLP)")
        if self.stride ** self.layers != self.frames_per_output:
            powers = ", ".join(str(self.stride**n) for n in range(1, 4))
            raise ConfigError(f"projector.frames_per_output={self.frames_per_output} is not a power "
                              f"of projector.stride={self.stride}: set it to one of {powers}, ... "
                              f"or set stride={self.frames_per_output} for a single conv layer")
        if self.kernel < self.stride:
            raise ConfigError(f"projector.kernel={self.kernel} < projector.stride={self.stride} "
                              f"would skip frames; set kernel >= {self.stride}")

    @property
    def layers(self) -> int:
        n, produced = 1, self.stride
        while produced < self.frames_per_output:
            n, produced = n + 1, produced * self.stride
        return n


class _Conv(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs):
        self.w_kio = normal(rngs, (kernel, c_in, c_out), (None, "embed", "mlp"), kernel * c_in)
        self.b_o = zeros((c_out,), ("mlp",))


class ConvMLP(Projector):
    Options = ConvMLPOptions
    shown = ("frames_per_output", "stride", "kernel")

    def __init__(self, enc_dim: int, d_model: int, options: ConvMLPOptions, rngs: nnx.Rngs):
        super().__init__(enc_dim, d_model, options, window=options.frames_per_output)
        hidden = options.hidden or d_model
        widths = [enc_dim] + [hidden] * options.layers
        self.convs = nnx.List([_Conv(c_in, c_out, options.kernel, rngs)
                               for c_in, c_out in zip(widths, widths[1:])])
        self.w_in = normal(rngs, (hidden, hidden), ("embed", "mlp"), hidden)
        self.b_in = zeros((hidden,), ("mlp",))
        self.w_out = normal(rngs, (hidden, d_model), ("mlp", "embed"), hidden)
        self.b_out = zeros((d_model,), ("embed",))

    def _project(self, x_bfe: jax.Array, mask_bf: jax.Array) -> jax.Array:
        s, k = self.options.stride, self.options.kernel
        act = ACTIVATIONS[self.options.activation]
        # output t sees frames [t*s - left, t*s - left + k): centred on its own stride window
        left = (k - s) // 2
        h_bfc = x_bfe
        for conv in self.convs:
            w_kio = conv.w_kio[...].astype(h_bfc.dtype)
            h_bfc = lax.conv_general_dilated(h_bfc, w_kio, (s,), [(left, k - s - left)],
                                             dimension_numbers=("NWC", "WIO", "NWC"))
            mask_bf = window_mask(mask_bf, s)
            # padding outputs are zeroed, so the next layer reads zeros there as the first did
            h_bfc = act(h_bfc + conv.b_o[...].astype(h_bfc.dtype)) * mask_bf[..., None]
        return linear(act(linear(h_bfc, self.w_in, self.b_in)), self.w_out, self.b_out)


register_projector("conv_mlp", ConvMLP)
