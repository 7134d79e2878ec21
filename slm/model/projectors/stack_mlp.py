"""Frame stacking + 2-layer MLP.

LLaMA-Omni concatenates k=5 consecutive Whisper frames (50 Hz -> 10 Hz) and maps them to the
LLM's width with Linear(enc_dim*k -> hidden), ReLU, Linear(hidden -> d_model): the cheapest
projector, and the LLM sees 5x fewer speech positions.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from slm.model.params import normal, zeros
from slm.model.projectors.base import (ACTIVATIONS, Projector, check_activation, check_positive, linear, register_projector)


@dataclasses.dataclass(frozen=True)
class StackMLPOptions:
    k: int = 5  # frames stacked into one output
    hidden: int | None = None  # the MLP's hidden width; None: d_model
    activation: str = "relu"

    def __post_init__(self):
        check_positive(self, "k", "hidden")
        check_activation(self.activation)


class StackMLP(Projector):
    Options = StackMLPOptions
    shown = ("k",)

    def __init__(self, enc_dim: int, d_model: int, options: StackMLPOptions, rngs: nnx.Rngs):
        super().__init__(enc_dim, d_model, options, window=options.k)
        stacked, hidden = enc_dim * options.k, options.hidden or d_model
        self.w_in = normal(rngs, (stacked, hidden), ("embed", "mlp"), stacked)
        self.b_in = zeros((hidden,), ("mlp",))
        self.w_out = normal(rngs, (hidden, d_model), ("mlp", "embed"), hidden)
        self.b_out = zeros((d_model,), ("embed",))

    def _project(self, x_bfe: jax.Array, mask_bf: jax.Array) -> jax.Array:
        # frame j of a window lands at features [j*enc_dim, (j+1)*enc_dim), as LLaMA-Omni's view
        b, f, e = x_bfe.shape
        x_bts = x_bfe.reshape(b, f // self.window, self.window * e)
        h_bth = ACTIVATIONS[self.options.activation](linear(x_bts, self.w_in, self.b_in))
        return linear(h_bth, self.w_out, self.b_out)


register_projector("stack_mlp", StackMLP)
