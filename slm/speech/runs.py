"""Runs of equal unit ids (pure numpy: strategies and data layouts use it without jax)."""

from __future__ import annotations

import numpy as np


def dedup_units(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse runs of equal ids: (ids, durations in frames), so `np.repeat(ids, durations) == units`.

    GSLM-style models read the deduplicated ids; the durations let a vocoder restore timing.
    """
    units = np.asarray(units)
    if units.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    durations = np.diff(np.r_[starts, units.size])
    return units[starts].astype(np.int32), durations.astype(np.int32)
