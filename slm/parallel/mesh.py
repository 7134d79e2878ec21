"""Build the device mesh from config: axes `data`, `fsdp`, `tensor`, within (ici) and across
(dcn) slices or hosts, with -1 filling whatever devices are left."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from slm.config import MeshConfig
from slm.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def fill_axis_sizes(sizes: dict[str, int], total: int, where: str) -> tuple[int, ...]:
    """Sizes per axis in `AXES` order, with one -1 replaced so the product equals `total`."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown mesh axis; axes are {', '.join(AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in AXES]
    if shape.count(-1) > 1:
        raise ConfigError(f"{where}: at most one axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"{where}: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % known:
            raise ConfigError(f"{where}: {total} devices do not divide by the fixed axes {sizes}")
        shape[shape.index(-1)] = total // known
    if math.prod(shape) != total:
        raise ConfigError(
            f"{where}: axis sizes {dict(zip(AXES, shape))} use {math.prod(shape)} devices, "
            f"but {total} are available; set one axis to -1 to fill the rest"
        )
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: list | None = None, one_slice: bool = False) -> Mesh:
    """A mesh whose axes multiply the dcn (slow, across slices/hosts) and ici (fast) sizes.

    With one slice the ici part uses `mesh_utils` so TPU/GPU topology decides device order;
    across slices, devices are grouped by slice (or process) so dcn traffic stays on `data`-like
    axes the user put there. `one_slice` is for compile-only TPU devices, which carry no slice
    index: their process index is the host's, and a slice's hosts share the fast network.
    """
    devices = list(devices if devices is not None else jax.devices())
    num_slices = 1 if one_slice else len({getattr(d, "slice_index", d.process_index) for d in devices})
    dcn = fill_axis_sizes(cfg.dcn, num_slices, "mesh.dcn")
    ici = fill_axis_sizes(cfg.ici, len(devices) // num_slices, "mesh.ici")
    if num_slices == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        key = lambda d: (getattr(d, "slice_index", d.process_index), d.id)
        grid = np.array(sorted(devices, key=key)).reshape(dcn + ici)
        grid = grid.transpose(0, 3, 1, 4, 2, 5).reshape([a * b for a, b in zip(dcn, ici)])
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_of(sizes: str, devices: list | None = None) -> Mesh:
    """The mesh `--mesh` names, as `tensor=4` or `data=2,tensor=2` (axes left out are 1, one
    may be -1): on just the devices it uses, the first of this host's, or on all of them
    when an axis is -1."""
    devices = list(devices if devices is not None else jax.devices())
    axes = {}
    for item in filter(None, sizes.replace(" ", "").split(",")):
        axis, _, size = item.partition("=")
        try:
            axes[axis] = int(size)
        except ValueError:
            raise ConfigError(f"--mesh {sizes!r}: write axis=size pairs such as tensor=4 or "
                              "data=2,tensor=2") from None
    used = len(devices) if -1 in axes.values() else math.prod(axes.values())
    if used > len(devices):
        raise ConfigError(f"--mesh {sizes!r} needs {used} devices; this host has {len(devices)}")
    return make_mesh(MeshConfig(ici=axes), devices[:used])
