"""Per-stream delays on `[..., K, T]` token grids (MusicGen / Moshi / Mini-Omni style).

Delaying stream k by d_k steps lets the model condition the finer streams of a frame on the
coarser ones already emitted. `delay` shifts every stream right by its delay and pads with a
fill id; `undelay` is its exact inverse; `valid_mask` marks the grid cells that hold real
tokens, which is what loss weights and samplers need.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from slm.errors import SlmError


def _check(grid: np.ndarray, delays: Sequence[int]) -> None:
    if grid.ndim < 2 or grid.shape[-2] != len(delays):
        raise SlmError(f"delays {list(delays)} need a [..., K={len(delays)}, T] grid, got shape {grid.shape}")
    if any(d < 0 for d in delays):
        raise SlmError(f"delays must be >= 0, got {list(delays)}")


def delay(grid: np.ndarray, delays: Sequence[int], fill: int) -> np.ndarray:
    """`[..., K, T]` -> `[..., K, T + max(delays)]`, stream k shifted right by `delays[k]`."""
    _check(grid, delays)
    t = grid.shape[-1]
    out = np.full((*grid.shape[:-1], t + max(delays, default=0)), fill, dtype=grid.dtype)
    for k, d in enumerate(delays):
        out[..., k, d:d + t] = grid[..., k, :]
    return out


def undelay(grid: np.ndarray, delays: Sequence[int]) -> np.ndarray:
    """Inverse of `delay`: `[..., K, T + max(delays)]` -> `[..., K, T]`."""
    _check(grid, delays)
    t = grid.shape[-1] - max(delays, default=0)
    if t < 0:
        raise SlmError(f"a grid of {grid.shape[-1]} steps is shorter than the largest delay {max(delays)}")
    return np.stack([grid[..., k, d:d + t] for k, d in enumerate(delays)], axis=-2)


def valid_mask(num_steps: int, delays: Sequence[int]) -> np.ndarray:
    """`[K, num_steps + max(delays)]` booleans: True where a delayed grid holds a real token."""
    steps = np.arange(num_steps + max(delays, default=0))
    d = np.asarray(delays)[:, None]
    return (steps >= d) & (steps < d + num_steps)
