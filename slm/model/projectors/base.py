"""What every speech projector shares: option checks, the registry, frame padding and masks.

A projector turns speech-encoder frames `[B, frames, enc_dim]` into LLM-width features at a lower
frame rate. Each one consumes the frames in windows of `window` frames and emits `per_window`
outputs per window, so rates, output lengths and masks are computed here once:
- frames that do not fill the last window are padded with zeros (marked invalid) rather than
  dropped, so the end of the last word is never lost;
- an output is valid if *any* frame of its window was valid: a partial window still carries real
  speech, and the frames that are padding are zero, exactly as if the window had been cut short;
- invalid input frames are zeroed before projection and invalid outputs are zero after it, so
  what sits in a batch's padding can never reach the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from slm.errors import ConfigError, DataError
from slm.registry import Registry, check_options_class, parse_options

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ConfigError(f"projector.activation={name!r}; choose one of {', '.join(ACTIVATIONS)}")


def check_positive(options: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(options, field)
        if value is not None and value <= 0:
            raise ConfigError(f"projector.{field}={value}: must be a positive integer")


def linear(x: jax.Array, w: nnx.Param, b: nnx.Param) -> jax.Array:
    """`x @ w + b` over `x`'s last axis; fp32 weights cast to the activations' dtype."""
    return x @ w[...].astype(x.dtype) + b[...].astype(x.dtype)


class Projector(nnx.Module):
    """Base class: subclasses set `window`, `per_window` and `shown`, and implement `_project`."""

    Options: ClassVar[type]  # a frozen dataclass of the projector's options
    shown: ClassVar[tuple[str, ...]]  # the options `describe` prints
    # Each subclass's own step: frames padded to whole windows, zero where the mask is False,
    # -> `[B, outputs, d_model]`; `__call__` does the padding and masking around it.
    _project: ClassVar[Callable[..., jax.Array]]

    def __init__(self, enc_dim: int, d_model: int, options: Any, window: int, per_window: int = 1):
        self.enc_dim, self.d_model, self.options = enc_dim, d_model, options
        self.window, self.per_window = window, per_window

    def output_rate(self, input_rate_hz: float) -> float:
        return input_rate_hz * self.per_window / self.window

    def output_length(self, frames: int) -> int:
        return math.ceil(frames / self.window) * self.per_window

    def describe(self, input_rate_hz: float) -> str:
        name = next((n for n, c in PROJECTORS.items() if c is type(self)), type(self).__name__)
        settings = " ".join(f"{k}={getattr(self.options, k)}" for k in self.shown)
        params = sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
        size = f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}K"
        return (f"{name} {settings}: {input_rate_hz:.1f} Hz -> "
                f"{self.output_rate(input_rate_hz):.1f} Hz, {size} params")

    def __call__(self, x_bfe: jax.Array, mask_bf: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Features `[B, frames, enc_dim]` and their validity `[B, frames]` -> `[B, outputs,
        d_model]` and `[B, outputs]`, with `outputs = output_length(frames)`."""
        if x_bfe.ndim != 3 or x_bfe.shape[-1] != self.enc_dim:
            raise DataError(f"projector input: features of shape {tuple(x_bfe.shape)}, expected "
                            f"[batch, frames, {self.enc_dim}] (enc_dim, the speech encoder's width); "
                            "build the projector with the encoder's width or feed it that encoder's "
                            "frames")
        if tuple(mask_bf.shape) != tuple(x_bfe.shape[:2]):
            raise DataError(f"projector input: frame mask of shape {tuple(mask_bf.shape)} does not "
                            f"match features {tuple(x_bfe.shape)}; pass one flag per [batch, frame]")
        pad = -x_bfe.shape[1] % self.window
        x_bfe = jnp.pad(x_bfe, ((0, 0), (0, pad), (0, 0)))
        mask_bf = jnp.pad(mask_bf.astype(bool), ((0, 0), (0, pad)))
        y_bod = self._project(x_bfe * mask_bf[..., None].astype(x_bfe.dtype), mask_bf)
        mask_bo = jnp.repeat(window_mask(mask_bf, self.window), self.per_window, axis=1)
        return y_bod * mask_bo[..., None].astype(y_bod.dtype), mask_bo


def window_mask(mask_bf: jax.Array, window: int) -> jax.Array:
    """A window is valid if any of its frames is (frames a multiple of `window`)."""
    return mask_bf.reshape(mask_bf.shape[0], mask_bf.shape[1] // window, window).any(axis=-1)


PROJECTORS: Registry[type[Projector]] = Registry(
    "projector", "slm.projectors", "projector", "slm.model.projectors.register_projector")


def register_projector(name: str, cls: type[Projector]) -> None:
    """Make `projector: <name>` buildable; `cls.Options` lists the options it accepts."""
    check_options_class(getattr(cls, "Options", None), f"projector {name!r} ({cls.__name__})")
    PROJECTORS.register(name, cls)


def build_projector(name: str, enc_dim: int, d_model: int, options: dict,
                    rngs: nnx.Rngs) -> Projector:
    """The projector registered as `name`, with `options` checked against its `Options`."""
    cls = PROJECTORS[name]
    return cls(enc_dim, d_model, parse_options(cls.Options, options, "projector",
                                               f"projector {name!r}"), rngs)
