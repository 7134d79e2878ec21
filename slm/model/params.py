"""New parameters for modules built from scratch (speech encoders, projectors): one init rule,
with the logical axis names that `slm.parallel.rules` maps to the mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def normal(rngs: nnx.Rngs, shape: tuple, names: tuple, fan_in: int) -> nnx.Param:
    """normal(0, 1/sqrt(fan_in)), as the decoder's weights."""
    return nnx.Param(jax.random.normal(rngs.params(), shape) * fan_in**-0.5, out_sharding=names)


def zeros(shape: tuple, names: tuple) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape), out_sharding=names)
