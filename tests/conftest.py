"""Test setup: 8 simulated CPU devices (set before jax is imported) and small shared helpers."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from slm.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_mesh() -> Mesh:
    import numpy as np

    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)


@pytest.fixture
def single_mesh() -> Mesh:
    """Most tests train on one device; sharding tests build their own meshes."""
    return one_device_mesh()


@pytest.fixture
def tiny_config():
    """Factory: a tiny config from configs/tiny with key=value overrides."""

    def make(name: str = "synthetic", *overrides: str):
        return load_config(os.path.join(REPO, "configs", "tiny", f"{name}.yaml"), list(overrides))

    return make
