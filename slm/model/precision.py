"""The compute dtype by name (`model.dtype`); `auto` picks it from the backend, as
`model.attention: auto` picks the kernel.

Mixed precision in slm: parameters stay in `model.param_dtype` (float32 master weights, so
gradients and the optimizer's moments are float32 too) and are cast to the compute dtype at
each matmul; norms, RoPE and every softmax compute in float32 whatever the compute dtype
(slm.model.decoder, slm.model.attention, slm.model.cache). On accelerators bfloat16 halves the
activations' bytes and runs on the matrix units; XLA:CPU has no fast bfloat16 matmul on most
CPUs, so CPUs keep float32 unless a config asks otherwise.
"""

from __future__ import annotations

import jax.numpy as jnp

from slm.errors import ConfigError
from slm.model.attention import compiled_platform

AUTO = {"cpu": "float32"}  # every other platform (gpu, cuda, rocm, tpu): bfloat16


def compute_dtype(name: str, platform: str | None = None) -> str:
    """The dtype `name` stands for on `platform` (default: the one being compiled for)."""
    if name == "auto":
        return AUTO.get(platform or compiled_platform(), "bfloat16")
    try:
        return jnp.dtype(name).name
    except TypeError:
        raise ConfigError(f"model.dtype={name!r} is not a dtype; use auto, float32 or "
                          "bfloat16") from None
