"""Speech projectors: encoder frames `[B, frames, enc_dim]` -> LLM-width features at a lower rate.

`build_projector(name, enc_dim, d_model, options, rngs)` is the only place that knows them by
name; a new projector is one module with a `Projector` subclass and one `register_projector`.
"""

from slm.model.projectors.base import PROJECTORS, Projector, build_projector, register_projector
from slm.model.projectors.conv_mlp import ConvMLP, ConvMLPOptions
from slm.model.projectors.qformer import QFormerOptions, WindowQFormer
from slm.model.projectors.stack_mlp import StackMLP, StackMLPOptions

__all__ = ["PROJECTORS", "ConvMLP", "ConvMLPOptions", "Projector", "QFormerOptions", "StackMLP",
           "StackMLPOptions", "WindowQFormer", "build_projector", "register_projector"]
